"""A user's `ray start --head` for tests: its own temp dir and ports, stopped by PID (`ray stop` would stop
every Ray on the machine, the suite's and anyone else's)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class RayHead:
    """`ray start --head` whose processes all carry RAY_TMPDIR=<its own dir>, which is how they are found again."""

    def __init__(self, num_cpus: int = 2):
        # Short: Ray's socket paths under the temp dir must fit in 107 bytes.
        self.tmpdir = tempfile.mkdtemp(prefix="rt-head-")
        self.env = {**os.environ, "RAY_TMPDIR": self.tmpdir}
        self.port, self.dashboard_port = free_port(), free_port()
        self.num_cpus = num_cpus

    @property
    def address_file(self) -> Path:
        return Path(self.tmpdir) / "ray" / "ray_current_cluster"

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def start(self) -> str:
        ray = str(Path(sys.executable).with_name("ray"))
        subprocess.run([ray, "start", "--head", "--port", str(self.port), "--dashboard-host", "127.0.0.1",
                        "--dashboard-port", str(self.dashboard_port),
                        "--dashboard-agent-listen-port", str(free_port()),
                        "--ray-client-server-port", str(free_port()), "--num-cpus", str(self.num_cpus),
                        "--disable-usage-stats"],
                       env=self.env, check=True, capture_output=True, timeout=120)
        return self.address_file.read_text().strip()

    def pids(self) -> list[int]:
        needle = f"RAY_TMPDIR={self.tmpdir}".encode()
        found = []
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
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
        raise AssertionError(f"Ray processes of {self.tmpdir} survived SIGKILL")

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.tmpdir, ignore_errors=True)
