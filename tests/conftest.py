"""Shared fixtures: one local Ray per test session, and small corpora built from the stdlib."""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("WANDB_MODE", "offline")
# Ray Train's controller polls its workers every 2 s by default: a run's end (and each report's registration)
# waits up to that long. The suite's runs take seconds, so it polls more often (Ray passes it to every
# controller and worker); nothing a test asserts depends on it.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
# The suite's Ray is private: its own temp dir (so no `ray start` address file is found and none of ours is
# seen by others; short, as Ray's socket paths must fit in 107 bytes), never an address from the environment.
SUITE_RAY_TMPDIR = tempfile.mkdtemp(prefix="raytrain-test-")
os.environ["RAY_TMPDIR"] = SUITE_RAY_TMPDIR
for _name in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
    os.environ.pop(_name, None)
# The S3 server the storage tests start (`s3_bucket`) listens here; set before any Ray starts, so that the
# suite's workers, which inherit this environment, reach it too. Fake keys: the server accepts any.
S3_PORT = _free_port()
os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{S3_PORT}", AWS_ACCESS_KEY_ID="testing",
                  AWS_SECRET_ACCESS_KEY="testing", AWS_REGION="us-east-1")

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import pytest  # noqa: E402

from raytrain.config import load_config  # noqa: E402
from raytrain.data.sources import stdlib_files  # noqa: E402


def pytest_sessionfinish(session, exitstatus):
    """The suite's Ray temp dir goes with the session, whether or not a test started Ray."""
    shutil.rmtree(SUITE_RAY_TMPDIR, ignore_errors=True)


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole session: more logical CPUs than cores, quiet, its dashboard on a free port.
    Yields its GCS address; state API calls name its dashboard (`ray_api`), never guess."""
    import ray

    from raytrain.runtime import init_ray

    init_ray(load_config("tiny", ["runtime.address=local"]).runtime)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_bucket() -> str:
    """A real S3-compatible server (moto's) on 127.0.0.1:S3_PORT for the session, stopped by PID; a new bucket."""
    import subprocess
    import sys
    import time

    import pyarrow.fs as pafs

    server = subprocess.Popen([str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p",
                               str(S3_PORT)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with socket.create_connection(("127.0.0.1", S3_PORT), timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError("the S3 server (moto_server) did not start") from None
                time.sleep(0.2)
        pafs.S3FileSystem(endpoint_override=os.environ["AWS_ENDPOINT_URL"], allow_bucket_creation=True).create_dir(
            "raytrain")
        yield "s3://raytrain"
    finally:
        server.terminate()
        server.wait(timeout=10)


@pytest.fixture(scope="session")
def ray_api(ray_session) -> str:
    """The suite cluster's dashboard URL, for state API and job calls."""
    from raytrain.runtime import dashboard_url

    return dashboard_url()


def make_corpus(root: Path) -> Path:
    """Every supported format, plus a non-UTF-8 file, an empty one and files of other suffixes."""
    root.mkdir(parents=True, exist_ok=True)
    sources = stdlib_files()[:40]
    for i, path in enumerate(sources[:20]):
        shutil.copy(path, root / f"module_{i:02d}.txt")
    (root / "notes").mkdir(exist_ok=True)
    (root / "notes" / "readme.md").write_text("# Notes\n\nSmall *markdown* file. ✓ ünïcode 🚀\n")
    (root / "notes" / "empty.md").write_text("")
    (root / "latin1.txt").write_bytes("café au lait, naïve façade\n".encode("latin-1"))
    (root / "blob.txt").write_bytes(bytes(range(256)) * 4)  # binary: decoded with replacement
    (root / "LICENSE").write_text("Permission is hereby granted, free of charge, ...\n")  # skipped and counted
    (root / "notes" / "todo.rst").write_text("TODO\n====\n")
    (root / ".git").mkdir(exist_ok=True)
    (root / ".git" / "HEAD").write_text("ref: refs/heads/main\n")  # hidden: not a source at all
    with (root / "docs.jsonl").open("w") as f:
        for path in sources[20:30]:
            f.write(json.dumps({"text": Path(path).read_text(), "id": path}) + "\n")
        f.write("\n")  # blank lines are not records
    texts = [Path(p).read_text() for p in sources[30:40]]
    pq.write_table(pa.table({"text": texts, "n": list(range(len(texts)))}), root / "docs.parquet")
    return root


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="session")
def plain_tokenizer(tmp_path_factory) -> Path:
    """A small tokenizer trained in this process, for tests that need no Ray."""
    from raytrain.data.tokenizer import save_tokenizer, train_tokenizer

    out = tmp_path_factory.mktemp("plain_tokenizer")
    save_tokenizer(train_tokenizer([Path(p).read_text() for p in stdlib_files()[:30]], vocab_size=600), out, {})
    return out


@pytest.fixture(scope="session")
def tiny_tokenizer(ray_session, corpus, tmp_path_factory) -> Path:
    from raytrain.data.tokenizer_stage import run_tokenizer_stage

    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    config = load_config("tiny", [f"data.source.inputs=['{corpus}']", f"data.tokenizer.out='{out}'"])
    run_tokenizer_stage(config)
    return out


@pytest.fixture(scope="session")
def tiny_dataset(ray_session, corpus, tiny_tokenizer, tmp_path_factory) -> Path:
    from raytrain.data.prepare import run_prepare_stage

    out = tmp_path_factory.mktemp("data") / "dataset"
    config = load_config(
        "tiny",
        [
            f"data.source.inputs=['{corpus}']",
            f"data.prepare.tokenizer='{tiny_tokenizer}'",
            f"data.prepare.out='{out}'",
        ],
    )
    run_prepare_stage(config)
    return out


@pytest.fixture(scope="session")
def tiny_sft_dataset(ray_session, tiny_tokenizer, tmp_path_factory) -> Path:
    """`stdlib-qa` as fine-tuning rows of 64 tokens."""
    from raytrain.data.chat_data import run_sft_data_stage

    out = tmp_path_factory.mktemp("sft") / "dataset"
    run_sft_data_stage(load_config("tiny", ["data.source.inputs=[stdlib-qa]", "data.prepare.seq_len=64",
                                            f"data.prepare.tokenizer='{tiny_tokenizer}'", f"data.prepare.out='{out}'"]))
    return out


@pytest.fixture(scope="session")
def tiny_prefs_dataset(ray_session, tiny_tokenizer, tmp_path_factory) -> Path:
    """`stdlib-prefs` as ranked-response rows of 64 tokens."""
    from raytrain.data.chat_data import run_prefs_data_stage

    out = tmp_path_factory.mktemp("prefs") / "dataset"
    run_prefs_data_stage(load_config("tiny", ["data.source.inputs=[stdlib-prefs]", "data.prepare.seq_len=64",
                                              f"data.prepare.tokenizer='{tiny_tokenizer}'",
                                              f"data.prepare.out='{out}'"]))
    return out


# Pre-training runs shared by the training tests: every layout must reproduce `reference`.
STEPS = 20


def pretrain(root, name, dataset, *overrides):
    from raytrain.stages import STAGES

    config = load_config("tiny", [f"run.root='{root}'", f"run.name={name}", f"train.data='{dataset}'",
                                  f"train.steps={STEPS}", *overrides])
    return STAGES["pretrain"].run(config)


PROMPT_WORDS = ("len", "sorted", "zip", "map", "open", "print")


def prompts_file(folder: Path, words=PROMPT_WORDS, topics=("lists", "text")) -> Path:
    """A JSONL prompt set for RL runs: "What does WORD do with TOPIC?" for each pair."""
    path = folder / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"What does {w} do with {v}?"}) + "\n"
                            for w in words for v in topics))
    return path


def records(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def metric(run_dir, name: str) -> dict[int, float]:
    return {r["step"]: r[name] for r in records(run_dir) if name in r}


def losses(run_dir) -> dict[int, float]:
    return metric(run_dir, "train/loss")


def assert_same_curve(a: dict, b: dict, tol: float = 1e-4) -> None:
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
    for step in a:
        assert abs(a[step] - b[step]) <= tol * abs(a[step]), (step, a[step], b[step])


@pytest.fixture(scope="session")
def reference(ray_session, tiny_dataset, tmp_path_factory):
    """The uninterrupted single-worker run every other layout must reproduce."""
    root = tmp_path_factory.mktemp("runs")
    summary = pretrain(root, "reference", tiny_dataset, "parallel.workers=1", "tracking.mode=offline",
                       "train.micro_batches=2", "debug.track_memory=true")
    return root / "reference", summary
