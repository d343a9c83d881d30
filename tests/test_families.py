"""Open model families (Llama 3.x, Qwen2.5, Qwen3, Mistral) against transformers' own implementation: import,
logits, batched greedy generation with the KV cache, export back, and tp2 / FSDP parity in two gloo processes."""

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from raytrain.config import load_config
from raytrain.errors import DataError
from raytrain.model.generate import generate
from raytrain.model.hf import config_from_hf, save_hf
from raytrain.model.transformer import Transformer
from raytrain.train.checkpoint import load_model
from tests.families import FAMILIES, VOCAB, hf_model, save_family

TOKENS = torch.randint(0, VOCAB, (3, 60), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    hf = save_family(request.param, folder)
    return request.param, folder, hf, load_model(f"hf:{folder}")[0].eval()


def test_import_matches_transformers_logits(family):
    name, _, hf, ours = family
    config = ours.config
    assert config.family == name
    assert config.attention_bias == (name == "qwen2") and config.qk_norm == (name == "qwen3")
    assert config.rope_scaling == {"llama": "llama3", "qwen2": "yarn", "qwen3": "none", "mistral": "linear"}[name]
    if name == "qwen3":
        assert config.head_dim == 32 != config.d_model // config.n_heads
    if name == "mistral":  # the window caps the length: within it, sliding attention is causal attention
        assert config.sliding_window == 64 == config.max_seq_len
    with torch.no_grad():
        torch.testing.assert_close(ours(TOKENS), hf(TOKENS).logits, atol=1e-5, rtol=0)


def test_batched_greedy_generation_equals_transformers(family):
    _, _, hf, ours = family
    prompts = [[5, 9, 200, 31, 7, 7, 100, 3], [42], [3, 4, 5]]
    new = generate(ours, prompts, max_new_tokens=10)  # batched, left-padded, with the KV cache
    for prompt, tokens in zip(prompts, new, strict=True):
        expected = hf.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False, eos_token_id=None,
                               pad_token_id=0)[0, len(prompt):].tolist()
        assert tokens == expected


def test_export_loads_back_in_transformers(family, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    name, _, hf, ours = family
    save_hf(ours, tmp_path, {"bos": 1, "eos": 2, "pad": 3})
    assert AutoConfig.from_pretrained(tmp_path).model_type == name
    back = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert type(back) is type(hf)
    with torch.no_grad():
        torch.testing.assert_close(back(TOKENS).logits, hf(TOKENS).logits, atol=1e-5, rtol=0)
    assert load_model(f"hf:{tmp_path}")[0].config == ours.config  # and in again, the same model


@pytest.mark.parametrize(("change", "message"), [
    ({"model_type": "gemma"}, "model_type 'gemma' is not supported"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported"),
    ({"attention_bias": True}, "attention_bias with llama is not supported: it biases o_proj too"),
    ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0}}, "rope type 'dynamic' is not supported"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 2.0, "mscale": 1.0}}, "yarn's mscale"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor is not supported"),
])
def test_what_a_family_holds_beyond_the_decoder_is_refused_by_name(change, message, tmp_path):
    hf = {**hf_model("llama").config.to_dict(), **change}
    with pytest.raises(DataError, match=message):
        config_from_hf(hf, tmp_path / "config.json")


def test_older_rope_scaling_spelling_reads_the_same(tmp_path):
    hf = hf_model("llama").config.to_dict()
    rope = hf.pop("rope_parameters")
    old = {**hf, "rope_theta": rope.pop("rope_theta"), "rope_scaling": {**rope, "type": rope.pop("rope_type")}}
    assert config_from_hf(old, tmp_path) == config_from_hf(json.loads(json.dumps(hf | {"rope_parameters": {
        **rope, "rope_type": "llama3", "rope_theta": old["rope_theta"]}})), tmp_path)


def one_step(model: Transformer, overrides: list[str], world: int):
    """Logits, loss and gradients (whole tensors) of one forward/backward under a layout."""
    from raytrain.parallel.layout import build_layout, parallelize
    from raytrain.parallel.tensor_parallel import loss_context
    from raytrain.train.objectives import causal_lm, token_loss

    config = load_config("tiny", [f"parallel.workers={world}", *overrides])
    layout = build_layout(config.parallel, world, torch.device("cpu"))
    module = parallelize(model, config.parallel, layout, torch.device("cpu"), bf16=False)
    inputs, targets = causal_lm(TOKENS[:, :33])
    split_loss = world > 1 and config.parallel.tp > 1
    with loss_context(split_loss):
        logits = module(inputs)
        loss, count = token_loss(logits, targets)
        (loss / count).backward()
    def whole(t):
        return t.full_tensor() if hasattr(t, "full_tensor") else t

    grads = {n: whole(p.grad).clone() for n, p in model.named_parameters()}
    return float(whole(loss.detach()) / count), grads


LAYOUTS = {"tp2": ["parallel.tp=2", "parallel.sequence_parallel=true", "parallel.loss_parallel=true"],
           "fsdp2": ["parallel.dp_shard=2"]}


def layout_rank(rank: int, folder: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/init", rank=rank, world_size=2)
    try:
        # Both ranks see the same batch: FSDP's averaged gradients then equal one process's.
        results = {(name, layout): one_step(load_model(f"hf:{Path(folder) / name}")[0], overrides, 2)
                   for name in FAMILIES for layout, overrides in LAYOUTS.items()}
        if rank == 0:
            torch.save(results, f"{folder}/result.pt")
    finally:
        dist.destroy_process_group()


def test_tp2_and_fsdp_match_one_process(tmp_path):
    for name in FAMILIES:
        save_family(name, tmp_path / name)
    mp.spawn(layout_rank, args=(str(tmp_path),), nprocs=2)
    results = torch.load(tmp_path / "result.pt")
    for name in FAMILIES:
        loss, grads = one_step(load_model(f"hf:{tmp_path / name}")[0], [], 1)
        for layout in LAYOUTS:
            split_loss, split_grads = results[name, layout]
            assert abs(split_loss - loss) < 1e-5, (name, layout)
            assert split_grads.keys() == grads.keys()
            for key, grad in grads.items():
                torch.testing.assert_close(split_grads[key], grad, atol=1e-5, rtol=1e-4, msg=f"{name} {layout} {key}")
