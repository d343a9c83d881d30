"""`raytrain submit jobs/X.yaml`: a job spec to a Ray cluster's job server, its logs streamed to the terminal, the
job's final status as the exit code.

A job spec (jobs/*.yaml) holds what `ray job submit` takes: `entrypoint` (one command line; `key=value` arguments
given to `raytrain submit` are appended to it, so they override the last raytrain command's config),
`runtime_env` (a file, relative to the spec, or a mapping), `entrypoint_num_cpus`, `entrypoint_num_gpus`,
`entrypoint_memory`, `entrypoint_resources` and `metadata`. A relative `working_dir` in the runtime env is
relative to where raytrain submit runs, as with `ray job submit --runtime-env`.

Secrets stay out of the job: the spec, its runtime env and its metadata are readable by anyone who can reach
the dashboard, so W&B and cloud keys belong in the cluster nodes' environment, and the Ray token (a head with
token authentication) is read from RAY_AUTH_TOKEN or the token file by Ray's own client, never written.
"""

from __future__ import annotations

import argparse
import asyncio
import difflib
import os
import shlex
import time
import uuid
from pathlib import Path

import yaml

from raytrain.errors import ConfigError

SPEC_KEYS = ("entrypoint", "runtime_env", "entrypoint_num_cpus", "entrypoint_num_gpus", "entrypoint_memory",
             "entrypoint_resources", "metadata")
DEFAULT_DASHBOARD = "http://127.0.0.1:8265"
# The exit code of `raytrain submit` for each final job status (2 stays raytrain's own "bad input").
EXIT_CODES = {"SUCCEEDED": 0, "FAILED": 1, "STOPPED": 3}


def read_job_spec(path: str | Path, overrides: list[str]) -> dict:
    """The spec's submit_job arguments: runtime_env loaded, overrides appended to the entrypoint."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"job spec '{path}' not found; the specs are in jobs/ (e.g. jobs/pretrain-demo.yaml)")
    spec = _load_yaml(path)
    for key in spec:
        if key not in SPEC_KEYS:
            close = difflib.get_close_matches(key, SPEC_KEYS, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f"; a job spec takes {', '.join(SPEC_KEYS)}"
            raise ConfigError(f"{path}: unknown key '{key}'{hint}")
    if not isinstance(spec.get("entrypoint"), str) or not spec["entrypoint"].strip():
        raise ConfigError(f"{path}: 'entrypoint' must be the command line the job runs")
    runtime_env = spec.get("runtime_env") or {}
    if isinstance(runtime_env, str):
        env_file = path.parent / runtime_env
        if not env_file.is_file():
            raise ConfigError(f"{path}: runtime_env file '{env_file}' not found")
        runtime_env = _load_yaml(env_file)
    entrypoint = " ".join([spec["entrypoint"].strip(), *map(shlex.quote, overrides)])
    metadata = {str(k): str(v) for k, v in (spec.get("metadata") or {}).items()}
    return {**{k: v for k, v in spec.items() if k != "metadata"}, "entrypoint": entrypoint,
            "runtime_env": runtime_env, "metadata": {**metadata, "raytrain_job_spec": path.name}}


def _load_yaml(path: Path) -> dict:
    try:
        loaded = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML ({str(error).splitlines()[0]})") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: expected a mapping of keys")
    return loaded


def job_server(address: str | None) -> str:
    """--address, else an http(s) $RAY_API_SERVER_ADDRESS or $RAY_ADDRESS, else the local default dashboard."""
    if address:
        if not address.startswith(("http://", "https://")):
            raise ConfigError(f"--address {address} is not a job server; give the dashboard's URL, e.g. "
                              f"{DEFAULT_DASHBOARD}")
        return address
    for name in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"):
        if os.environ.get(name, "").startswith(("http://", "https://")):
            return os.environ[name]
    return DEFAULT_DASHBOARD


def submit_command(args: argparse.Namespace) -> int:
    from ray.job_submission import JobSubmissionClient

    spec = read_job_spec(args.spec, args.overrides)
    address = job_server(args.address)
    submission_id = f"raytrain-{Path(args.spec).stem}-{uuid.uuid4().hex[:8]}"
    try:  # any failure to reach or use the job server (refused, no such host, no or a wrong token) is one line
        client = JobSubmissionClient(address)
        client.submit_job(submission_id=submission_id, **spec)
    except Exception as error:
        reason = next((line for line in str(error).splitlines() if line.strip()), type(error).__name__)
        raise ConfigError(f"cannot submit to the Ray job server at {address}: {reason[:300]}; check --address, and "
                          "with token authentication RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (or "
                          "RAY_AUTH_TOKEN_PATH)") from None
    print(f"submitted {submission_id} to {address}: {spec['entrypoint']}", flush=True)
    if args.no_wait:
        print(f"follow: ray job logs --follow {submission_id} --address {address}\n"
              f"stop:   ray job stop {submission_id} --address {address}")
        return 0
    started = time.monotonic()
    try:
        asyncio.run(_stream_logs(client, submission_id))
    except KeyboardInterrupt:
        print(f"\nraytrain: stopped following {submission_id}; it keeps running. Stop it with "
              f"`ray job stop {submission_id} --address {address}`")
        return 130
    status = str(client.get_job_status(submission_id).value)
    print(f"job {submission_id} {status} after {time.monotonic() - started:.0f}s")
    return EXIT_CODES.get(status, 1)


async def _stream_logs(client, submission_id: str) -> None:
    async for lines in client.tail_job_logs(submission_id):
        print(lines, end="", flush=True)
