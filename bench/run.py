"""`make bench`: run every benchmark on this machine and rewrite BENCHMARKS.md.

`python -m bench.run tune ppo` runs only those sections and replaces them in BENCHMARKS.md (each section's
ratios are measured side by side within its own run); the section says when it was refreshed alone.
"""

from __future__ import annotations

import os
import platform
import sys
from datetime import UTC, datetime
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from bench import data_prepare, export, parallel, post_training, ppo, training, tune  # noqa: E402

SECTIONS = [data_prepare, training, post_training, ppo, tune, export, parallel]
OUTPUT = Path(__file__).resolve().parent.parent / "BENCHMARKS.md"
GPU_NOTE = """## GPU (bench/gpu.sh, bench/gpu_step.py)

`bash bench/gpu.sh` trains the llama-1b preset (about 1.0 B parameters at vocab 32768) with `raytrain pretrain`
on one GPU, bf16 and torch.compile, and prints tokens/s and MFU against the data-sheet peak (goal: ≥ 45% MFU
on an H200). `python3 -m bench.gpu_step` times the same step without Ray (the GPU machines lent to this
project have PyTorch but not Ray) and compares the allocator's peak with `raytrain plan`'s estimate.
Not yet measured: no session so far has had a GPU machine."""


def main(names: list[str]) -> None:
    if names:
        refresh([SECTIONS[[m.__name__.split(".")[-1] for m in SECTIONS].index(name)] for name in names])
        return
    import torch

    header = [
        "# Benchmarks",
        "",
        "Written by `make bench`; every ratio compares two things measured side by side in one run "
        "on the machine named here. Re-run it to refresh.",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"torch {torch.__version__}. Run at {datetime.now(UTC):%Y-%m-%d %H:%M} UTC.",
        "",
    ]
    sections = [module.run() for module in SECTIONS] + [GPU_NOTE]
    OUTPUT.write_text("\n".join(header) + "\n" + "\n\n".join(sections) + "\n")
    print(OUTPUT.read_text())


def refresh(modules: list) -> None:
    """Replace (or add, before the GPU note) the sections these modules write, keyed by their heading."""
    sections = OUTPUT.read_text().rstrip("\n").split("\n\n## ")
    for module in modules:
        text = module.run().removeprefix("## ")
        heading = text.splitlines()[0]
        when = f"{datetime.now(UTC):%Y-%m-%d %H:%M}"
        text += f"\n\n(This section was refreshed alone by `python -m bench.run` at {when} UTC.)"
        same = [i for i, section in enumerate(sections) if section.splitlines()[0] == heading]
        if same:
            sections[same[0]] = text
        else:
            sections.insert(len(sections) - 1, text)
    OUTPUT.write_text("\n\n## ".join(sections) + "\n")
    print(OUTPUT.read_text())


if __name__ == "__main__":
    main(sys.argv[1:])
