"""Pure helpers of the shard writer: the document split and packing tokens into rows."""

from __future__ import annotations

import hashlib

import numpy as np

TOKEN_DTYPE = np.int32
ROW_GROUP_BYTES = 32 * 1024  # small row groups: a reader fetches little beyond the rows it needs


def is_val_document(text: str, seed: int, val_fraction: float) -> bool:
    """Stable split: a document's content (salted by seed) alone decides its split."""
    if val_fraction <= 0:
        return False
    digest = hashlib.blake2b(text.encode(), digest_size=8, key=seed.to_bytes(8, "little", signed=True))
    return int.from_bytes(digest.digest(), "little") / 2**64 < val_fraction


def pack_rows(pieces: list[np.ndarray], row_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate token arrays and cut them into rows of exactly row_len.

    Returns (rows [n, row_len], remainder [< row_len]); nothing is lost or reordered.
    """
    flat = np.concatenate(pieces).astype(TOKEN_DTYPE, copy=False) if pieces else np.zeros(0, TOKEN_DTYPE)
    n_rows = len(flat) // row_len
    return flat[: n_rows * row_len].reshape(n_rows, row_len), flat[n_rows * row_len :]


def rows_per_row_group(row_len: int) -> int:
    return max(1, min(1024, ROW_GROUP_BYTES // (row_len * np.dtype(TOKEN_DTYPE).itemsize)))
