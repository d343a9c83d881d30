import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from raytrain.data.tokenizer import (
    SPECIAL_TOKENS,
    load_tokenizer,
    save_tokenizer,
    train_tokenizer,
)
from raytrain.errors import DataError

TRAINING_TEXT = [
    "def add(a, b):\n    return a + b\n",
    "The quick brown fox jumps over the lazy dog. 😀 ünïcödé\n",
    "\t\tindented\r\nwindows line\x00nul\x1bescape\n",
] * 20


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tokenizer")
    save_tokenizer(train_tokenizer(TRAINING_TEXT, vocab_size=400), out, {"test": True})
    return out


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return load_tokenizer(tokenizer_dir)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=200))
def test_round_trip_any_unicode(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    assert tokenizer.decode(ids, skip_special_tokens=False) == text


@pytest.mark.parametrize(
    "text",
    ["", " ", "\x00\x01\x02\x7f", "<|eos|>", "a<|bos|>b<|mask|>", "👩‍👩‍👧‍👦 🇩🇪", "\ufffd", "x" * 5000],
)
def test_round_trip_edge_cases(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    assert tokenizer.decode(ids, skip_special_tokens=False) == text


def test_special_tokens_have_fixed_ids_and_are_not_injected(tokenizer):
    ids = {k: v for k, v in tokenizer.special.items() if k != "stop"}
    assert list(ids) == list(SPECIAL_TOKENS) and tokenizer.special["stop"] == [ids["eos"]] == list(tokenizer.stop_ids)
    assert list(ids.values()) == list(range(len(SPECIAL_TOKENS)))
    # Text that spells a special token is plain text to the data pipeline.
    assert not set(tokenizer.encode("<|eos|><|user|>").ids) & set(ids.values())


def test_transformers_loads_the_folder_as_is(tokenizer_dir, tokenizer):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    text = "def add(a, b): return a + b  # 😀"
    assert hf(text, add_special_tokens=False)["input_ids"] == tokenizer.encode(text).ids
    assert hf.eos_token == SPECIAL_TOKENS["eos"] and hf.pad_token_id == 2
    assert json.loads((tokenizer_dir / "tokenizer_config.json").read_text())["eos_token"] == "<|eos|>"


def test_missing_tokenizer_names_the_fix(tmp_path):
    with pytest.raises(DataError, match="no tokenizer.json in .*raytrain data tokenizer"):
        load_tokenizer(tmp_path)
