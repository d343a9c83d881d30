"""Fine-tuning data: stdlib-qa/prefs, records → conversations, rows, `raytrain data sft` and `data prefs`."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raytrain.config import ChatDataConfig, load_config
from raytrain.data.chat_data import (
    KTO,
    SFT,
    TokenizeExamples,
    fit_row,
    kto_example,
    kto_label,
    prefs_example,
    sft_example,
)
from raytrain.data.manifest import PreparedDataset
from raytrain.data.stdlib_qa import is_val_module, pairs_of_module, rejected_answers, stdlib_prefs, stdlib_qa, summary
from raytrain.data.tokenizer import load_tokenizer
from raytrain.errors import DataError

MODULE = '''"""Tools for tiny things, used in tests of the question miner."""

def dumps(obj, *, skipkeys=False, ensure_ascii=True, check_circular=True, allow_nan=True, indent=None):
    """Serialize ``obj`` to a JSON formatted ``str``.

    More details that are not the summary.
    """

def _private(x):
    """Never asked about, being private."""

class Decoder:
    """Simple JSON decoder for the few types it knows."""

def undocumented(x):
    pass
'''


def test_questions_of_several_kinds_from_one_module():
    pairs = {(p.kind, p.question): p.answer for p in pairs_of_module(MODULE, "tiny")}
    assert pairs[("module", "What is the `tiny` module for?")] == \
        "Tools for tiny things, used in tests of the question miner."
    assert pairs[("what_does", "What does `tiny.dumps(obj, *, skipkeys=False, ensure_ascii=True, ...)` do?")] == \
        "Serialize ``obj`` to a JSON formatted ``str``."
    assert pairs[("signature", "What are the parameters of `tiny.dumps`?")].startswith("`tiny.dumps(obj, *, skip")
    assert pairs[("which", "Which function in `tiny` would you use to: Serialize ``obj`` to a JSON formatted "
                           "``str``.")] == "`tiny.dumps`"
    assert pairs[("class", "What is `tiny.Decoder`?")] == "Simple JSON decoder for the few types it knows."
    assert len(pairs) == 5  # nothing from _private or undocumented
    assert summary("Args:") is None and summary("short") is None


def test_stdlib_qa_splits_by_package():
    pairs = stdlib_qa()
    assert len(pairs) > 3000 and len({p.kind for p in pairs}) == 5
    val = {p.module.split(".")[0] for p in pairs if is_val_module(p.module, 0, 0.1)}
    train = {p.module.split(".")[0] for p in pairs if not is_val_module(p.module, 0, 0.1)}
    assert val and train and not val & train


def test_stdlib_prefs_rejects_plausible_wrong_answers_of_several_kinds():
    pair = pairs_of_module(MODULE, "tiny")[1]  # what_does tiny.dumps
    wrong = rejected_answers(pair, [pair.answer, "Simple JSON decoder for the few types it knows."])
    assert wrong == {"other_definition": "Simple JSON decoder for the few types it knows.",
                     "truncated": "Serialize ``obj`` to"}
    two = pair.__class__("m", "class", "q", "First sentence here. Second one follows.")
    assert rejected_answers(two, [])["shuffled"] == "Second one follows. First sentence here."
    prefs = stdlib_prefs()
    assert len(prefs) > 1500 and {p.kind for p in prefs} == {"other_definition", "truncated", "shuffled"}
    assert all(p.chosen != p.rejected for p in prefs)


FIELDS = ChatDataConfig()


@pytest.mark.parametrize("record, fragment", [
    ({"prompt": "q"}, "field 'response' is missing or empty"),
    ({"prompt": " ", "response": "a"}, "field 'prompt' is missing or empty"),
    ({"question": "q", "answer": "a"}, "(found: question, answer); set --prompt-field"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "user", "content": "a"}]}, "out of order"),
    ({"messages": [{"role": "user", "content": "q"}]}, "ends with an assistant reply"),
])
def test_bad_records_name_file_line_and_fix(record, fragment):
    with pytest.raises(DataError, match="qa.jsonl:3: ") as error:
        sft_example(record, "qa.jsonl:3", FIELDS)
    assert fragment in str(error.value)


@pytest.mark.parametrize("record, fragment", [
    ({"prompt": "q", "chosen": "a"}, "field 'rejected' is missing or empty"),
    ({"prompt": "q", "chosen": "a", "rejected": "a"}, "two responses are identical"),
    ({"prompt": "q", "responses": ["a", "b", "c"], "ranking": [0, 2]}, "is not a permutation"),
    ({"prompt": "q", "responses": ["a", "b"], "ranking": [1, 1]}, "is not a permutation"),
    ({"prompt": "q", "responses": ["a", ""], "ranking": [1, 0]}, "response 1 in 'responses' is empty"),
    ({"responses": ["a", "b"], "ranking": [1, 0]}, "field 'prompt' is missing or empty"),
])
def test_bad_preference_records_name_file_line_and_fix(record, fragment):
    with pytest.raises(DataError, match="prefs.jsonl:9: ") as error:
        prefs_example(record, "prefs.jsonl:9", FIELDS)
    assert fragment in str(error.value)


def test_rankings_order_responses_best_first():
    ranked = prefs_example({"prompt": "q", "responses": ["ok", "best", "worst"], "ranking": [1, 0, 2]}, "x", FIELDS)
    assert [c[1]["content"] for c in ranked] == ["best", "ok", "worst"]
    assert all(c[0] == {"role": "user", "content": "q"} for c in ranked)


def test_rows_keep_the_last_reply_and_cut_from_the_left():
    ids = [4, 9, 9, 9, 1, 5, 7, 7, 1]  # user turn, <|assistant|> (5), the reply and <|eos|>
    trained = [False] * 6 + [True] * 3
    assert fit_row(ids, trained, 16) == ("", 0)
    assert fit_row(ids, trained, 6) == ("truncated", 3)  # the user turn loses 3 tokens
    assert fit_row(ids, trained, 3) == ("reply_longer_than_row", -1)
    assert fit_row(ids[:5], trained[:5], 16) == ("no_reply", -1)


def test_tokenize_conversations_pads_and_masks(plain_tokenizer):
    tokenizer = load_tokenizer(plain_tokenizer)
    turns = [{"role": "user", "content": "What is `json.dumps`?"}, {"role": "assistant", "content": "A function."}]
    ids, trained = tokenizer.encode_conversation(turns)
    batch = pa.table({"conversations": [json.dumps([turns])], "val": pa.array([False]), "kind": [""],
                      "where": ["example.jsonl:1"]})
    out = TokenizeExamples(str(plain_tokenizer), SFT.kind, len(ids) + 4, 1, 0, 0.0)(batch)
    row = out.column("tokens").to_pylist()[0]
    mask = out.column("loss_mask").to_pylist()[0]
    assert row == ids + [2] * 4 and mask == [int(t) for t in trained] + [0] * 4
    assert tokenizer.decode([t for t, m in zip(row, mask, strict=True) if m], skip_special_tokens=False) == \
        "A function.<|eos|>"


def test_kto_rows_hold_the_completion_its_mismatched_pair_and_its_label(plain_tokenizer):
    tokenizer = load_tokenizer(plain_tokenizer)
    fields = ChatDataConfig()
    records = [{"prompt": "Is `len` a builtin?", "completion": "Yes.", "label": True},
               {"prompt": "What is `json`?", "completion": "A cheese.", "label": False},
               {"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}],
                "label": 1}]
    examples = [KTO.example(r, f"k.jsonl:{i}", fields) for i, r in enumerate(records, 1)]
    assert [label for *_, label in examples] == [1, 0, 1]
    for record, error in (({"prompt": "Q", "completion": "A"}, "'label' is missing"),
                          ({"prompt": "Q", "completion": "A", "label": "yes"}, "'label' is 'yes'"),
                          ({"prompt": "Q", "label": True}, "'completion' is missing")):
        with pytest.raises(DataError, match=f"k.jsonl:9: field {error}"):
            kto_label(record, "k.jsonl:9", fields) if "label" in error else kto_example(record, "k.jsonl:9", fields)
    batch = pa.table({"conversations": [json.dumps(c) for c, *_ in examples], "val": pa.array([False] * 3),
                      "kind": [""] * 3, "label": pa.array([1, 0, 1], pa.int8()), "where": ["k"] * 3})
    out = TokenizeExamples(str(plain_tokenizer), KTO.kind, 48, 1, 0, 0.0)(batch)
    assert out.column("units").to_pylist() == [1, 0, 1]
    assert [row[0] for row in out.column("label").to_pylist()] == [1, 0, 1]

    def replies(tokens, mask):
        return [tokenizer.decode([t for t, m in zip(row, marks, strict=True) if m]) for row, marks in zip(
            out.column(tokens).to_pylist(), out.column(mask).to_pylist(), strict=True)]

    assert replies("tokens", "loss_mask") == ["Yes.", "A cheese.", "Hello."]
    # Each prompt with the next example's completion (the last with the first's).
    assert replies("kl_tokens", "kl_mask") == ["A cheese.", "Hello.", "Yes."]
    assert tokenizer.decode(out.column("kl_tokens").to_pylist()[0]).startswith("Is `len` a builtin?")


@pytest.mark.ray
def test_data_sft_writes_rows_masks_and_counts(capsys, tmp_path, tiny_tokenizer):
    from raytrain.cli import main
    from raytrain.stages import STAGES

    long_prompt = "tell me " * 60
    records = [
        {"prompt": "What does `json.dumps` do?", "response": "It serializes an object to JSON."},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"},
                      {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Name a module."},
                      {"role": "assistant", "content": "json"}]},
        {"prompt": long_prompt, "response": "Fits once the prompt is cut."},  # truncated from the left
        {"prompt": "Long answer?", "response": "word " * 200},  # dropped: the reply alone is too long
    ]
    source = tmp_path / "qa.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in records))
    pq.write_table(pa.table({"question": ["Parquet prompt?"] * 3, "answer": ["Parquet answer."] * 3}),
                   tmp_path / "qa.parquet")
    out = tmp_path / "sft"

    def data_sft(source, out, *extra):
        return main(["data", "sft", "--config", "tiny", "--input", str(source), "--tokenizer", str(tiny_tokenizer),
                     "--seq-len", "64", "--out", str(out), "--val-fraction", "0.0", *extra])

    assert data_sft(source, out) == 0, capsys.readouterr().err
    data = PreparedDataset.open(out)
    examples = data.manifest["examples"]
    assert data.kind == "sft" and examples == {"read": 4, "truncated": 1, "dropped": 1,
                                               "dropped_by_reason": {"reply_longer_than_row": 1}, "by_kind": {}}
    table = pq.read_table(data.split("train").paths[0])
    tokens = np.array(table.column("tokens").to_pylist())
    mask = np.array(table.column("loss_mask").to_pylist(), bool)
    tokenizer = load_tokenizer(tiny_tokenizer)
    answers = [tokenizer.decode(row[m].tolist(), skip_special_tokens=False) for row, m in zip(tokens, mask,
                                                                                               strict=True)]
    assert answers == ["It serializes an object to JSON.<|eos|>", "Hello.<|eos|>json<|eos|>",
                       "Fits once the prompt is cut.<|eos|>"]
    assert data.manifest["splits"]["train"]["trained_tokens"] == int(mask.sum())

    # A bad record: one line naming file:line, and no output folder left behind.
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(records[0]) + "\n" + json.dumps({"prompt": "q", "response": ""}) + "\n")
    code = data_sft(bad, tmp_path / "bad")
    err = capsys.readouterr().err
    assert code == 2 and f"{bad}:2: field 'response' is missing or empty" in err
    assert not (tmp_path / "bad").exists()
    # Other field names, from Parquet.
    assert data_sft(tmp_path / "qa.parquet", tmp_path / "pq", "--prompt-field", "question",
                    "--response-field", "answer") == 0
    assert PreparedDataset.open(tmp_path / "pq").manifest["splits"]["train"]["rows"] == 3

    # Fine-tuning data is refused by pre-training, before any worker starts.
    with pytest.raises(DataError, match="holds sft data"):
        STAGES["pretrain"].preflight(load_config("tiny", [f"train.data='{out}'"]))


@pytest.mark.ray
def test_data_prefs_ranks_responses_best_first_and_counts_pairs(capsys, tmp_path, tiny_tokenizer):
    from raytrain.cli import main

    source = tmp_path / "prefs.jsonl"
    source.write_text(json.dumps({"prompt": "Which module parses JSON?", "chosen": "json", "rejected": "csv"}) + "\n"
                      + json.dumps({"prompt": "Sort a list?", "responses": ["sort it by hand", "sorted(xs)", "no"],
                                    "ranking": [1, 0, 2]}) + "\n")
    out = tmp_path / "prefs"
    args = ["data", "prefs", "--config", "tiny", "--input", str(source), "stdlib-prefs", "--tokenizer",
            str(tiny_tokenizer), "--seq-len", "64", "--out", str(out), "--val-fraction", "0.1"]
    assert main(args) == 0, capsys.readouterr().err
    data = PreparedDataset.open(out)
    manifest = data.manifest
    responses = ("response_0", "response_1", "response_2")
    assert data.kind == "prefs" and data.columns == (*responses, "reply_mask_0", "reply_mask_1", "reply_mask_2")
    kept = manifest["examples"]["read"] - manifest["examples"]["dropped"]
    assert set(manifest["examples"]["by_kind"]) == {"other_definition", "truncated", "shuffled"}
    assert sum(manifest["examples"]["by_kind"].values()) == kept - 2  # the file's two examples have no kind
    splits = manifest["splits"]
    assert splits["train"]["pairs"] + splits["val"]["pairs"] == kept - 2 + 1 + 3  # a ranking of 3 gives 3 pairs

    # Every row holds a prompt's responses best first; an unused slot is all padding.
    tokenizer = load_tokenizer(tiny_tokenizer)

    def reply(tokens):
        text = [t for t in tokens if t != 2]  # <|pad|>
        return tokenizer.decode(text, skip_special_tokens=False).split("<|assistant|>")[-1] if text else None

    tables = [pq.read_table(path) for split in ("train", "val") for path in data.split(split).paths]
    ranked = [[reply(t.column(c)[i].as_py()) for c in responses] for t in tables for i in range(t.num_rows)]
    assert ["json<|eos|>", "csv<|eos|>", None] in ranked
    assert ["sorted(xs)<|eos|>", "sort it by hand<|eos|>", "no<|eos|>"] in ranked
    # Each response's reply mask marks exactly its reply (what DPO sums over).
    marked = [[tokenizer.decode([token for token, m in zip(table.column(c)[i].as_py(),
                                                           table.column(f"reply_mask_{j}")[i].as_py(), strict=True)
                                 if m], skip_special_tokens=False) or None
               for j, c in enumerate(responses)] for table in tables for i in range(table.num_rows)]
    assert marked == ranked

    assert main([*args[:5], "stdlib-qa", *args[7:-4], "--out", str(tmp_path / "wrong")]) == 2
    assert "'stdlib-qa' is sft data; use `raytrain data sft`" in capsys.readouterr().err
