"""A Llama-family decoder in one file, with no distributed code; the options of model/config.py make it Qwen2.5,
Qwen3 or Mistral too.

Token embedding → n × [RMSNorm → grouped-query attention with rotary positions → residual,
RMSNorm → SwiGLU MLP → residual] → RMSNorm → output head. Parameter names follow Hugging
Face's LlamaForCausalLM so checkpoints convert by renaming nothing but the prefix.
Parallelism (FSDP, tensor and pipeline parallel) is applied from outside by raytrain.parallel.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from raytrain.model.config import TransformerConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


def rope_frequencies(config: TransformerConfig) -> tuple[torch.Tensor, float]:
    """(inverse frequencies [head_dim / 2], scale of cos and sin) as transformers' rope types define them."""
    dim, base = config.head_dim, config.rope_theta
    inv_freq = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    factor, kind = config.rope_factor, config.rope_scaling
    if kind == "linear":  # positions divided by the factor
        return inv_freq / factor, 1.0
    if kind == "llama3":  # long wavelengths slowed by the factor, short ones kept, a smooth blend between
        original = config.rope_original_max_len
        low_wavelen, high_wavelen = original / config.rope_low_freq_factor, original / config.rope_high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (original / wavelen - config.rope_low_freq_factor) / (
            config.rope_high_freq_factor - config.rope_low_freq_factor)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, blended, scaled), 1.0
    if kind == "yarn":  # interpolate the low frequencies, extrapolate the high, a linear ramp between
        def correction_dim(rotations: float) -> float:
            return dim * math.log(config.rope_original_max_len / (rotations * 2 * math.pi)) / (2 * math.log(base))

        low, high = correction_dim(config.rope_beta_fast), correction_dim(config.rope_beta_slow)
        if config.rope_truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / max(high - low, 0.001)).clamp(0, 1)
        extrapolated = 1 - ramp
        inv_freq = inv_freq / factor * (1 - extrapolated) + inv_freq * extrapolated
        attention = config.rope_attention_factor or (0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0)
        return inv_freq, attention
    return inv_freq, 1.0


def rotary_tables(config: TransformerConfig, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [length, head_dim] in the rotate-half layout (as Hugging Face Llama)."""
    inv_freq, scale = rope_frequencies(config)
    angles = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos() * scale, angles.sin() * scale


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


class KVCache:
    """Keys and values of every layer for generation: [batch, kv_heads, max_len, head_dim]."""

    def __init__(self, config: TransformerConfig, batch: int, max_len: int, device, dtype):
        shape = (batch, config.n_kv_heads, max_len, config.head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)]
        self.length = 0  # positions filled so far

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.length + k.shape[2]
        self.keys[layer][:, :, self.length : end] = k
        self.values[layer][:, :, self.length : end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]


class Attention(nn.Module):
    def __init__(self, config: TransformerConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_heads = config.n_heads
        self.n_kv_heads = config.n_kv_heads
        self.head_dim = config.head_dim
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.d_model, config.n_heads * config.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.d_model, config.n_kv_heads * config.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.d_model, config.n_kv_heads * config.head_dim, bias=bias)
        self.o_proj = nn.Linear(config.n_heads * config.head_dim, config.d_model, bias=False)
        # Qwen3: each head of q and k normalised over its head_dim, one weight shared by the heads
        self.q_norm = RMSNorm(config.head_dim, config.norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(config.head_dim, config.norm_eps) if config.qk_norm else None

    def forward(self, x, cos, sin, causal: bool, mask=None, cache: KVCache | None = None):
        batch, length, _ = x.shape
        # -1 heads: under tensor parallelism each rank holds a slice of the heads.
        q = self.q_proj(x).view(batch, length, -1, self.head_dim)
        k = self.k_proj(x).view(batch, length, -1, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = self.v_proj(x).view(batch, length, -1, self.head_dim).transpose(1, 2)
        # The tables start at this call's first position and may run longer: a sequence-parallel pipeline
        # stage receives a slice of the sequence, whose whole length is known only here, after the gather.
        cos, sin = cos[..., :length, :], sin[..., :length, :]
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        gqa = self.n_kv_heads != self.n_heads  # not for plain multi-head attention: the ONNX exporter refuses it
        if mask is not None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        else:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, -1))


class MLP(nn.Module):
    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.d_model, config.hidden_dim, bias=False)
        self.up_proj = nn.Linear(config.d_model, config.hidden_dim, bias=False)
        self.down_proj = nn.Linear(config.hidden_dim, config.d_model, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, config: TransformerConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.d_model, config.norm_eps)
        self.self_attn = Attention(config, layer)
        self.post_attention_layernorm = RMSNorm(config.d_model, config.norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, causal: bool, mask=None, cache=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, causal, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


HEADS = ("lm", "score")


# Rows drawn at once: whole rows, a multiple of 16 values. CPU's normal kernel draws in blocks of 16 (its tail
# aside), so blocks drawn in turn from one generator equal the whole tensor drawn at once (tests/test_model.py).
INIT_BLOCK_VALUES = 2**22


def initial_values(config: TransformerConfig, head: str, seed: int) -> Iterator[tuple[str, int, torch.Tensor]]:
    """(name, first row, values of those rows): the seeded initial value of every parameter of the whole model,
    a block of rows at a time in a fixed order from one generator. Every rank draws the same values whatever part
    of the model it holds, and none holds more than one block (16 MiB) beside its own shards."""
    with torch.device("meta"):
        shapes = [(name, param.shape) for name, param in Transformer(config, head).named_parameters()]
    generator = torch.Generator().manual_seed(seed)
    # Output projections scaled by depth (GPT-2), so the residual stream stays O(1).
    residual_std = config.init_std / math.sqrt(2 * config.n_layers)
    for name, shape in shapes:
        if name.endswith("norm.weight") or "layernorm" in name:
            yield name, 0, torch.ones(shape)
        elif name.endswith(".bias"):
            yield name, 0, torch.zeros(shape)
        else:
            scale = residual_std if name.endswith(("o_proj.weight", "down_proj.weight")) else config.init_std
            row = math.prod(shape[1:])
            step = 16 * max(1, INIT_BLOCK_VALUES // (16 * row))
            for first in range(0, shape[0], step):
                rows = min(step, shape[0] - first)
                yield name, first, torch.randn((rows, *shape[1:]), generator=generator).mul_(scale)


class Transformer(nn.Module):
    """head "lm": next-token logits (LlamaForCausalLM); "score": one scalar per position, a reward model's
    head (LlamaForSequenceClassification with one label, read at the last token)."""

    def __init__(self, config: TransformerConfig, head: str = "lm"):
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"head {head!r} is not one of {HEADS}")
        self.config = config
        self.head = head
        self.embed_tokens = nn.Embedding(config.vocab_size, config.d_model)
        # A dict keyed by layer number: a pipeline stage deletes layers and keeps the names.
        self.layers = nn.ModuleDict({str(i): Block(config, i) for i in range(config.n_layers)})
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False) if head == "lm" else None
        self.score = nn.Linear(config.d_model, 1, bias=False) if head == "score" else None
        if config.tie_embeddings and self.lm_head is not None:
            self.lm_head.weight = self.embed_tokens.weight
        cos, sin = rotary_tables(config, config.max_seq_len)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        """Seeded init, the same on every rank and under every parallel layout (a pipeline stage's part takes
        the values of the layers it kept)."""
        params = dict(self.named_parameters())
        for name, first, values in initial_values(self.config, self.head, seed):
            if name in params:
                params[name][first : first + len(values)].copy_(values)

    def reset_rotary(self, device: torch.device) -> None:
        """The rotary tables on device: they are buffers, not parameters, so a model built on the meta device
        and then given memory (to_empty) computes them again."""
        cos, sin = rotary_tables(self.config, self.config.max_seq_len)
        self.rope_cos, self.rope_sin = cos.to(device), sin.to(device)

    def forward(
        self,
        tokens: torch.Tensor,
        *,
        causal: bool = True,
        positions: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        """tokens [batch, length] (or hidden states [batch, length, d_model]) → logits [batch, length, vocab]
        (scores [batch, length, 1] with the score head).

        positions [batch, length] and a boolean mask [batch, 1, length, keys] serve batched
        generation with left padding; training passes neither. last_only: logits of the last
        position only (generation needs no others).
        """
        length = tokens.shape[1]
        if positions is None:
            start = cache.length if cache is not None else 0
            cos, sin = self.rope_cos[start:], self.rope_sin[start:]
        else:
            cos, sin = self.rope_cos[positions].unsqueeze(1), self.rope_sin[positions].unsqueeze(1)
        # A pipeline stage may lack the embedding (it receives hidden states) or the head
        # (it passes hidden states on); the full model has both.
        h = self.embed_tokens(tokens) if self.embed_tokens is not None else tokens
        for block in self.layers.values():
            h = block(h, cos, sin, causal, mask, cache)
        if cache is not None:
            cache.length += length
        head = self.lm_head if self.lm_head is not None else self.score
        if head is None:
            return h
        if last_only:
            h = h[:, -1:]
        return head(self.norm(h))

    @staticmethod
    def block_parameter_shapes(config: TransformerConfig) -> list[torch.Tensor]:
        """The parameters of one block, on the meta device (sizes for planning)."""
        with torch.device("meta"):
            return list(Block(config, 0).parameters())

    def num_params(self, embeddings: bool = True) -> int:
        total = sum(p.numel() for p in self.parameters())
        return total if embeddings else total - self.embed_tokens.weight.numel()
