"""`make bench`: run every benchmark on this machine and rewrite BENCHMARKS.md (and its figures, bench/figures/).

    python -m bench.run                      every section, in order
    python -m bench.run tune ppo             only these sections, replaced in place in BENCHMARKS.md
    python -m bench.run --tiny --out DIR     every section at toy sizes into DIR (the smoke test: figures meaningless)

Each section starts from the same state whether it runs alone or in the full run (section_state below), so a
section refreshed alone is comparable with the rest of the page.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import platform
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

# rollout_engines runs vLLM in this process: after every section with Ray
NAMES = ["data_prepare", "training", "post_training", "finetune", "ppo", "lora_sync", "tune", "export", "parallel",
         "construction", "rollout_engines", "gpu"]
ROOT = Path(__file__).resolve().parent.parent
STATE = ("Every section starts from the same state, whether run alone (`python -m bench.run SECTION`) or in the "
         "full run: torch at 2 threads in the driver, and a fresh local Ray with the logical CPUs the section "
         "names (none for sections without Ray), shut down when the section ends.")


@contextlib.contextmanager
def section_state(module):
    """A fresh local Ray with module.RAY_CPUS logical CPUs (0: none), torch at 2 threads; Ray stopped after."""
    import ray
    import torch

    from raytrain.config import RuntimeConfig
    from raytrain.runtime import init_ray

    ray.shutdown()
    torch.set_num_threads(2)
    if module.RAY_CPUS:
        init_ray(RuntimeConfig(address="local", num_cpus=module.RAY_CPUS, progress=False))
    try:
        yield
    finally:
        ray.shutdown()


def run_section(name: str) -> str:
    module = importlib.import_module(f"bench.{name}")
    started = time.perf_counter()
    with section_state(module):
        text = module.run()
    print(f"bench: {name} took {time.perf_counter() - started:.0f} s", flush=True)
    return text


def header() -> list[str]:
    import torch

    return [
        "# Benchmarks",
        "",
        "Written by `make bench` (`bench/`); every ratio compares two sides measured in one run on the machine "
        "named here, with the settings of each side printed beside it. Re-run it to refresh.",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"torch {torch.__version__}. Run at {datetime.now(UTC):%Y-%m-%d %H:%M} UTC.",
        "",
        STATE,
        "",
    ]


def write_all(output: Path) -> None:
    sections = [run_section(name) for name in NAMES]
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text("\n".join(header()) + "\n" + "\n\n".join(sections) + "\n")


def refresh(output: Path, names: list[str]) -> None:
    """Replace (or append) the sections these names write, keyed by their heading."""
    sections = output.read_text().rstrip("\n").split("\n\n## ")
    for name in names:
        text = run_section(name).removeprefix("## ")
        heading = text.splitlines()[0]
        text += (f"\n\n(This section was refreshed alone by `python -m bench.run {name}` at "
                 f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC.)")
        same = [i for i, section in enumerate(sections) if section.splitlines()[0] == heading]
        if same:
            sections[same[0]] = text
        else:
            sections.append(text)
    output.write_text("\n\n## ".join(sections) + "\n")


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.splitlines()[0])
    parser.add_argument("sections", nargs="*", metavar="SECTION", help=f"any of {', '.join(NAMES)}; none: all")
    parser.add_argument("--tiny", action="store_true", help="toy sizes, for the smoke test")
    parser.add_argument("--out", type=Path, default=ROOT, help="folder for BENCHMARKS.md and bench/figures/")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.sections) - set(NAMES))
    if unknown:
        parser.error(f"no section {', '.join(unknown)}; the sections are {', '.join(NAMES)}")
    if args.tiny and args.out.resolve() == ROOT:
        parser.error("--tiny writes toy figures: give --out another folder")
    # bench.common reads these when first imported, which the sections do after this point.
    os.environ["RAYTRAIN_BENCH_TINY"] = "1" if args.tiny else "0"
    os.environ["RAYTRAIN_BENCH_FIGURES"] = str(args.out / "bench" / "figures")
    output = args.out / "BENCHMARKS.md"
    if not args.sections:
        write_all(output)
    elif output.exists():
        refresh(output, args.sections)
    else:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text("\n".join(header()) + "\n" + "\n\n".join(map(run_section, args.sections)) + "\n")
    print(output.read_text())


if __name__ == "__main__":
    main(sys.argv[1:])
