"""An export folder on onnxruntime, behind the interface raytrain's commands use for a torch model.

`OnnxModel(folder)(tokens)` returns what `Transformer(tokens)` returns (logits, or a reward model's scores per
position), so evaluation and scoring run unchanged; `generate` is `raytrain.model.generate`'s loop driving the
graphs with the KV cache.

A language model runs on decode.onnx alone: with an empty past (past_seq 0) it computes what prefill.onnx computes,
bit for bit, and one onnxruntime session holds the weights once. (Two sessions cannot share them: onnxruntime
repacks each MatMul's weights per session, and without that repacking int8 decodes 2.5× slower, measured.)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from raytrain import storage
from raytrain.data.tokenizer import load_tokenizer
from raytrain.errors import DataError
from raytrain.export.folder import read_config
from raytrain.export.graphs import DECODE, SCORE, cache_names
from raytrain.model.config import TransformerConfig
from raytrain.model.generate import decode


class OnnxModel:
    def __init__(self, folder: str | Path, threads: int = 0, graphs: tuple[str, ...] | None = None):
        """graphs: those to open sessions on (`sessions`); by default the one this class runs, decode.onnx (a
        reward model's score.onnx)."""
        self.folder = folder  # a folder or a URI (copied to a local temp folder while the sessions load)
        self.export = read_config(self.folder)
        self.config = TransformerConfig(**self.export["model"])
        self.head = self.export["head"]
        self.meta = self.export["checkpoint"]  # what the checkpoint's raytrain.json said (data checks, objective)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads  # 0: onnxruntime's default, one per physical core
        options.log_severity_level = 3  # errors only
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        graphs = graphs or ((SCORE,) if self.head == "score" else (DECODE,))
        with storage.local_copy(folder) as local:  # onnxruntime reads the weights file beside a graph's path
            self.sessions = {name: ort.InferenceSession(str(local / name), options,
                                                        providers=["CPUExecutionProvider"])
                             for name in graphs}
        self.past_names = cache_names("past", self.config.n_layers)

    def tokenizer(self):
        return load_tokenizer(self.folder)

    def __call__(self, tokens: torch.Tensor, causal: bool = True) -> torch.Tensor:
        """Whole rows [batch, length] → logits [batch, length, vocab] (scores [batch, length, 1]), as the torch
        model's forward with no padding mask: what training and evaluation run."""
        if not causal:
            raise ValueError("exported graphs are causal")
        self.check_length(tokens.shape[1])
        ids = tokens.numpy().astype(np.int64)
        ones = np.ones_like(ids)
        if self.head == "score":
            _, per_position = self.sessions[SCORE].run(None, {"input_ids": ids, "attention_mask": ones})
            return torch.from_numpy(per_position)[..., None]
        positions = np.broadcast_to(np.arange(ids.shape[1]), ids.shape).copy()
        logits = self.sessions[DECODE].run(["logits"], {"input_ids": ids, "attention_mask": ones,
                                                        "position_ids": positions, **self.no_past(len(ids))})[0]
        return torch.from_numpy(logits)

    def no_past(self, batch: int) -> dict[str, np.ndarray]:
        """decode.onnx's past inputs for a prefill: every layer's keys and values of length 0."""
        empty = np.zeros((batch, self.config.n_kv_heads, 0, self.config.head_dim), np.float32)
        return dict.fromkeys(self.past_names, empty)

    def scores(self, tokens: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """A reward model's score of each right-padded row, at its last real token."""
        return self.sessions[SCORE].run(["scores"], {"input_ids": tokens, "attention_mask": attention_mask})[0]

    def check_length(self, length: int, what: str = "the input", fix: str = "shorten it") -> None:
        limit = self.export["max_length"]
        if length > limit:
            raise DataError(f"{what} is {length} tokens, longer than the {limit} the model was exported for "
                            f"({self.folder}); {fix}")

    def generate(self, prompts: list[list[int]], max_new_tokens: int, *, stop_ids: tuple[int, ...] = (),
                 pad_id: int = 0, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                 seed: int = 0) -> list[list[int]]:
        """As raytrain.model.generate.generate: the same loop, masks, positions and sampling."""
        longest = max(map(len, prompts))
        self.check_length(longest, "the prompt", "shorten it")
        self.check_length(longest + max_new_tokens, f"the prompt + {max_new_tokens} new tokens",
                          "shorten the prompt or ask for fewer new tokens (--max-new-tokens)")
        past: list[np.ndarray] = []

        def step(tokens, positions, real, start):
            feeds = {"input_ids": tokens.numpy(), "attention_mask": real.long().numpy(),
                     "position_ids": positions.numpy()}
            feeds.update(zip(self.past_names, past, strict=True) if start else self.no_past(len(tokens)).items())
            logits, *present = self.sessions[DECODE].run(None, feeds)
            past[:] = present
            return torch.from_numpy(logits[:, -1])

        return decode(step, prompts, max_new_tokens, stop_ids=stop_ids, pad_id=pad_id, temperature=temperature,
                      top_k=top_k, top_p=top_p, seeds=[seed + i for i in range(len(prompts))])
