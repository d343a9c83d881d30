"""Training FLOPs per token, for MFU.

6·N for the matrix multiplies of forward and backward over N non-embedding parameters
(the output head counts: it is a matmul), plus attention scores and values: 12 · n_layers · n_heads ·
head_dim · T for T tokens of context when every token attends to all T (PaLM appendix B), and half that
under a causal mask. We count what is computed: the fused attention kernels raytrain calls (SDPA's flash
and memory-efficient paths, on CPU and GPU) skip the masked upper triangle, so a token attends on average
to T/2 positions. (PaLM and torchtitan count the full 12·L·d·T even for causal models, which reads about
the attention's share higher; FlashAttention's own benchmarks halve it, as here.)
"""

from __future__ import annotations

from raytrain.model.transformer import TransformerConfig


def matmul_params(config: TransformerConfig, head: str = "lm") -> int:
    """head "lm" projects onto the vocabulary; a reward model's "score" head onto one number."""
    d, q, kv = config.d_model, config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim
    attention = d * q * 2 + d * kv * 2
    mlp = 3 * d * config.hidden_dim
    return config.n_layers * (attention + mlp) + d * (config.vocab_size if head == "lm" else 1)


def train_flops_per_token(config: TransformerConfig, seq_len: int, head: str = "lm", causal: bool = True) -> float:
    attention = 12.0 * config.n_layers * config.n_heads * config.head_dim * seq_len
    return 6.0 * matmul_params(config, head) + (attention / 2 if causal else attention)
