"""A local multi-node Ray cluster for development: a head with its dashboard (the job server) plus worker nodes,
each a `ray start` of its own, on ports and in a temp dir of their own, stopped by PID.

    python -m cluster.local start [--nodes 2] [--cpus 2] [--no-token]   # prints the address and how to submit
    python -m cluster.local status
    python -m cluster.local stop

`ray stop` would kill every Ray process on the machine (another checkout's cluster, a test suite's); this
cluster's processes are the ones whose environment holds its RAY_TMPDIR, and only they are stopped. The cluster
is recorded in .ray-local/cluster.json (--state to put it elsewhere); its address file lies in its own temp dir,
so a plain `ray.init()` elsewhere does not join it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STATE = Path(".ray-local")
START_TIMEOUT_S = 180


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class LocalCluster:
    """`ray start --head` plus `nodes - 1` `ray start --address` nodes whose processes all carry
    RAY_TMPDIR=<its own dir>, which is how they are found again."""

    def __init__(self, nodes: int = 1, cpus: int = 2, tmpdir: str | None = None, port: int | None = None,
                 dashboard_port: int | None = None, token_file: str | None = None, node_env: dict | None = None):
        """token_file: turn on Ray's token authentication with the token in this file (RAY_AUTH_TOKEN_PATH; every
        client then needs RAY_AUTH_MODE=token and the same file or RAY_AUTH_TOKEN). node_env: more environment
        for the nodes (and so for every job and worker), as a cloud cluster's nodes hold keys."""
        # Short: Ray's socket paths under the temp dir must fit in 107 bytes.
        self.tmpdir = tmpdir or tempfile.mkdtemp(prefix="rt-local-")
        self.token_file = token_file
        self.env = {**os.environ, **(node_env or {}), "RAY_TMPDIR": self.tmpdir}
        if token_file:
            self.env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=token_file)
            self.env.pop("RAY_AUTH_TOKEN", None)
        else:
            self.env.setdefault("RAY_AUTH_MODE", "disabled")
        for name in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):  # a node joins this head, never another
            self.env.pop(name, None)
        # Jobs' entrypoints (`python -m raytrain …`) find this Python first: the one raytrain is installed in.
        self.env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), self.env.get("PATH", "")])
        self.nodes, self.cpus = nodes, cpus
        self.port, self.dashboard_port = port or free_port(), dashboard_port or free_port()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def address_file(self) -> Path:
        return Path(self.tmpdir) / "ray" / "ray_current_cluster"

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def start(self) -> str:
        """Start the head, then the other nodes; the GCS address. Any failure stops what was started."""
        try:
            self._ray_start("--head", "--port", str(self.port), "--dashboard-host", "127.0.0.1",
                            "--dashboard-port", str(self.dashboard_port), "--ray-client-server-port",
                            str(free_port()), "--node-ip-address", "127.0.0.1")
            for node in range(1, self.nodes):
                self._ray_start("--address", self.address, "--node-ip-address", "127.0.0.1",
                                "--resources", json.dumps({f"local_node_{node}": 1}))
        except BaseException:
            self.stop()
            raise
        return self.address_file.read_text().strip()

    def _ray_start(self, *flags: str) -> None:
        ray = str(Path(sys.executable).with_name("ray"))
        # Every node gets its own agent port: the default (52365) would clash between nodes and clusters.
        command = [ray, "start", *flags, "--num-cpus", str(self.cpus), "--dashboard-agent-listen-port",
                   str(free_port()), "--disable-usage-stats"]
        done = subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=START_TIMEOUT_S)
        if done.returncode:
            raise RuntimeError(f"`{' '.join(command)}` failed: {(done.stderr or done.stdout).strip()[-2000:]}")

    def pids(self) -> list[int]:
        needle = f"RAY_TMPDIR={self.tmpdir}".encode()
        found = []
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit() or int(proc.name) == os.getpid():
                continue
            try:
                if needle in (proc / "environ").read_bytes().split(b"\0"):
                    found.append(int(proc.name))
            except OSError:  # gone, or not ours to read
                continue
        return found

    def wait_gone(self, timeout_s: float) -> bool:
        """Whether every process of this temp dir is gone within `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while self.pids() and time.monotonic() < deadline:
            time.sleep(0.2)
        return not self.pids()

    def stop(self, grace_s: float = 3.0) -> None:
        """SIGTERM, then SIGKILL what is left; the address file stays behind, as after a crash."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in self.pids():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            if self.wait_gone(grace_s):
                return
        raise RuntimeError(f"Ray processes of {self.tmpdir} survived SIGKILL")

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.tmpdir, ignore_errors=True)

    def record(self) -> dict:
        return {"tmpdir": self.tmpdir, "nodes": self.nodes, "cpus": self.cpus, "port": self.port,
                "dashboard_port": self.dashboard_port, "token_file": self.token_file}

    @classmethod
    def recorded(cls, state: Path) -> LocalCluster:
        path = state / "cluster.json"
        if not path.is_file():
            raise SystemExit(f"cluster/local.py: no cluster recorded in {path}; start one with "
                             "`python -m cluster.local start`")
        return cls(**json.loads(path.read_text()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.local", description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=["start", "status", "stop"])
    parser.add_argument("--nodes", type=int, default=2, help="Ray nodes, the head included (default 2)")
    parser.add_argument("--cpus", type=int, default=2, help="logical CPUs per node (default 2)")
    parser.add_argument("--state", type=Path, default=STATE, help="where the cluster is recorded (.ray-local)")
    parser.add_argument("--no-token", action="store_true", help="turn off token authentication (on by default, "
                                                                "as Ray 2.60 does: a new token in STATE/auth_token)")
    args = parser.parse_args(argv)
    if args.action == "start":
        if (args.state / "cluster.json").is_file() and LocalCluster.recorded(args.state).pids():
            raise SystemExit(f"cluster/local.py: a cluster recorded in {args.state} is running; stop it first")
        args.state.mkdir(parents=True, exist_ok=True)
        token_file = None
        if not args.no_token:  # readable by this user only; clients point RAY_AUTH_TOKEN_PATH at it
            token_file = str((args.state / "auth_token").absolute())
            descriptor = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(descriptor, "w") as f:
                f.write(secrets.token_hex(32))
        cluster = LocalCluster(args.nodes, args.cpus, token_file=token_file)
        cluster.start()
        (args.state / "cluster.json").write_text(json.dumps(cluster.record(), indent=2))
        print(f"Ray cluster of {args.nodes} node(s) × {args.cpus:g} CPUs: address {cluster.address}, dashboard "
              f"and job server {cluster.dashboard}\n"
              f"  submit: raytrain submit jobs/pretrain-tiny.yaml --address {cluster.dashboard} ...\n"
              f"      or: ray job submit --address {cluster.dashboard} --runtime-env jobs/runtime_env.yaml -- "
              "python -m raytrain ...\n"
              f"  train here: raytrain pretrain --address {cluster.address} ...\n"
              "  stop:   python -m cluster.local stop")
        if token_file:
            print(f"  token authentication is on; in every client's shell: export RAY_AUTH_MODE=token "
                  f"RAY_AUTH_TOKEN_PATH={token_file}")
        return 0
    cluster = LocalCluster.recorded(args.state)
    if args.action == "status":
        pids = cluster.pids()
        print(f"{'running' if pids else 'stopped'}: {len(pids)} Ray processes of {cluster.tmpdir}; "
              f"address {cluster.address}, dashboard {cluster.dashboard}")
        return 0 if pids else 1
    cluster.remove()
    (args.state / "cluster.json").unlink()
    print(f"stopped the cluster of {cluster.tmpdir} (its processes only)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
