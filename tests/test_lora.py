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
