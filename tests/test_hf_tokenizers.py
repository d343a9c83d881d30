"""Hugging Face tokenizers with their own special tokens and chat templates (Llama 3 headers, ChatML with and
without generation markers, Mistral's [INST]): our ids equal transformers' apply_chat_template, the loss mask is
on the assistant replies through their end of turn, pad/bos/eos/stop come from the tokenizer, and bad input fails
with one line naming the fix."""

import json

import pyarrow as pa
import pytest

from raytrain.data.chat_data import PREFS, SFT, TokenizeExamples
from raytrain.data.tokenizer import copy_tokenizer, load_tokenizer
from raytrain.errors import DataError
from tests.families import TOKENIZERS, save_tokenizer
from tests.test_chat import CONVERSATIONS

END_OF_TURN = {"llama3": "<|eot_id|>", "chatml": "<|im_end|>", "chatml-marked": "<|im_end|>",
               "qwen3-think": "<|im_end|>", "mistral": "</s>"}
PAD = {"llama3": "<|finetune_right_pad_id|>", "chatml": "<|endoftext|>", "chatml-marked": "<|endoftext|>",
       "qwen3-think": "<|endoftext|>", "mistral": "<unk>"}


@pytest.fixture(scope="module", params=sorted(TOKENIZERS))
def style(request, tmp_path_factory):
    folder = save_tokenizer(request.param, tmp_path_factory.mktemp(request.param))
    return request.param, folder


def conversations(name):
    # Mistral's template refuses a system turn (tested below): its conversations start with the user. Qwen3's
    # rewrites earlier replies, so prefixes cannot mask a second round (tested below): one round.
    if name == "qwen3-think":
        return [CONVERSATIONS[0]]
    return [c[1:] if name == "mistral" and c[0]["role"] == "system" else c for c in CONVERSATIONS]


def test_ids_equal_apply_chat_template_and_the_mask_is_the_replies(style):
    from transformers import AutoTokenizer

    name, folder = style
    ours, theirs = load_tokenizer(folder), AutoTokenizer.from_pretrained(str(folder))
    for conversation in conversations(name):
        for prompt in (False, True):
            turns = conversation[:-1] if prompt else conversation
            ids, trained = ours.encode_conversation(turns, add_generation_prompt=prompt)
            assert ids == list(theirs.apply_chat_template(turns, add_generation_prompt=prompt, tokenize=True,
                                                          return_dict=False)), (name, prompt)
        ids, trained = ours.encode_conversation(conversation)
        replies = ours.decode([i for i, t in zip(ids, trained, strict=True) if t], skip_special_tokens=False)
        # each reply as the template writes it (Llama 3's trims), through its end of turn and nothing after
        eot = END_OF_TURN[name]
        think = "<think>\n\n</think>\n\n" if name == "qwen3-think" else ""  # the empty reasoning is the reply's
        expected = "".join(think + (t["content"].strip() if name == "llama3" else t["content"]) + eot
                           for t in conversation if t["role"] == "assistant")
        assert replies == expected
        if name == "chatml-marked":  # the template's own generation markers give transformers' assistant mask
            marked = theirs.apply_chat_template(conversation, tokenize=True, return_dict=True,
                                                return_assistant_tokens_mask=True)
            assert [bool(m) for m in marked["assistant_masks"]] == trained


def test_special_ids_come_from_the_tokenizer(style):
    name, folder = style
    vocab = load_tokenizer(folder)
    token = vocab.token_to_id
    assert vocab.pad == token(PAD[name]) and vocab.pad not in vocab.stop_ids
    assert vocab.eos == token(json.loads((folder / "tokenizer_config.json").read_text())["eos_token"])
    assert vocab.stop_ids == tuple(dict.fromkeys((vocab.eos, token(END_OF_TURN[name]))))
    bos = json.loads((folder / "tokenizer_config.json").read_text())["bos_token"]  # None for ChatML's
    assert vocab.bos == (None if bos is None else token(bos))
    # A document: bos where the family has one, the text, eos; a text prompt: bos, the text.
    text = vocab.encode("import json", add_special_tokens=False).ids
    assert vocab.document_ids(text) == ([vocab.bos] if vocab.bos is not None else []) + text + [vocab.eos]
    assert vocab.special["stop"] == list(vocab.stop_ids) and vocab.special.get("assistant") is None


def test_generation_stops_at_any_stop_id():
    from raytrain.model.generate import generate
    from raytrain.model.transformer import Transformer, TransformerConfig

    model = Transformer(TransformerConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1,
                                          max_seq_len=64)).eval()
    model.init_weights(0)
    greedy = generate(model, [[1, 2, 3]], 16)[0]
    first, second = greedy[5], greedy[2]
    assert generate(model, [[1, 2, 3]], 16, stop_ids=(first, second))[0] == greedy[: greedy.index(second) + 1]


def rows_of(folder, kind, examples, row_len=200):
    batch = pa.table({"conversations": [json.dumps(e) for e in examples], "val": pa.array([False] * len(examples)),
                      "kind": [""] * len(examples), "where": [f"chats.jsonl:{i + 1}" for i in range(len(examples))]})
    return TokenizeExamples(str(folder), kind, row_len, max(map(len, examples)), 0, 0.0)(batch)


def test_sft_and_preference_rows_through_the_template(tmp_path):
    folder = save_tokenizer("chatml", tmp_path / "tok")
    vocab = load_tokenizer(folder)
    out = rows_of(folder, SFT.kind, [[CONVERSATIONS[0]]])
    tokens, mask = out.column("tokens").to_pylist()[0], out.column("loss_mask").to_pylist()[0]
    ids, trained = vocab.encode_conversation(CONVERSATIONS[0])
    assert tokens == ids + [vocab.pad] * (200 - len(ids)) and mask[: len(ids)] == [int(t) for t in trained]
    prompt = CONVERSATIONS[0][:1]
    ranked = [[*prompt, {"role": "assistant", "content": text}] for text in ("A JSON string.", "Nothing.")]
    out = rows_of(folder, PREFS.kind, [ranked])
    for j, conversation in enumerate(ranked):
        ids, trained = vocab.encode_conversation(conversation)
        assert out.column(f"response_{j}").to_pylist()[0][: len(ids)] == ids
        assert out.column(f"reply_mask_{j}").to_pylist()[0][: len(ids)] == [int(t) for t in trained]


def test_bad_input_fails_with_one_line_naming_the_fix(tmp_path):
    mistral = save_tokenizer("mistral", tmp_path / "mistral")
    with pytest.raises(DataError, match=r"chats.jsonl:1: the chat template of .* refuses this conversation: "
                                        r"Conversation roles must alternate"):
        rows_of(mistral, SFT.kind, [[CONVERSATIONS[1]]])
    spelled = [{"role": "user", "content": "say <|im_end|> now"}, {"role": "assistant", "content": "no"}]
    with pytest.raises(DataError, match=r"chats.jsonl:1: turn 1 \(user\) spells the special token '<\|im_end\|>'"):
        rows_of(save_tokenizer("chatml", tmp_path / "chatml"), SFT.kind, [[spelled]])

    def broken(name, **changes):
        folder = save_tokenizer("chatml", tmp_path / name)
        settings = json.loads((folder / "tokenizer_config.json").read_text())
        (folder / "tokenizer_config.json").write_text(json.dumps({**settings, **changes}))
        return folder

    with pytest.raises(DataError, match="does not render the assistant reply"):
        load_tokenizer(broken("no-reply", chat_template="{% for m in messages if m.role == 'user' %}{{ m.content }}"
                                                        "{% endfor %}"))
    # Qwen3's way: earlier replies lose their reasoning once a later turn follows. One round still trains;
    # two rounds cannot be masked by prefixes, and the record says so.
    rewrites = load_tokenizer(broken("rewrites", chat_template=(
        "{% for m in messages %}{% if m.role == 'assistant' and not loop.last %}{{ '<|im_start|>assistant\n"
        "<|im_end|>\n' }}{% else %}{{ '<|im_start|>' + m.role + '\n' + m.content + '<|im_end|>\n' }}{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")))
    assert any(rewrites.encode_conversation(CONVERSATIONS[0])[1])
    with pytest.raises(DataError, match=r"renders earlier turns differently .* add \{% generation %\}"):
        rewrites.encode_conversation(CONVERSATIONS[1])
    with pytest.raises(DataError, match="names no eos_token"):
        load_tokenizer(broken("no-eos", eos_token=None))
    with pytest.raises(DataError, match=r"pad_token '<\|nope\|>' is not in tokenizer.json"):
        load_tokenizer(broken("bad-pad", pad_token="<|nope|>"))
    with pytest.raises(DataError, match="does not parse"):
        load_tokenizer(broken("syntax", chat_template="{% for m in messages %}"))
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / "tokenizer.json").write_text((mistral / "tokenizer.json").read_text())
    with pytest.raises(DataError, match="nor a tokenizer_config.json"):
        load_tokenizer(tmp_path / "bare")
    # Without a chat template the tokenizer still serves pre-training data; conversations are refused.
    plain = load_tokenizer(broken("no-template", chat_template=None))
    with pytest.raises(DataError, match="has no chat_template"):
        plain.encode_prompt("hi")


def test_an_exported_folder_keeps_the_tokenizer_as_it_was(tmp_path):
    from transformers import AutoTokenizer

    folder = save_tokenizer("llama3", tmp_path / "tok")
    copy_tokenizer(folder, tmp_path / "out")
    assert (tmp_path / "out" / "tokenizer_config.json").read_text() == (folder / "tokenizer_config.json").read_text()
    theirs = AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    assert theirs.apply_chat_template(CONVERSATIONS[0], tokenize=True, return_dict=False) == \
        load_tokenizer(tmp_path / "out").encode_conversation(CONVERSATIONS[0])[0]
