"""An export folder: the graphs, the tokenizer (with the chat template) and `raytrain-onnx.json`.

raytrain-onnx.json is written last (an export appears only when complete) and says what the folder holds: the
format version, the model kind and shape, each graph's inputs and outputs with their axes, the special tokens,
the longest sequence the graphs take, the quantization, and the checkpoint it came from.
"""

from __future__ import annotations

import json
from pathlib import Path

from raytrain import storage
from raytrain.data.tokenizer import TOKENIZER_FILE
from raytrain.errors import DataError

CONFIG_FILE = "raytrain-onnx.json"
FORMAT = "raytrain.onnx/1"
EXPORT_HINT = "`raytrain export onnx CKPT|RUN --out DIR`"


def write_config(folder: Path, config: dict) -> None:
    (folder / CONFIG_FILE).write_text(json.dumps({"format": FORMAT, **config}, indent=2))


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
    missing = [name for name in [*config["graphs"], TOKENIZER_FILE] if not storage.is_file(storage.join(folder, name))]
    if missing:
        raise DataError(f"'{folder}' lacks {', '.join(missing)}; copy the whole folder, or export again with "
                        f"{EXPORT_HINT}")
    return config
