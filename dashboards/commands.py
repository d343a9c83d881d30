"""`raytrain dashboards export|publish`. The W&B libraries load when a command runs, not when the CLI parses."""

from __future__ import annotations

import argparse
from pathlib import Path


def export(args: argparse.Namespace) -> list[Path]:
    from dashboards.specs import export_specs
    from raytrain import storage

    storage.require_local(args.out, "--out of dashboards export", "write the specs here, then copy them")
    paths = export_specs(Path(args.out), args.entity, args.project, _sweeps(args))
    for path in paths:
        print(path)
    return paths


def publish(args: argparse.Namespace) -> list[str]:
    from dashboards.specs import publish as publish_specs

    urls = publish_specs(args.entity, args.project, _sweeps(args))
    for url in urls:
        print(url)
    return urls


def _sweeps(args: argparse.Namespace) -> list[str]:
    return list(args.sweep or [])  # folders or URIs: only their sweep.yaml is read
