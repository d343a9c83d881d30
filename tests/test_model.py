"""The transformer against Hugging Face's LlamaForCausalLM, and generation with the KV cache."""

import math

import pytest
import torch

from raytrain.errors import ConfigError
from raytrain.model.generate import generate
from raytrain.model.hf import save_hf
from raytrain.model.transformer import Transformer, TransformerConfig
from raytrain.train.checkpoint import load_model

CONFIG = TransformerConfig(vocab_size=257, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                           max_seq_len=96, rope_theta=5000.0)


@pytest.fixture(scope="module")
def model() -> Transformer:
    torch.manual_seed(0)
    m = Transformer(CONFIG)
    m.init_weights(seed=1)
    return m.eval()


def hf_model(folder):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()


def test_export_loads_in_transformers_with_matching_logits(model, tmp_path):
    save_hf(model, tmp_path)
    tokens = torch.randint(0, CONFIG.vocab_size, (3, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf_model(tmp_path)(tokens).logits, model(tokens), atol=1e-5, rtol=0)


def test_import_from_a_random_transformers_llama(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(3)
    hf = LlamaForCausalLM(LlamaConfig(
        vocab_size=311, hidden_size=96, intermediate_size=200, num_hidden_layers=3, num_attention_heads=6,
        num_key_value_heads=2, max_position_embeddings=128, rope_theta=20000.0, tie_word_embeddings=True,
    )).eval()
    hf.save_pretrained(tmp_path)
    ours = load_model(f"hf:{tmp_path}")[0].eval()
    assert ours.config.tie_embeddings and ours.config.hidden_dim == 200 and ours.config.rope_theta == 20000
    tokens = torch.randint(0, 311, (2, 50))
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), hf(tokens).logits, atol=1e-5, rtol=0)


def test_greedy_generation_equals_transformers(model, tmp_path):
    save_hf(model, tmp_path)
    hf = hf_model(tmp_path)
    prompts = [[5, 9, 200, 31, 7, 7, 100], [42], [3, 4, 5]]
    ours = generate(model, prompts, max_new_tokens=12)
    for prompt, new in zip(prompts, ours, strict=True):
        expected = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                               eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
        assert new == expected
    # Batched with left padding equals one prompt at a time.
    assert ours == [generate(model, [p], max_new_tokens=12)[0] for p in prompts]


def test_sampling_is_seeded_and_stops_on_eos(model):
    prompts = [[1, 2, 3], [4, 5]]
    first = generate(model, prompts, 20, temperature=0.9, top_k=50, top_p=0.9, seed=7)
    assert first == generate(model, prompts, 20, temperature=0.9, top_k=50, top_p=0.9, seed=7)
    greedy = generate(model, prompts, 20)
    eos = greedy[0][3]
    stopped = generate(model, prompts, 20, stop_ids=(eos,))
    assert stopped[0] == greedy[0][: greedy[0].index(eos) + 1]
    # Each prompt samples from its own seed (seed + its index): batched equals one prompt at a time.
    alone = [generate(model, [p], 20, temperature=0.9, top_k=50, top_p=0.9, seed=7 + i) for i, p in enumerate(prompts)]
    assert first == [a[0] for a in alone]
    # top_k=1 is greedy whatever the temperature.
    assert generate(model, prompts, 8, temperature=1.5, top_k=1, seed=1) == generate(model, prompts, 8)


def test_sampling_draws_from_the_filtered_distribution():
    from raytrain.model.generate import sample_next

    logits = torch.tensor([0.0, 1.0, 2.0, -1.0, 0.5]).log_softmax(-1).expand(20000, 5)
    generators = [torch.Generator().manual_seed(i) for i in range(len(logits))]
    counts = torch.bincount(sample_next(logits, 1.0, 0, 1.0, generators), minlength=5).float() / len(logits)
    torch.testing.assert_close(counts, logits[0].softmax(-1), atol=0.01, rtol=0)
    # top_k=2 leaves tokens 2 and 1 only, in proportion e² : e¹
    kept = torch.bincount(sample_next(logits, 1.0, 2, 1.0, generators), minlength=5).float() / len(logits)
    assert kept[[0, 3, 4]].sum() == 0 and abs(kept[2] - 1 / (1 + math.exp(-1))) < 0.01


def test_init_is_seeded_and_blocks_of_rows_equal_each_tensor_drawn_whole(monkeypatch):
    a, b = Transformer(CONFIG), Transformer(CONFIG)
    a.init_weights(5)
    # Blocks of 16 rows of 64 values (the embedding's 257 rows in 17 blocks, the last short): the same values.
    monkeypatch.setattr("raytrain.model.transformer.INIT_BLOCK_VALUES", 16 * 64)
    b.init_weights(5)
    pairs = zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    assert all(torch.equal(x, y) for x, y in pairs)
    # ... and the values one draw per tensor gives (what every run before meta-device construction had).
    generator, residual = torch.Generator().manual_seed(5), CONFIG.init_std / math.sqrt(2 * CONFIG.n_layers)
    for name, param in a.named_parameters():
        if param.dim() > 1:
            scale = residual if name.endswith(("o_proj.weight", "down_proj.weight")) else CONFIG.init_std
            assert torch.equal(param, torch.randn(param.shape, generator=generator) * scale), name


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"d_model": 100, "n_heads": 8}, "'model.d_model' 100 is not divisible by model.n_heads 8"),
        ({"n_heads": 8, "n_kv_heads": 3}, "'model.n_heads' 8 is not divisible by model.n_kv_heads 3"),
    ],
)
def test_shapes_that_do_not_fit(changes, message):
    with pytest.raises(ConfigError, match=message):
        TransformerConfig(**changes).validate()


def test_flops_count_every_matmul_weight():
    from raytrain.model.flops import matmul_params, train_flops_per_token

    model = Transformer(CONFIG)
    norms = sum(p.numel() for n, p in model.named_parameters() if "norm" in n)
    # Every weight but the embedding table and the norms multiplies activations.
    assert matmul_params(CONFIG) == model.num_params(embeddings=False) - norms
    attention = 12 * CONFIG.n_layers * CONFIG.d_model * 96  # every token attending to all 96
    assert train_flops_per_token(CONFIG, 96, causal=False) == 6 * matmul_params(CONFIG) + attention
    assert train_flops_per_token(CONFIG, 96) == 6 * matmul_params(CONFIG) + attention / 2  # the masked half skipped
