"""Which Ray a command uses, beside other Rays on the machine, and what it prints."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys

import pytest

from cluster.local import LocalCluster
from raytrain.cli import _overrides, parse_args
from raytrain.config import RuntimeConfig, load_config
from raytrain.runtime import find_ray

# Ray's own chatter that the default output must not show (issue: 145 of 213 demo lines were these).
RAY_NOISE = re.compile(r"PlacementGroupCleaner|TrainingReport\(|Checkpoint successfully created|TrainController|"
                       r"Setting up process group|Progress bars disabled|core_worker\.cc|wandb:")


def raytrain(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "raytrain", *args], capture_output=True, text=True, timeout=300,
                          env=env)


def test_which_ray_follows_address_then_environment_then_a_live_recorded_cluster(tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert find_ray(RuntimeConfig()).address is None  # nothing recorded: start one

    record = tmp_path / "ray" / "ray_current_cluster"
    record.parent.mkdir()
    with socket.socket() as listener:  # something answers at the recorded address: a running cluster
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        live = f"127.0.0.1:{listener.getsockname()[1]}"
        record.write_text(live + "\n")
        target = find_ray(RuntimeConfig())
        assert target.address == live and str(record) in target.source
    stale = find_ray(RuntimeConfig())  # the listener is gone: a stale file, not a cluster
    assert stale.address is None and "where no Ray answers" in stale.source

    monkeypatch.setenv("RAY_ADDRESS", "10.1.2.3:6379")
    assert find_ray(RuntimeConfig()).address == "10.1.2.3:6379"
    assert find_ray(RuntimeConfig(address="ray://head:10001")).address == "ray://head:10001"
    assert find_ray(RuntimeConfig(address="local")).address is None  # always a private local Ray


def test_overrides_mix_freely_with_flags():
    args = parse_args(["pretrain", "--config", "tiny", "run.root=/x", "--name", "a", "--workers", "2",
                       "parallel.tp=2"])
    config = load_config(args.config, _overrides(args))
    assert (config.run.root, config.run.name, config.parallel.workers, config.parallel.tp) == ("/x", "a", 2, 2)

    # `--input` takes several values; an override after them is still an override, not an input.
    args = parse_args(["data", "tokenizer", "--input", "a.txt", "b.txt", "data.tokenizer.vocab_size=300",
                       "--out", "t"])
    config = load_config(args.config, _overrides(args))
    assert config.data.source.inputs == ["a.txt", "b.txt"] and config.data.tokenizer.vocab_size == 300


@pytest.mark.ray
def test_pretrain_prints_its_own_progress_and_frees_its_placement_group(ray_session, ray_api, tiny_dataset,
                                                                        tmp_path):
    from ray.util.state import list_placement_groups

    # Through the console script, on the suite's Ray (--address), flags and overrides intermixed.
    result = raytrain("pretrain", "--config", "tiny", f"run.root={tmp_path}", "--data", str(tiny_dataset),
                      "tracking.mode=offline", "--name", "quiet", "--address", ray_session, "--steps", "4",
                      "train.checkpoint_every=2", "train.val_every=2")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert f"Ray: connected to {ray_session} (runtime.address / --address)" in output
    assert "[raytrain] step 4/4" in output and "[raytrain] W&B run offline in" in output
    assert not RAY_NOISE.search(output), output
    assert (tmp_path / "quiet" / "checkpoints" / "step_000004").is_dir()
    # No placement group outlives its run (the State API is asked at this cluster's own address).
    assert all(pg.state == "REMOVED" for pg in list_placement_groups(address=ray_api, detail=True))


@pytest.mark.ray
def test_a_running_local_cluster_is_joined_and_a_stale_address_file_ignored(corpus, tmp_path):
    from ray.job_submission import JobSubmissionClient

    head = LocalCluster(nodes=1)
    try:
        address = head.start()
        command = ["data", "tokenizer", "--config", "tiny", "--input", str(corpus)]
        joined = raytrain(*command, "--out", str(tmp_path / "joined"), env=head.env)
        assert joined.returncode == 0, joined.stderr
        assert f"Ray: connected to {address} (the running local cluster recorded in {head.address_file})" \
            in joined.stderr
        drivers = [job for job in JobSubmissionClient(head.dashboard).list_jobs() if job.type == "DRIVER"]
        assert any("tokenizer" in (job.entrypoint or "") for job in drivers), drivers

        head.stop()  # by PID; its address file stays behind
        assert head.address_file.read_text().strip() == address
        alone = raytrain(*command, "--out", str(tmp_path / "alone"), env=head.env)
        assert alone.returncode == 0, alone.stderr
        assert "Ray: started a local Ray for this command" in alone.stderr
        assert f"{head.address_file} names {address}, where no Ray answers" in alone.stderr
        assert head.wait_gone(10), "the command's own Ray must stop with it"
    finally:
        head.remove()
    assert os.environ["RAY_TMPDIR"] != head.tmpdir  # the suite never looked at that cluster's files
