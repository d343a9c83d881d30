"""An export folder: the graphs, their weights (`weights.bin`), the tokenizer (with the chat template) and
`raytrain-onnx.json`.

The graphs hold no large weights of their own: every initializer of INLINE_BYTES or more is ONNX external data in
the one file weights.bin, each distinct tensor once (the prefill and decode graphs' weights are the same bytes, so
both point at the same offsets), at 64-byte aligned offsets; smaller ones (norm scales, shapes) stay inline. A
folder of any size is then the weights once, and no file comes near protobuf's 2 GiB limit.

raytrain-onnx.json is written last (an export appears only when complete) and says what the folder holds: the
format version, the model kind and shape, each graph's inputs and outputs with their axes, the weights file, the
special tokens, the longest sequence the graphs take, the quantization, and the checkpoint it came from.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import onnx
from onnx.external_data_helper import ExternalDataInfo

from raytrain import storage
from raytrain.data.tokenizer import TOKENIZER_FILE
from raytrain.errors import DataError

CONFIG_FILE = "raytrain-onnx.json"
FORMAT = "raytrain.onnx/2"
WEIGHTS_FILE = "weights.bin"
INLINE_BYTES = 1024  # initializers smaller than this stay inside their graph
ALIGNMENT = 64  # each tensor's offset in weights.bin: what SIMD loads of a memory-mapped file want
CHUNK = 64 << 20  # bytes read at once while hashing and copying a tensor
EXPORT_HINT = "`raytrain export onnx CKPT|RUN --out DIR`"


def write_config(folder: Path, config: dict) -> None:
    (folder / CONFIG_FILE).write_text(json.dumps({"format": FORMAT, "weights": WEIGHTS_FILE, **config}, indent=2))


def read_config(folder: str | Path) -> dict:
    """The folder's (or URI's) config, once it is known to be a complete export of this version."""
    path = storage.join(folder, CONFIG_FILE)
    if not storage.is_file(path):
        what = "does not exist" if not storage.exists(folder) else f"is not an ONNX export (no {CONFIG_FILE})"
        raise DataError(f"'{folder}' {what}; make one with {EXPORT_HINT}")
    try:
        config = json.loads(storage.read_text(path))
    except json.JSONDecodeError as error:
        raise DataError(f"{path}: not valid JSON ({error}); export again with {EXPORT_HINT}") from None
    if config.get("format") != FORMAT:
        raise DataError(f"'{folder}' was exported in format {config.get('format')!r} (raytrain "
                        f"{config.get('raytrain_version', '?')}); this raytrain reads {FORMAT}: export it again "
                        f"with {EXPORT_HINT}")
    files = [*config["graphs"], config["weights"], TOKENIZER_FILE]
    missing = [name for name in files if not storage.is_file(storage.join(folder, name))]
    if missing:
        raise DataError(f"'{folder}' lacks {', '.join(missing)}; copy the whole folder, or export again with "
                        f"{EXPORT_HINT}")
    return config


def folder_bytes(folder: Path, graphs: dict | list) -> int:
    """The size of the graphs and their weights."""
    return sum((folder / name).stat().st_size for name in [*graphs, WEIGHTS_FILE])


class WeightsFile:
    """weights.bin being written (at `path`): each distinct content once, at the next ALIGNMENT boundary."""

    def __init__(self, path: Path):
        self.file = path.open("wb")
        self.stored: dict[bytes, tuple[int, int]] = {}  # content digest → (offset, length)

    def __enter__(self) -> WeightsFile:
        return self

    def __exit__(self, *_) -> None:
        self.file.close()

    def add(self, chunks: Callable[[], Iterable[bytes | memoryview]]) -> tuple[int, int]:
        """(offset, length) of the content that chunks() yields: where it was stored before, or where it is
        written now (chunks() is called twice then: once to hash it, once to copy it)."""
        digest, length = hashlib.sha256(), 0
        for chunk in chunks():
            digest.update(chunk)
            length += len(chunk)
        key = digest.digest()
        if key not in self.stored:
            end = self.file.tell()
            self.file.write(b"\0" * (-end % ALIGNMENT))
            self.stored[key] = (self.file.tell(), length)
            for chunk in chunks():
                self.file.write(chunk)
        return self.stored[key]


def share_weights(folder: Path, graphs: dict | list) -> None:
    """Move the large tensors of the folder's graphs (inline, or external data in any files beside them: what
    onnxruntime's quantizers write) into weights.bin, each distinct content once, and delete the files they came
    from. A tensor at a time: the graphs are read without their weights, which are copied in CHUNKs."""
    staged = folder / f".{WEIGHTS_FILE}.tmp"  # the graphs may read from an earlier weights.bin
    sources: set[str] = set()
    with WeightsFile(staged) as weights:
        for name in graphs:
            model = onnx.load(folder / name, load_external_data=False)
            for tensor in _tensors(model.graph):
                if tensor.data_location == onnx.TensorProto.EXTERNAL:
                    info = ExternalDataInfo(tensor)
                    sources.add(info.location)
                    source = folder / info.location
                    length = info.length if info.length is not None else source.stat().st_size - info.offset
                    chunks = functools.partial(_read, source, info.offset, length)
                elif tensor.HasField("raw_data") and len(tensor.raw_data) >= INLINE_BYTES:
                    chunks = functools.partial(iter, [tensor.raw_data])
                else:
                    continue  # small, or inline in typed fields (the exporters write raw_data for large tensors)
                external(tensor, *weights.add(chunks))
            onnx.save_model(model, folder / name)
    for location in sources - {WEIGHTS_FILE}:
        (folder / location).unlink(missing_ok=True)
    staged.replace(folder / WEIGHTS_FILE)


def external(tensor: onnx.TensorProto, offset: int, length: int) -> None:
    """Make the tensor's data `length` bytes at `offset` in weights.bin."""
    tensor.ClearField("raw_data")
    del tensor.external_data[:]
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", WEIGHTS_FILE), ("offset", offset), ("length", length)):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, str(value)


def _tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """The graph's initializers and tensor attributes (Constant nodes' values), its subgraphs' too."""
    yield from graph.initializer
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t
            yield from attribute.tensors
            for subgraph in [attribute.g] if attribute.HasField("g") else attribute.graphs:
                yield from _tensors(subgraph)


def _read(source: Path, offset: int, length: int) -> Iterator[bytes]:
    with source.open("rb") as file:
        file.seek(offset)
        while length > 0:
            chunk = file.read(min(CHUNK, length))
            if not chunk:
                raise DataError(f"{source} ends {length} bytes before its tensors do; export again")
            length -= len(chunk)
            yield chunk
