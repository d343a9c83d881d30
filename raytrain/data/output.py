"""Output folders that appear only when complete: build in a sibling temp folder, then rename (on an object
store, which has no rename: copy into place with the done marker last, then delete the temp prefix)."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

from raytrain import storage
from raytrain.errors import DataError


def check_output_dir(out: str | Path, done_marker: str, overwrite: bool) -> None:
    """Refuse to clobber finished work or folders raytrain did not write."""
    if storage.is_uri(out):
        _check_uri_output(str(out), done_marker, overwrite)
        return
    out = Path(out)
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


def _check_uri_output(out: str, done_marker: str, overwrite: bool) -> None:
    files = storage.list_files(out)
    if done_marker in files and not overwrite:
        raise DataError(f"output '{out}' already holds a finished result ({done_marker}); pass --overwrite to "
                        "replace it or choose another --out")
    if files and done_marker not in files:
        raise DataError(f"output '{out}' is not empty and holds no {done_marker}; choose an empty or new --out")


@contextlib.contextmanager
def atomic_output_dir(out: str | Path, done_marker: str, overwrite: bool) -> Iterator[str | Path]:
    """Yield a temp folder (a temp prefix for a URI); on success it replaces `out`, on failure it is removed."""
    check_output_dir(out, done_marker, overwrite)
    if storage.is_uri(out):
        with _atomic_uri_output(str(out), done_marker) as tmp:
            yield tmp
        return
    out = Path(out)
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


@contextlib.contextmanager
def local_output_dir(out: str | Path, done_marker: str, overwrite: bool) -> Iterator[Path]:
    """atomic_output_dir for writers that need a local folder (onnx, onnxruntime's quantizer): a URI's result is
    built in a local temp folder, then uploaded the same way."""
    if not storage.is_uri(out):
        with atomic_output_dir(out, done_marker, overwrite) as tmp:
            yield Path(tmp)
        return
    with atomic_output_dir(out, done_marker, overwrite) as staged, \
            tempfile.TemporaryDirectory(prefix="raytrain-out-") as local:
        yield Path(local)
        storage.copy_tree(local, staged)


@contextlib.contextmanager
def _atomic_uri_output(out: str, done_marker: str) -> Iterator[str]:
    """The staging prefix beside out; copied into place marker last (readers take out as complete only then)."""
    parent, name = out.rstrip("/").rsplit("/", 1)
    tmp = f"{parent}/.{name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        yield tmp
        files = storage.list_files(tmp)
        if done_marker not in files:
            raise RuntimeError(f"internal error: {done_marker} was not written")
        storage.delete(out)  # an older result (--overwrite): its marker goes first
        filesystem, inner = storage.resolve(tmp)
        _, target = storage.resolve(out)
        for relative in sorted(files, key=lambda f: f == done_marker):
            filesystem.copy_file(f"{inner}/{relative}", f"{target}/{relative}")
    finally:
        storage.delete(tmp)
