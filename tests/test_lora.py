"""LoRA adapters (model/lora.py) without Ray: frozen base, peft's initial values, an adapter folder that `peft`
loads with our logits, merging, and clear errors for what cannot be adapted."""

import pytest
import torch

from raytrain.errors import ConfigError
from raytrain.model.hf import save_hf
from raytrain.model.lora import (
    TARGETS,
    add_lora,
    init_lora,
    lora_parameters,
    merge_lora,
    peft_config,
    save_peft_adapter,
)
from raytrain.model.transformer import Transformer, TransformerConfig

CONFIG = TransformerConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32)


def test_a_lora_adapter_loads_in_peft_with_our_logits_and_merges(tmp_path):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    model = Transformer(CONFIG)
    model.init_weights(0)
    save_hf(model, tmp_path / "base")
    tokens = torch.randint(0, CONFIG.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base_logits = model(tokens)
    adapted = add_lora(model, rank=4, alpha=8.0, targets=TARGETS)
    assert len(adapted) == 7 * CONFIG.n_layers
    init_lora(model, seed=1)
    with torch.no_grad():
        assert torch.equal(model(tokens), base_logits)  # lora_B starts at zero: the base model
        for name, parameter in lora_parameters(model).items():
            if ".lora_B." in name:
                parameter.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(name)))
        ours = model(tokens)
    assert (ours - base_logits).abs().max() > 1e-2
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(lora_parameters(model)) and len(trainable) == 2 * len(adapted)

    save_peft_adapter(lora_parameters(model), tmp_path / "adapter",
                      peft_config(4, 8.0, 0.0, TARGETS, str(tmp_path / "base")))
    hf = LlamaForCausalLM.from_pretrained(str(tmp_path / "base"), dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = PeftModel.from_pretrained(hf, str(tmp_path / "adapter")).eval()(tokens).logits
    assert (theirs - ours).abs().max() < 1e-5

    merge_lora(model)
    assert not lora_parameters(model) and all(type(m) is torch.nn.Linear for m in model.modules()
                                              if isinstance(m, torch.nn.Linear))
    with torch.no_grad():
        assert (model(tokens) - ours).abs().max() < 1e-5


def test_what_cannot_be_adapted_is_refused_by_name():
    with pytest.raises(ConfigError, match="qkv_proj match no linear layer"):
        add_lora(Transformer(CONFIG), rank=4, alpha=8.0, targets=("q_proj", "qkv_proj"))
    with pytest.raises(ConfigError, match=r"train.lora.rank=32 .*k_proj \(32 × 16\)"):
        add_lora(Transformer(CONFIG), rank=32, alpha=8.0, targets=("k_proj",))


def test_qlora_holds_the_base_in_int8_close_to_full_precision_and_keeps_no_dense_weight_for_backward():
    from raytrain.config import LoRAConfig
    from raytrain.model.lora import quantize_base
    from raytrain.model.qlora import dequantize, quantize_weight

    weight = torch.tensor([[0.5, -1.0, 0.25], [2.0, 0.0, -0.01]])
    values, scale = quantize_weight(weight)
    assert values.dtype == torch.int8 and values.tolist() == [[64, -127, 32], [127, 0, -1]]
    assert scale.tolist() == pytest.approx([1.0 / 127, 2.0 / 127])
    assert (dequantize(values, scale, torch.float32) - weight).abs().max() <= scale.max() / 2

    tokens = torch.randint(0, CONFIG.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    models = {}
    for quantize in ("none", "int8"):
        model = Transformer(CONFIG)
        model.init_weights(0)
        add_lora(model, rank=4, alpha=8.0, targets=TARGETS)
        init_lora(model, seed=1)
        for name, parameter in lora_parameters(model).items():  # a trained-looking update
            if ".lora_B." in name:
                parameter.data.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
        before, after = quantize_base(model, LoRAConfig(rank=4, quantize=quantize))
        models[quantize] = model, before, after
    (full, *_), (int8, before, after) = models["none"], models["int8"]
    # The adapted weights: 1 byte a value and 4 a row, not 4 a value.
    assert after < 0.3 * before and before == 4 * sum(p.numel() for n, p in full.named_parameters()
                                                      if n.endswith("proj.weight"))
    assert all(p.dtype == torch.int8 and not p.requires_grad for n, p in int8.named_parameters()
               if n.endswith("proj.weight"))
    dense = {tuple(p.shape) for n, p in int8.named_parameters() if n.endswith("proj.weight")}
    saved = []

    def keep(tensor):  # what autograd saves for the backward: no dense (float) copy of an adapted weight
        if tensor.dtype != torch.int8 and tuple(tensor.shape) in dense:
            saved.append(tuple(tensor.shape))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        int8_logits = int8(tokens)
    full_logits = full(tokens)
    assert not saved
    error = (int8_logits - full_logits).abs().max() / full_logits.abs().max()
    assert 0 < error < 0.02, error  # the int8 base is close, not equal
    int8_logits.logsumexp(-1).mean().backward()
    full_logits.logsumexp(-1).mean().backward()
    grads = [(a.grad, b.grad) for (n, a), (_, b) in zip(int8.named_parameters(), full.named_parameters(),
                                                        strict=True) if a.requires_grad]
    assert grads and all(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.99
                         for a, b in grads if b.abs().sum() > 0)
    # What PPO sends its rollout engines: the dequantized base with the update folded in, in float32.
    from raytrain.rlhf.weight_sync import synced_parameters

    layer = int8.layers["0"].self_attn.q_proj
    sent = dict((name, gives()) for name, _, gives in synced_parameters(int8))["layers.0.self_attn.q_proj.weight"]
    expected = dequantize(layer.weight, layer.weight_scale, torch.float32) + \
        layer.lora_B.weight @ layer.lora_A.weight * layer.scaling
    assert sent.dtype == torch.float32 and (sent - expected).abs().max() < 1e-6
    # ppo.lora_sync=adapters: the base (dequantized) and the adapters go, and the actors' merge gives the same.
    from raytrain.rlhf.weight_sync import adapted_layers, merge

    pieces = {name: gives() for name, _, gives in synced_parameters(int8, adapters=True)}
    assert len(adapted_layers(pieces)) == 7 * CONFIG.n_layers
    q_proj = "layers.0.self_attn.q_proj"
    assert torch.equal(pieces[f"{q_proj}.weight"], dequantize(layer.weight, layer.weight_scale, torch.float32))
    assert torch.equal(merge(pieces[f"{q_proj}.weight"], pieces[f"{q_proj}.lora_A.weight"],
                             pieces[f"{q_proj}.lora_B.weight"], layer.scaling), sent)


@pytest.mark.ray
def test_lora_sft_dpo_and_grpo_on_the_one_loop(reference, tiny_sft_dataset, tiny_prefs_dataset, tmp_path):
    """train.lora on the one loop: LoRA SFT lowers the held-out answer loss, its checkpoints hold the adapters only
    (and their optimizer state) and name their base; tp2 with a worker that dies resumes to the one-worker curve;
    `convert to-hf` writes a PEFT folder that peft loads with our logits, and --merge full weights with them;
    LoRA DPO starts from its own base as the reference (loss log 2) and repeats its curve on two FSDP workers;
    LoRA GRPO learns, its two-worker FSDP run and its adapters-only sync (an actor killed on the way) repeat the
    one-worker numbers, and the rollout actors end holding the merged weights; QLoRA learns as LoRA does and FSDP × TP
    workers repeat its curve."""
    import json
    import math

    import torch.distributed.checkpoint as dcp
    from conftest import assert_same_curve, losses, metric, prompts_file
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from raytrain.config import load_config
    from raytrain.export.hf import checkpoint_to_hf
    from raytrain.stages import STAGES
    from raytrain.train.checkpoint import load_model, resolve_checkpoint
    from raytrain.train.local import run_local

    lora = ["train.lora.rank=4", "train.lora.alpha=8", "train.steps=20", "train.lr=0.01"]

    def run(stage, name, data, *overrides, in_process=False):
        config = load_config("tiny", [f"run.root='{tmp_path}'", f"run.name={name}", f"train.data='{data}'",
                                      f"train.init_from='{reference[0]}'", *lora, *overrides])
        return run_local(config, STAGES[stage]) if in_process else STAGES[stage].run(config)

    summary = run("sft", "sft", tiny_sft_dataset, "parallel.workers=1", in_process=True)
    val = metric(tmp_path / "sft", "val/loss")
    # (On the tiny model most of full fine-tuning's drop is in the embeddings, which LoRA leaves alone: even rank 32
    # on every projection lowers it by ~0.02 in 20 steps, full fine-tuning by ~0.4.)
    assert val[20] < val[0] - 0.015, val
    checkpoint = summary["checkpoint"]
    meta = json.loads((tmp_path / "sft" / "checkpoints" / "step_000020" / "raytrain.json").read_text())
    assert meta["lora"]["rank"] == 4 and meta["lora"]["base"] == str(resolve_checkpoint(reference[0]))
    stored = dcp.FileSystemReader(checkpoint).read_metadata().state_dict_metadata
    model_keys = [k for k in stored if k.startswith("model.")]
    assert model_keys and all(".lora_A." in k or ".lora_B." in k for k in model_keys)
    assert all(".lora_" in k for k in stored if k.startswith("optim."))
    run("sft", "sft-tp2", tiny_sft_dataset, "parallel.workers=2", "parallel.tp=2", "parallel.cpus_per_worker=0.5",
        "train.max_failures=1", "debug.fail_at_step=13", "debug.fail_rank=1")
    assert (tmp_path / "sft-tp2" / ".debug_failed_once").read_text() == "resumed from step 10\n"
    assert_same_curve(losses(tmp_path / "sft"), losses(tmp_path / "sft-tp2"))

    # QLoRA: the base in int8 learns as LoRA does (its held-out loss within 0.02 of LoRA's at every validation), and
    # FSDP × TP workers (each row's scale over the whole row: the same int8 values in any layout), one of which
    # dies, repeat its one-worker curve.
    run("sft", "qlora", tiny_sft_dataset, "parallel.workers=1", "train.lora.quantize=int8", in_process=True)
    quantized = metric(tmp_path / "qlora", "val/loss")
    assert quantized[20] < quantized[0] - 0.015 and all(abs(quantized[s] - val[s]) < 0.02 for s in val), quantized
    assert losses(tmp_path / "qlora") != losses(tmp_path / "sft")  # the base it adapts is not the same
    run("sft", "qlora-dp2-tp2", tiny_sft_dataset, "parallel.workers=4", "parallel.tp=2",
        "parallel.cpus_per_worker=0.5", "train.lora.quantize=int8", "train.max_failures=1", "debug.fail_at_step=13",
        "debug.fail_rank=3")
    assert (tmp_path / "qlora-dp2-tp2" / ".debug_failed_once").read_text() == "resumed from step 10\n"
    assert_same_curve(losses(tmp_path / "qlora"), losses(tmp_path / "qlora-dp2-tp2"))

    # The adapter as peft loads it, on the base as transformers loads it; merged weights give the same logits.
    checkpoint_to_hf(str(reference[0]), tmp_path / "base-hf")
    checkpoint_to_hf(checkpoint, tmp_path / "adapter")
    checkpoint_to_hf(checkpoint, tmp_path / "merged", merge=True)
    ours, _ = load_model(checkpoint)
    tokens = torch.randint(3, ours.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = ours(tokens)
        base = AutoModelForCausalLM.from_pretrained(str(tmp_path / "base-hf"), dtype=torch.float32).eval()
        base_logits = base(tokens).logits  # (peft adapts the base model in place)
        adapted = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()(tokens).logits
        merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32).eval()
        assert (adapted - expected).abs().max() < 1e-5
        assert (merged(tokens).logits - expected).abs().max() < 1e-5
        assert (base_logits - expected).abs().max() > 1e-3  # the adapters changed the model

    dpo = ["train.dpo_beta=0.5", "train.lr=0.005"]
    run("dpo", "dpo", tiny_prefs_dataset, *dpo, "parallel.workers=1", in_process=True)
    one = losses(tmp_path / "dpo")
    val = metric(tmp_path / "dpo", "val/loss")
    assert one[1] == pytest.approx(math.log(2), abs=1e-6) and val[20] < val[0], (one, val)
    run("dpo", "dpo-fsdp2", tiny_prefs_dataset, *dpo, "parallel.workers=2")
    assert_same_curve(one, losses(tmp_path / "dpo-fsdp2"))

    prompts = prompts_file(tmp_path)

    def grpo(name, *overrides):
        config = load_config("tiny", [f"run.root='{tmp_path}'", f"run.name={name}", f"ppo.policy='{checkpoint}'",
                                      f"ppo.prompts='{prompts}'", "ppo.reward=python:raytrain.rlhf.rewards:verbosity",
                                      "ppo.algorithm=grpo", "ppo.samples_per_prompt=4", "ppo.iterations=4",
                                      "ppo.max_new_tokens=12", "ppo.prompts_per_iteration=4", "ppo.val_prompts=4",
                                      "train.lora.rank=8", "train.lora.alpha=16", "train.lr=2e-2",
                                      "train.warmup_steps=0", "train.min_lr_ratio=1", "train.log_every=1",
                                      "train.val_every=0", "train.checkpoint_every=2", *overrides])
        return STAGES["ppo"].run(config)

    summary = grpo("grpo", "parallel.workers=1")
    reward = list(metric(tmp_path / "grpo", "ppo/reward_mean").values())
    assert reward[-1] > reward[0], reward
    assert summary["rollout_weights_max_diff"] < 1e-6 and summary["rollout_greedy_agreement"] == 1.0, summary
    grpo("grpo-fsdp2", "parallel.workers=2")
    # ppo.lora_sync=adapters: after a whole first sync only the adapters go, each actor merging them into the base
    # it kept; the rollout actor dies mid-sync at iteration 2 and, restarted without that base, is sent the whole
    # policy again. The same numbers as the merged sync's, and the actors end with the same merged weights.
    adapters = grpo("grpo-adapters", "parallel.workers=1", "ppo.lora_sync=adapters", "debug.fail_actor_at_iteration=2")
    assert adapters["rollout_weights_max_diff"] < 1e-6 and adapters["rollout_greedy_agreement"] == 1.0, adapters
    for run_name in ("grpo-fsdp2", "grpo-adapters"):
        for name in ("ppo/reward_mean", "train/loss"):
            a, b = metric(tmp_path / "grpo", name), metric(tmp_path / run_name, name)
            assert all(b[s] == pytest.approx(a[s], rel=1e-4, abs=1e-6) for s in a), (run_name, name, a, b)
