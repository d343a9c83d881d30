"""Which Ray a command uses, and keeping Ray's own chatter off the terminal.

The rule (README, "Ray: local or cluster"): `--address`/`runtime.address`, else `$RAY_ADDRESS`,
else the local cluster a `ray start --head` recorded, if it still answers, else a new local Ray
that lives as long as the command. One line says which.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import socket
import tempfile
from dataclasses import dataclass

import ray

from raytrain.config import RuntimeConfig
from raytrain.errors import ConfigError

log = logging.getLogger("raytrain")
DASHBOARD_PORT = 8265  # Ray's default; the first free port from here is taken
# Ray-internal lines that only alarm a user at the default log level (runtime.log_level brings them back):
# Ray Data and Ray Train create restartable actors whose constructor arguments sit in the object store;
# A sweep's trials start many small actors at once, which the raylet warns of as "worker processes started".
FORWARDED_NOISE = re.compile(r"core_worker\.cc:\d+: Actor with class name: .* has constructor arguments in the "
                             r"object store and max_restarts > 0|PYTHON worker processes have been started on node")


@dataclass(frozen=True)
class RayTarget:
    """Where a command's Ray comes from: `address` None means start a local one."""

    address: str | None
    source: str


def local_num_cpus(config: RuntimeConfig) -> int:
    # More logical CPUs than cores: Ray Data tasks must find room beside busy workers.
    return config.num_cpus or max(4, 2 * (os.cpu_count() or 1))


def find_ray(config: RuntimeConfig) -> RayTarget:
    """Apply the rule above; a recorded address that no longer answers is a stale file, not a cluster."""
    if config.address:
        return RayTarget(None if config.address == "local" else config.address, "runtime.address / --address")
    if os.environ.get("RAY_ADDRESS"):
        address = os.environ["RAY_ADDRESS"]
        return RayTarget(None if address == "local" else address, "$RAY_ADDRESS")
    from ray._common.utils import get_ray_address_file

    address_file = get_ray_address_file(None)  # honours $RAY_TMPDIR, as `ray start` does
    try:
        with open(address_file) as f:
            recorded = f.read().strip()
    except OSError:
        return RayTarget(None, "no running local cluster")
    if recorded and gcs_answers(recorded):
        return RayTarget(recorded, f"the running local cluster recorded in {address_file}")
    return RayTarget(None, f"{address_file} names {recorded or 'nothing'}, where no Ray answers")


def gcs_answers(address: str, timeout_s: float = 1.0) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            return True
    except (OSError, ValueError):
        return False


def init_ray(config: RuntimeConfig) -> None:
    """Start or join Ray once per process; later calls reuse the connection."""
    if ray.is_initialized():
        configure_ray_data(config)
        return
    level = getattr(logging, config.log_level.upper())
    target = find_ray(config)
    if target.address is None:
        start_local_ray(config, level)
        log.info("Ray: started a local Ray for this command (%g CPUs; %s); dashboard %s",
                 cluster_cpus(), target.source, dashboard_url())
    else:
        try:
            ray.init(address=target.address, logging_level=level, log_to_driver=True)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise ConfigError(f"cannot connect to Ray at {target.address} (from {target.source}): "
                              f"{str(exc).splitlines()[0]}; check the address, or pass --address local "
                              "to start a private local Ray") from exc
        if config.num_cpus:
            log.warning("runtime.num_cpus applies only to a Ray that raytrain starts; this one has %g CPUs",
                        cluster_cpus())
        log.info("Ray: connected to %s (%s), %g CPUs; dashboard %s", target.address, target.source,
                 cluster_cpus(), dashboard_url() or "off")
    if level > logging.INFO:
        hide_forwarded_noise()
    configure_ray_data(config)


def start_local_ray(config: RuntimeConfig, level: int) -> None:
    """A Ray of this process's own, with its dashboard on 127.0.0.1 (the State API that frees stopped runs'
    placement groups needs it)."""
    # Two commands starting at once would both find the same port free: the probe and the start (ray.init
    # returns once the dashboard listens) hold a lock shared by every raytrain on this host.
    with open(os.path.join(tempfile.gettempdir(), "raytrain-ray-start.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        port = free_port(DASHBOARD_PORT)
        api = f"http://127.0.0.1:{port}"
        # Ray Train's placement-group cleaner finds "the" cluster's State API by guessing, which fails or picks
        # another cluster when two Rays run on one host. The cluster's processes inherit this and ask ours.
        with environ(RAY_API_SERVER_ADDRESS=api):
            ray.init(
                address="local",
                num_cpus=local_num_cpus(config),
                object_store_memory=int(config.object_store_gib * 2**30),
                include_dashboard=True,
                dashboard_host="127.0.0.1",
                dashboard_port=port,
                logging_level=level,
                configure_logging=True,
            )


def free_port(start: int) -> int:
    for port in range(start, start + 200):
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise ConfigError(f"no free port in {start}..{start + 199} for the Ray dashboard")


@contextlib.contextmanager
def environ(**values: str):
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def dashboard_url() -> str | None:
    """The connected cluster's dashboard (also the State API's address), if it runs one."""
    from ray._private.worker import get_dashboard_url

    url = get_dashboard_url()
    return (url if "://" in url else f"http://{url}") if url else None


def hide_forwarded_noise() -> None:
    """Drop FORWARDED_NOISE from what Ray prints on the driver: worker output (the dispatcher's printer) and the
    raylet's notices (the error listener calls `print_to_stdstream` itself)."""
    from ray._private import worker
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    printer = dict(dispatcher.handlers).get("ray_print_logs")
    if printer is not None and not getattr(printer, "hides_noise", False):
        dispatcher.remove_handler("ray_print_logs")
        dispatcher.add_handler("ray_print_logs", _without_noise(printer))
    if not getattr(worker.print_to_stdstream, "hides_noise", False):
        worker.print_to_stdstream = _without_noise(worker.print_to_stdstream)


def _without_noise(printer):
    def print_without_noise(batch: dict, **options) -> None:
        lines = [line for line in batch["lines"] if not FORWARDED_NOISE.search(line)]
        if lines:
            printer({**batch, "lines": lines}, **options)

    print_without_noise.hides_noise = True
    return print_without_noise


@contextlib.contextmanager
def native_noise_hidden():
    """While Ray Data runs actor pools from this process: drop FORWARDED_NOISE lines that Ray's C++ core worker
    writes to this process's stderr itself (every Ray Data actor pool takes its constructor arguments as object
    refs, and the core worker prints an error-level line for each such restartable actor, ray-project/ray#53727;
    the refs live as long as the pool, so the restarts it warns of work). Everything else passes through; the
    file descriptor is restored and every line written before leaving."""
    import sys
    import threading

    sys.stderr.flush()
    saved, (read_end, write_end) = os.dup(2), os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)

    def forward() -> None:
        """Pieces up to each newline or carriage return (progress bars redraw with the latter) pass on at once."""
        pending = b""
        while chunk := os.read(read_end, 65536):
            *pieces, pending = re.split(rb"(?<=[\r\n])", pending + chunk)
            for piece in pieces:
                if not FORWARDED_NOISE.search(piece.decode(errors="replace")):
                    os.write(saved, piece)
        os.write(saved, pending)
        os.close(read_end)

    thread = threading.Thread(target=forward, name="raytrain-stderr", daemon=True)
    thread.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)  # closes the pipe's last write end: the thread reads to its end
        thread.join(timeout=5)
        os.close(saved)


def configure_worker_logging(config: RuntimeConfig) -> None:
    """In a Train worker: raytrain's own lines, and other libraries' only from runtime.log_level up."""
    logging.getLogger().setLevel(getattr(logging, config.log_level.upper()))
    logging.getLogger("raytrain").setLevel(logging.INFO)


def configure_ray_data(config: RuntimeConfig) -> None:
    from ray.data import DataContext

    context = DataContext.get_current()
    context.enable_progress_bars = config.progress
    # Deterministic output order: the same input always yields the same shards.
    context.execution_options.preserve_order = True
    # Task errors reach the driver as themselves (a DataError keeps its one-line message);
    # Ray Data's own copies of the stack trace would only repeat what the CLI reports.
    context.raise_original_map_exception = True
    level = getattr(logging, config.log_level.upper())
    logging.getLogger("ray.data").setLevel(level)
    # Progress bars on a terminal when asked for; elsewhere Ray Data would log ten-line progress dumps instead,
    # kept for runtime.log_level=info. Without progress, "Progress bars disabled" is no news: raytrain chose it.
    quiet = not config.progress and level > logging.INFO
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR if quiet else level)
    for name in ("ray.data.exceptions", "ray.data._internal.execution.streaming_executor_state"):
        logging.getLogger(name).setLevel(logging.CRITICAL)


def cluster_cpus() -> int:
    return int(ray.cluster_resources().get("CPU", 1))
