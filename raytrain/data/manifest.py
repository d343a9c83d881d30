"""The manifest of a prepared dataset: what the shards hold and how they were made."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from raytrain import storage
from raytrain.errors import DataError

MANIFEST_FILE = "manifest.json"
FORMAT = "raytrain.tokens/1"
SPLITS = ("train", "val")
# Each kind of prepared data and the command that writes it.
DATA_COMMANDS = {"pretrain": "raytrain data prepare", "sft": "raytrain data sft", "prefs": "raytrain data prefs",
                 "kto": "raytrain data kto"}


@dataclass(frozen=True)
class SplitShards:
    """The shards of one split, in global row order."""

    paths: tuple[str, ...]  # absolute
    rows: tuple[int, ...]
    rows_per_row_group: int

    @property
    def num_rows(self) -> int:
        return sum(self.rows)

    def locate(self, row_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Global row ids → (shard index, row within shard)."""
        starts = np.cumsum((0, *self.rows))
        shard = np.searchsorted(starts, row_ids, side="right") - 1
        return shard, row_ids - starts[shard]


@dataclass(frozen=True)
class PreparedDataset:
    root: str  # an absolute folder, or a URI
    manifest: dict

    @classmethod
    def open(cls, folder: str | Path) -> PreparedDataset:
        root = storage.absolute(folder)
        path = storage.join(root, MANIFEST_FILE)
        if not storage.is_file(path):
            raise DataError(
                f"'{folder}' is not a prepared dataset (no {MANIFEST_FILE}); "
                f"create one with `raytrain data prepare --out {folder} ...`"
            )
        manifest = json.loads(storage.read_text(path))
        if manifest.get("format") != FORMAT:
            raise DataError(
                f"{path}: format {manifest.get('format')!r} is not {FORMAT!r}; "
                "prepare the data again with this raytrain"
            )
        return cls(root, manifest)

    @property
    def kind(self) -> str:
        """What the rows are for: "pretrain" (packed documents) or "sft" (one conversation a row, loss_mask)."""
        return self.manifest.get("kind", "pretrain")

    @property
    def columns(self) -> tuple[str, ...]:
        return tuple(self.manifest.get("columns", ["tokens"]))

    @property
    def objective_options(self) -> dict:
        """What an objective must know of the rows beside the special tokens: preference rows' response count
        when their reply masks follow them (data from before reply masks has none)."""
        masks = sum(c.startswith("reply_mask_") for c in self.columns)
        return {"responses": masks} if self.kind == "prefs" and masks else {}

    @property
    def seq_len(self) -> int:
        return self.manifest["seq_len"]

    @property
    def row_len(self) -> int:
        """Tokens a row holds: seq_len + 1 (inputs and next-token targets), or seq_len for preference rows."""
        return self.manifest.get("row_len", self.manifest["seq_len"] + 1)

    @property
    def tokenizer_sha256(self) -> str:
        return self.manifest["tokenizer"]["sha256"]

    def split(self, name: str) -> SplitShards:
        if name not in SPLITS:
            raise DataError(f"unknown split '{name}'; choose one of {', '.join(SPLITS)}")
        info = self.manifest["splits"][name]
        return SplitShards(
            paths=tuple(storage.join(self.root, s["path"]) for s in info["shards"]),
            rows=tuple(s["rows"] for s in info["shards"]),
            rows_per_row_group=info["rows_per_row_group"],
        )
