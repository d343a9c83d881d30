"""The model's shape, kept free of torch so configs load fast in data workers."""

from __future__ import annotations

import math
from dataclasses import dataclass

from raytrain.errors import ConfigError


@dataclass(frozen=True)
class TransformerConfig:
    vocab_size: int = 8192
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 8
    n_kv_heads: int = 4  # grouped-query attention: n_heads / n_kv_heads query heads share a kv head
    ffn_hidden: int = 0  # 0: Llama's rule, 8/3 · d_model rounded up to a multiple of 64
    max_seq_len: int = 1024
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    init_std: float = 0.02

    def validate(self) -> None:
        def check(ok: bool, key: str, message: str) -> None:
            if not ok:
                raise ConfigError(f"config key 'model.{key}' {message}")

        for key in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "max_seq_len"):
            check(getattr(self, key) >= 1, key, "must be >= 1")
        check(self.d_model % self.n_heads == 0, "d_model",
              f"{self.d_model} is not divisible by model.n_heads {self.n_heads}; pick heads that divide it")
        check(self.n_heads % self.n_kv_heads == 0, "n_heads",
              f"{self.n_heads} is not divisible by model.n_kv_heads {self.n_kv_heads}; "
              "make n_kv_heads a divisor of n_heads")
        check(self.head_dim % 2 == 0, "d_model", f"gives an odd head size {self.head_dim}; rotary needs even")
        check(self.ffn_hidden >= 0, "ffn_hidden", "must be >= 0 (0: Llama's rule)")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def hidden_dim(self) -> int:
        if self.ffn_hidden:
            return self.ffn_hidden
        return 64 * math.ceil(8 * self.d_model / 3 / 64)
