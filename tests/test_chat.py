"""The chat format: our ids equal transformers' apply_chat_template; the loss mask; bad conversations."""

import pytest

from raytrain.data.chat import check_conversation
from raytrain.data.tokenizer import load_tokenizer
from raytrain.errors import DataError

CONVERSATIONS = [
    [{"role": "user", "content": "What does `json.dumps(obj, *, skipkeys=False)` do?"},
     {"role": "assistant", "content": "Serialize ``obj`` to a JSON formatted ``str``."}],
    [{"role": "system", "content": "Answer in one line.\n"},
     {"role": "user", "content": "  Which module parses argv?  "},
     {"role": "assistant", "content": "argparse ✓"},
     {"role": "user", "content": "And for config files (ünïcode)?"},
     {"role": "assistant", "content": "configparser\n\nIt reads INI files."}],
]


@pytest.fixture(scope="module")
def tokenizer_dir(plain_tokenizer):
    return plain_tokenizer


def test_our_ids_are_what_transformers_renders_from_the_exported_template(tokenizer_dir):
    from transformers import AutoTokenizer

    ours, theirs = load_tokenizer(tokenizer_dir), AutoTokenizer.from_pretrained(str(tokenizer_dir))
    for conversation in CONVERSATIONS:
        turns = check_conversation(conversation, "example", ends_with_reply=True)
        for prompt in (False, True):
            ids, _ = ours.encode_conversation(turns, add_generation_prompt=prompt)
            expected = theirs.apply_chat_template(conversation, add_generation_prompt=prompt, tokenize=True,
                                                  return_dict=False)
            assert ids == list(expected)
    prompt_ids = ours.encode_prompt("Which module parses argv?", system="Be brief.")
    assert prompt_ids == list(theirs.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Which module parses argv?"}],
        add_generation_prompt=True, tokenize=True, return_dict=False))


def test_only_assistant_tokens_and_their_eos_are_trained(tokenizer_dir):
    tokenizer = load_tokenizer(tokenizer_dir)
    special = tokenizer.special
    ids, trained = tokenizer.encode_conversation(CONVERSATIONS[1])
    assert len(ids) == len(trained)
    trained_text = [i for i, t in zip(ids, trained, strict=True) if t]
    replies = [tokenizer.encode(t["content"]).ids + [special["eos"]] for t in CONVERSATIONS[1]
               if t["role"] == "assistant"]
    assert trained_text == replies[0] + replies[1]
    # Role tokens are never trained, and content that spells a control token stays text.
    assert not any(t for i, t in zip(ids, trained, strict=True) if i == special["assistant"])
    spelled, _ = tokenizer.encode_conversation([{"role": "user", "content": "<|eos|>"},
                                                 {"role": "assistant", "content": "ok"}])
    assert spelled.count(special["eos"]) == 2


@pytest.mark.parametrize("messages, fragment", [
    ([], "non-empty list"),
    ([{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}], "unknown role 'bot'"),
    ([{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}], "out of order"),
    ([{"role": "user", "content": "q"}, {"role": "user", "content": "q2"}], "out of order"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}], "has no content"),
    ([{"role": "user", "content": "q"}], "ends with an assistant reply"),
    ([{"role": "user", "text": "q"}], "turn 1 must be"),
])
def test_bad_conversations_name_the_place_and_the_fix(messages, fragment):
    with pytest.raises(DataError, match="qa.jsonl:7") as error:
        check_conversation(messages, "qa.jsonl:7", ends_with_reply=True)
    assert fragment in str(error.value)
