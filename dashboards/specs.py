"""Workspaces out of the process: JSON specs written and read offline, or saved to W&B."""

from __future__ import annotations

import json
import netrc
import os
from pathlib import Path
from urllib.parse import urlsplit

import pydantic
import wandb_workspaces.workspaces as ws
from wandb_workspaces.workspaces import internal

from dashboards.workspaces import all_workspaces
from raytrain.errors import ConfigError, DataError

NO_KEY = ("publishing dashboards needs a W&B API key: set WANDB_API_KEY (or run `wandb login`); "
          "`raytrain dashboards export --out DIR` writes the specs offline")


def export_specs(out: Path, entity: str, project: str, sweeps: list[str | Path]) -> list[Path]:
    """OUT/<family>.json and OUT/sweep-<name>.json, one per workspace; returns the files written."""
    out = Path(out)
    built = all_workspaces(entity, project, sweeps)  # every sweep folder is read before any file is written
    if out.exists() and not out.is_dir():
        raise DataError(f"{out} is a file; --out names the folder the specs go in")
    out.mkdir(parents=True, exist_ok=True)
    return [_write_json(out / f"{slug}.json", workspace._spec) for slug, workspace in built.items()]


def load_spec(path: Path) -> ws.Workspace:
    """The workspace of a spec `export_specs` wrote, rebuilt offline."""
    path = Path(path)
    try:
        tree = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise DataError(f"cannot read the workspace spec '{path}': {exc.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: invalid JSON ({exc}); write it again with `raytrain dashboards export`") from None
    try:
        return ws.Workspace._from_model(internal.View.model_validate(tree))
    except pydantic.ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise DataError(f"{path}: not a W&B workspace spec ({where}: {first['msg']}); write it again with "
                        "`raytrain dashboards export`") from None


def publish(entity: str, project: str, sweeps: list[str | Path]) -> list[str]:
    """Saves every workspace to W&B as a new view of ENTITY/PROJECT; returns their URLs."""
    if not has_api_key():
        raise ConfigError(NO_KEY)
    if not entity:
        raise ConfigError("publishing dashboards needs --entity: the W&B user or team that owns the project")
    built = all_workspaces(entity, project, sweeps)
    return [workspace.save().url for workspace in built.values()]


def has_api_key() -> bool:
    """Whether W&B would find credentials, as it looks for them, without the network: WANDB_API_KEY, an identity
    token file, or the netrc entry `wandb login` writes for the server's host."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlsplit(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").netloc
    path = Path(os.environ.get("NETRC") or "~/.netrc").expanduser()
    try:
        entry = netrc.netrc(path).authenticators(host)
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(entry and entry[2])


def _write_json(path: Path, tree: dict) -> Path:
    """Temp file in the same folder, then rename: a reader never sees half a spec. (Not mkstemp: its files are
    owner-only, and a spec is meant to be shared.)"""
    text = json.dumps(tree, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
