"""Output folders that appear only when complete: build in a sibling temp folder, then rename."""

from __future__ import annotations

import contextlib
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from raytrain.errors import DataError


def check_output_dir(out: Path, done_marker: str, overwrite: bool) -> None:
    """Refuse to clobber finished work or folders raytrain did not write."""
    if not out.exists():
        return
    if not out.is_dir():
        raise DataError(f"output '{out}' is a file; choose a folder path for --out")
    if (out / done_marker).exists():
        if not overwrite:
            raise DataError(
                f"output '{out}' already holds a finished result ({done_marker}); "
                "pass --overwrite to replace it or choose another --out"
            )
        return
    if any(out.iterdir()):
        raise DataError(
            f"output '{out}' is not empty and holds no {done_marker}; "
            "choose an empty or new folder for --out"
        )


@contextlib.contextmanager
def atomic_output_dir(out: Path, done_marker: str, overwrite: bool) -> Iterator[Path]:
    """Yield a temp folder; on success it replaces `out`, on failure it is removed."""
    check_output_dir(out, done_marker, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        if not (tmp / done_marker).exists():
            raise RuntimeError(f"internal error: {done_marker} was not written")
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        if out.exists():
            out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
