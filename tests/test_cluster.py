"""Jobs on a real two-node Ray cluster (cluster/local.py: `ray start --head` plus a `ray start --address` node,
own ports and temp dir, stopped by PID): `raytrain submit` of a 2-worker pre-training placed one worker per node,
`ray job stop` midway, and the plain `ray job submit` of the same run resuming it to the uninterrupted curve."""

import json
import os
import re
import secrets
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import STEPS, assert_same_curve, losses

from cluster.local import LocalCluster

pytestmark = pytest.mark.ray

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
# Fake secrets, in the nodes' environment (as a cloud cluster holds keys) and the submitter's: none may reach a
# file that a run or a job writes.
SECRETS = {"WANDB_API_KEY": "wandbkey" + "5" * 32, "AWS_SECRET_ACCESS_KEY": "awssecret0fakefakefake0"}


def cli(cluster: LocalCluster, *argv: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """A command as a user runs it, from the repository root (the jobs' working_dir), with the cluster's token."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env.update(SECRETS, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=Path(cluster.token_file).read_text())
    return subprocess.run(list(argv), cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def wait_for(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    """A head and a second node, token authentication on (Ray 2.60's default for new clusters)."""
    token_file = tmp_path_factory.mktemp("auth") / "auth_token"
    token_file.write_text(secrets.token_hex(32))
    cluster = LocalCluster(nodes=2, cpus=2, token_file=str(token_file), node_env=SECRETS)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.remove()
    assert not cluster.pids()


def test_jobs_on_two_nodes_stop_resume_and_keep_secrets(two_nodes, tiny_dataset, tmp_path):
    runs = tmp_path / "runs"
    common = [f"train.data={tiny_dataset}", f"run.root={runs}", f"train.steps={STEPS}", "train.checkpoint_every=5",
              "tracking.mode=offline"]
    submit = [str(BIN / "raytrain"), "submit", "jobs/pretrain-tiny.yaml", "--address", two_nodes.dashboard]
    ray = [str(BIN / "ray")]
    address = ["--address", two_nodes.dashboard]

    # Without the token the job server refuses the submission, and raytrain says so in one line.
    refused = subprocess.run(submit, cwd=REPO, capture_output=True, text=True, timeout=120,
                             env={**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 64})
    assert refused.returncode == 2 and "raytrain: error:" in refused.stderr, refused.stderr[-2000:]

    # Uninterrupted: SUCCEEDED, the logs streamed, a complete run folder, one worker on each node.
    done = cli(two_nodes, *submit, "run.name=whole", *common)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    whole_job = re.search(r"job (raytrain-pretrain-tiny-\w+) SUCCEEDED", done.stdout).group(1)
    assert f"step {STEPS}/{STEPS}" in done.stdout  # the workers' progress lines reach the submitter
    whole = runs / "whole"
    for name in ("config.yaml", "metrics.jsonl", "summary.json", f"checkpoints/step_{STEPS:06d}/raytrain.json"):
        assert (whole / name).is_file(), name
    listed = cli(two_nodes, *ray, "list", "actors", *address, "--filter", "class_name=RayTrainWorker", "--detail",
                 "--format", "json")
    assert len({actor["node_id"] for actor in json.loads(listed.stdout)}) == 2, listed.stdout[-2000:]

    # Stopped after its first checkpoint (each step sleeps, so it is mid-run), then resubmitted under the same run
    # name with the plain `ray job submit`: it resumes from the checkpoint and reproduces the uninterrupted curve.
    started = cli(two_nodes, *submit, "--no-wait", "run.name=stopped", "debug.step_sleep_s=0.5", *common)
    assert started.returncode == 0, started.stderr[-3000:]
    job = re.search(r"submitted (raytrain-pretrain-tiny-\w+)", started.stdout).group(1)
    stopped = runs / "stopped"
    wait_for(lambda: (stopped / "checkpoints/step_000005/raytrain.json").is_file(), 180, "the first checkpoint")
    assert cli(two_nodes, *ray, "job", "stop", job, *address).returncode == 0
    status = [*ray, "job", "status", job, *address]
    wait_for(lambda: "was stopped" in (result := cli(two_nodes, *status)).stdout + result.stderr, 60, "the stop")
    assert not (stopped / "summary.json").exists() and not (stopped / f"checkpoints/step_{STEPS:06d}").exists()

    resumed = cli(two_nodes, *ray, "job", "submit", *address, "--runtime-env", "jobs/runtime_env.yaml", "--",
                  "python", "-m", "raytrain", "pretrain", "--config", "tiny", "--name", "stopped",
                  "parallel.workers=2", "parallel.placement_strategy=STRICT_SPREAD", *common)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    resumed_at = re.search(r"starting at step (\d+)", resumed.stdout)
    assert resumed_at and 5 <= int(resumed_at.group(1)) < STEPS, resumed.stdout[-3000:]
    assert (stopped / "summary.json").is_file()
    assert_same_curve(losses(whole), losses(stopped))

    # No secret (W&B and cloud keys, the Ray token) in any file the runs wrote, the jobs' logs, or their details.
    token = Path(two_nodes.token_file).read_text()
    texts = {str(path): path.read_bytes().decode(errors="replace") for path in runs.rglob("*") if path.is_file()}
    for job_id in (whole_job, job):
        texts[f"logs of {job_id}"] = cli(two_nodes, *ray, "job", "logs", job_id, *address).stdout
    texts["job details"] = cli(two_nodes, *ray, "list", "jobs", *address, "--detail", "--format", "json").stdout
    texts |= {str(p): p.read_text(errors="replace") for p in Path(two_nodes.tmpdir).rglob("job-driver-*.log")}
    assert len(texts) > 20 and any("wandb" in name for name in texts)
    for name, text in texts.items():
        for secret in [*SECRETS.values(), token]:
            assert secret not in text, f"a secret is in {name}"


@pytest.mark.parametrize(("spec", "fragment"), [
    ("entrypoint: python -m raytrain pretrain\nruntime_env: runtime_env.yaml\nmetdata: {}\n",
     "unknown key 'metdata'; did you mean 'metadata'?"),
    ("runtime_env: runtime_env.yaml\n", "'entrypoint' must be the command line the job runs"),
    ("entrypoint: x\nruntime_env: missing.yaml\n", "runtime_env file"),
    ("entrypoint: [x\n", "not valid YAML"),
])
def test_bad_job_specs_are_refused_in_one_line(spec, fragment, tmp_path, capsys):
    from raytrain.cli import main

    (tmp_path / "runtime_env.yaml").write_text("working_dir: .\n")
    (tmp_path / "job.yaml").write_text(spec)
    assert main(["submit", str(tmp_path / "job.yaml")]) == 2
    assert fragment in capsys.readouterr().err


def test_every_job_spec_reads_and_overrides_reach_the_entrypoint(capsys):
    from raytrain.cli import main
    from raytrain.cluster.submit import read_job_spec

    specs = sorted((REPO / "jobs").glob("*.yaml"))
    assert {p.stem for p in specs} >= {"runtime_env", "demo", "pretrain-tiny", "pretrain-demo",
                                       "pretrain-llama-8b-64gpu", "sft-demo", "reward-demo", "ppo-demo",
                                       "tune-lr-demo"}
    for path in specs:
        if path.stem != "runtime_env":
            spec = read_job_spec(path, ["train.lr=1e-3", "run.root=/mnt/x y"])
            assert spec["entrypoint"].startswith("python -m raytrain ")
            assert spec["entrypoint"].endswith(" train.lr=1e-3 'run.root=/mnt/x y'")
            assert spec["runtime_env"]["working_dir"] == "." and spec["metadata"]["raytrain_job_spec"] == path.name
    assert main(["submit", "jobs/demo.yaml", "--address", "127.0.0.1:6379"]) == 2
    assert "is not a job server; give the dashboard's URL" in capsys.readouterr().err
