"""The model's shape, kept free of torch so configs load fast in data workers.

One decoder with options covers the open families it imports (model/hf.py): Llama 2/3.x (rope scaling
llama3 or linear), Qwen2.5 (q/k/v bias), Qwen3 (per-head q/k RMSNorm, head size independent of d_model / n_heads),
Mistral (a sliding window no longer than the sequences it is run on). Flat fields, so a config is a plain dict in
every checkpoint and log."""

from __future__ import annotations

import math
from dataclasses import dataclass

from raytrain.errors import ConfigError

FAMILIES = ("llama", "qwen2", "qwen3", "mistral")  # the Hugging Face model_type a checkpoint converts to
ROPE_SCALINGS = ("none", "linear", "llama3", "yarn")  # transformers' rope_type names ("none": its "default")


@dataclass(frozen=True)
class TransformerConfig:
    vocab_size: int = 8192  # embedding rows: at least the tokenizer's size
    d_model: int = 256  # hidden size
    n_layers: int = 4  # transformer blocks
    n_heads: int = 8  # query heads
    n_kv_heads: int = 4  # grouped-query attention: n_heads / n_kv_heads query heads share a kv head
    ffn_hidden: int = 0  # 0: Llama's rule, 8/3 · d_model rounded up to a multiple of 64
    max_seq_len: int = 1024  # longest sequence the model runs on
    rope_theta: float = 10000.0  # rotary base
    norm_eps: float = 1e-5  # RMSNorm epsilon
    tie_embeddings: bool = False  # the output head shares the embedding matrix
    init_std: float = 0.02  # normal init of the weights (output projections scaled by depth)
    family: str = "llama"  # one of FAMILIES: which Hugging Face architecture `convert to-hf` writes
    head_size: int = 0  # per-head size; 0: d_model / n_heads (Qwen3 sets its own)
    attention_bias: bool = False  # biases on the q, k and v projections (Qwen2.5)
    qk_norm: bool = False  # RMSNorm over each head of q and k before rotary positions (Qwen3)
    sliding_window: int = 0  # attention window of the source checkpoint (Mistral); 0: none
    rope_scaling: str = "none"  # one of ROPE_SCALINGS, transformers' definitions
    rope_factor: float = 1.0  # how much longer than rope_original_max_len the scaled positions reach
    rope_original_max_len: int = 0  # the pre-training context the scaling starts from (llama3, yarn)
    rope_low_freq_factor: float = 1.0  # llama3
    rope_high_freq_factor: float = 4.0  # llama3
    rope_beta_fast: float = 32.0  # yarn
    rope_beta_slow: float = 1.0  # yarn
    rope_attention_factor: float = 0.0  # yarn's scale of cos and sin; 0: 0.1·ln(factor) + 1
    rope_truncate: bool = True  # yarn: round the correction range to whole dimensions

    def validate(self) -> None:
        def check(ok: bool, key: str, message: str) -> None:
            if not ok:
                raise ConfigError(f"config key 'model.{key}' {message}")

        for key in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "max_seq_len"):
            check(getattr(self, key) >= 1, key, "must be >= 1")
        if not self.head_size:
            check(self.d_model % self.n_heads == 0, "d_model", f"{self.d_model} is not divisible by model.n_heads "
                  f"{self.n_heads}; pick heads that divide it, or set model.head_size")
        check(self.head_size >= 0, "head_size", "must be >= 0 (0: d_model / n_heads)")
        check(self.family in FAMILIES, "family", f"is {self.family!r}; choose one of {', '.join(FAMILIES)}")
        check(self.rope_scaling in ROPE_SCALINGS, "rope_scaling",
              f"is {self.rope_scaling!r}; choose one of {', '.join(ROPE_SCALINGS)}")
        check(self.sliding_window == 0 or self.sliding_window >= self.max_seq_len, "sliding_window",
              f"{self.sliding_window} is shorter than model.max_seq_len {self.max_seq_len}: windowed attention is "
              f"not implemented; set model.max_seq_len <= {self.sliding_window}")
        if self.rope_scaling != "none":
            check(self.rope_factor >= 1.0, "rope_factor", "must be >= 1 with rope scaling")
        if self.rope_scaling in ("llama3", "yarn"):
            check(self.rope_original_max_len >= 1, "rope_original_max_len",
                  f"must be set for rope_scaling={self.rope_scaling} (original_max_position_embeddings)")
        if self.rope_scaling == "llama3":
            check(self.rope_high_freq_factor > self.rope_low_freq_factor, "rope_high_freq_factor",
                  "must exceed model.rope_low_freq_factor")
        check(self.n_heads % self.n_kv_heads == 0, "n_heads",
              f"{self.n_heads} is not divisible by model.n_kv_heads {self.n_kv_heads}; "
              "make n_kv_heads a divisor of n_heads")
        check(self.head_dim % 2 == 0, "d_model", f"gives an odd head size {self.head_dim}; rotary needs even")
        check(self.ffn_hidden >= 0, "ffn_hidden", "must be >= 0 (0: Llama's rule)")

    @property
    def head_dim(self) -> int:
        return self.head_size or self.d_model // self.n_heads

    @property
    def hidden_dim(self) -> int:
        if self.ffn_hidden:
            return self.ffn_hidden
        return 64 * math.ceil(8 * self.d_model / 3 / 64)
