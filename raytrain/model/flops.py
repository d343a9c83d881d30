"""Training FLOPs per token, for MFU.

6·N for the matrix multiplies of forward and backward over N non-embedding parameters
(the output head counts: it is a matmul), plus attention scores and values:
12 · n_layers · n_heads · head_dim · T for T tokens of context (PaLM appendix B; causal masking is
not discounted, as is customary).
"""

from __future__ import annotations

from raytrain.model.transformer import TransformerConfig


def matmul_params(config: TransformerConfig, head: str = "lm") -> int:
    """head "lm" projects onto the vocabulary; a reward model's "score" head onto one number."""
    d, q, kv = config.d_model, config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim
    attention = d * q * 2 + d * kv * 2
    mlp = 3 * d * config.hidden_dim
    return config.n_layers * (attention + mlp) + d * (config.vocab_size if head == "lm" else 1)


def train_flops_per_token(config: TransformerConfig, seq_len: int, head: str = "lm") -> float:
    return 6.0 * matmul_params(config, head) + 12.0 * config.n_layers * config.n_heads * config.head_dim * seq_len
