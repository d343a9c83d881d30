"""Paths that are local folders or URIs pyarrow understands (s3://, gs://, hdfs://): what every input and output
path of raytrain may be, so that workers on other nodes read what the driver wrote.

A URI's file system comes from `pyarrow.fs.FileSystem.from_uri`, its credentials from the environment as
pyarrow reads them (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION, AWS_ENDPOINT_URL; Google's application
default credentials): they belong in the nodes' environment, never in a config or a job spec.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pyarrow.fs as pafs

from raytrain.errors import DataError


def is_uri(path: str | Path) -> bool:
    """Whether `path` names a file system by scheme (s3://…); file:// and plain paths are local."""
    text = str(path)
    return "://" in text and not text.startswith("file://")


def absolute(path: str | Path) -> str:
    """A URI as it is; a local path made absolute (workers and later commands may run elsewhere)."""
    return str(path).rstrip("/") if is_uri(path) else str(Path(path).absolute())


def require_local(path: str | Path, what: str, fix: str) -> None:
    """Refuse a URI where only a local folder makes sense (a report to open in a browser), naming what and the fix."""
    if is_uri(path):
        raise DataError(f"{what} must be a local folder, not the URI '{path}'; {fix}")


def resolve(path: str | Path) -> tuple[pafs.FileSystem, str]:
    """(file system, the path within it)."""
    if not is_uri(path):
        return pafs.LocalFileSystem(), os.path.abspath(str(path).removeprefix("file://"))
    try:
        return pafs.FileSystem.from_uri(str(path))
    except (pafs.ArrowInvalid, OSError) as error:  # unknown scheme, no credentials, no such bucket
        raise DataError(f"'{path}': {str(error).splitlines()[0]}") from None


def join(base: str | Path, *parts: str) -> str:
    """base/part/…, for a URI or a local path (Path would fold s3:// into s3:/)."""
    if is_uri(base):
        return posixpath.join(str(base).rstrip("/"), *parts)
    return str(Path(base, *parts))


def is_file(path: str | Path) -> bool:
    filesystem, inner = resolve(path)
    return filesystem.get_file_info(inner).type == pafs.FileType.File


def exists(path: str | Path) -> bool:
    filesystem, inner = resolve(path)
    return filesystem.get_file_info(inner).type != pafs.FileType.NotFound


def read_bytes(path: str | Path) -> bytes:
    filesystem, inner = resolve(path)
    with filesystem.open_input_stream(inner) as stream:
        return stream.read()


def read_text(path: str | Path) -> str:
    return read_bytes(path).decode()


def write_text(path: str | Path, text: str) -> None:
    """The whole file at once: one object on a URI (S3 writes it whole or not at all); a local file is written
    beside its place and renamed over it (its parent folders created), so a reader never sees half of it."""
    if is_uri(path):
        filesystem, inner = resolve(path)
        filesystem.create_dir(posixpath.dirname(inner), recursive=True)
        with filesystem.open_output_stream(inner) as stream:
            stream.write(text.encode())
        return
    target = Path(str(path).removeprefix("file://"))
    target.parent.mkdir(parents=True, exist_ok=True)
    staged = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    staged.write_text(text)
    staged.replace(target)


def open_input_file(path: str | Path):
    """A random-access file (what pyarrow.parquet.ParquetFile reads row groups from)."""
    filesystem, inner = resolve(path)
    return filesystem.open_input_file(inner)


def list_files(folder: str | Path) -> list[str]:
    """Every file under folder, as paths relative to it (empty if it does not exist)."""
    filesystem, inner = resolve(folder)
    if filesystem.get_file_info(inner).type == pafs.FileType.NotFound:
        return []
    selector = pafs.FileSelector(inner, recursive=True)
    return sorted(posixpath.relpath(info.path, inner) for info in filesystem.get_file_info(selector)
                  if info.type == pafs.FileType.File)


def delete(folder: str | Path) -> None:
    filesystem, inner = resolve(folder)
    if filesystem.get_file_info(inner).type != pafs.FileType.NotFound:
        filesystem.delete_dir(inner)


def copy_tree(source: str | Path, target: str | Path) -> None:
    """Every file of source under target (any file system to any other)."""
    source_fs, source_inner = resolve(source)
    target_fs, target_inner = resolve(target)
    for relative in {posixpath.dirname(name) for name in list_files(source)}:  # a local target needs its folders
        target_fs.create_dir(posixpath.join(target_inner, relative), recursive=True)
    pafs.copy_files(source_inner, target_inner, source_filesystem=source_fs, destination_filesystem=target_fs)


@contextlib.contextmanager
def local_copy(path: str | Path, skip: tuple[str, ...] = ()) -> Iterator[Path]:
    """A local folder holding path's files, for readers that need files (DCP, a report): the folder itself, or a
    URI's files (but those inside folders named in `skip`) copied to a temp folder of the same name, removed
    afterwards."""
    if not is_uri(path):
        yield Path(str(path).removeprefix("file://"))
        return
    wanted = [name for name in list_files(path) if not set(name.split("/")[:-1]) & set(skip)]
    if not wanted:
        raise DataError(f"'{path}' does not exist or holds no files")
    source_fs, source_inner = resolve(path)
    with tempfile.TemporaryDirectory(prefix="raytrain-copy-") as temp:
        local = Path(temp, posixpath.basename(source_inner))
        for name in wanted:
            target = local / name
            target.parent.mkdir(parents=True, exist_ok=True)
            pafs.copy_files(posixpath.join(source_inner, name), str(target), source_filesystem=source_fs,
                            destination_filesystem=pafs.LocalFileSystem())
        yield local
