"""Bad input: one actionable line on stderr, a non-zero exit, and nothing left that looks done."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raytrain.cli import main

pytestmark = pytest.mark.ray


def run_cli(capsys, *args: str) -> tuple[int, str]:
    code = main(list(args))
    return code, capsys.readouterr().err


def prepare_args(inputs, tokenizer, out, *extra):
    return ["data", "prepare", "--config", "tiny", "--input", *inputs, "--tokenizer", str(tokenizer),
            "--out", str(out), *extra]


FORWARDED = re.compile(r"^(\x1b\[\d+m)?\(\w+ pid=\d+")


def assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    assert code == 2
    line = [x for x in err.splitlines() if x.startswith("raytrain: error:")]
    assert len(line) == 1, err
    # raytrain's own output holds no traceback; lines Ray forwards from its processes ("(ListFiles pid=…)": a
    # Ray Data thread that dies noisily when the failed pipeline is torn down, now and then) are Ray's.
    own = [x for x in err.splitlines() if not FORWARDED.match(x)]
    assert not any("Traceback" in x for x in own), err
    for fragment in fragments:
        assert fragment in line[0], line[0]


def assert_nothing_left(out: Path) -> None:
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.tmp-*"))


def test_missing_path(capsys, tmp_path, tiny_tokenizer):
    out = tmp_path / "out"
    code, err = run_cli(capsys, *prepare_args([str(tmp_path / "nope")], tiny_tokenizer, out))
    assert_one_line_error(code, err, "nope' does not exist")
    assert_nothing_left(out)


def test_empty_input_for_tokenizer(capsys, tmp_path):
    (tmp_path / "empty.txt").write_text("")
    out = tmp_path / "tok"
    code, err = run_cli(capsys, "data", "tokenizer", "--config", "tiny",
                        "--input", str(tmp_path / "empty.txt"), "--out", str(out))
    assert_one_line_error(code, err, "hold no non-empty documents")
    assert_nothing_left(out)


def test_corpus_too_small_for_one_row(capsys, tmp_path, tiny_tokenizer):
    (tmp_path / "small.txt").write_text("a few words only")
    out = tmp_path / "out"
    code, err = run_cli(capsys, *prepare_args([str(tmp_path / "small.txt")], tiny_tokenizer, out,
                                              "--seq-len", "256"))
    assert_one_line_error(code, err, "corpus is too small", "rows of 257 tokens", "lower --seq-len")
    assert_nothing_left(out)


def test_malformed_jsonl_names_file_and_line_or_is_skipped(capsys, tmp_path, tiny_tokenizer, corpus):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": oops}\n')
    out = tmp_path / "out"
    args = prepare_args([str(corpus), str(bad)], tiny_tokenizer, out)
    code, err = run_cli(capsys, *args)
    assert_one_line_error(code, err, f"{bad}:2: invalid JSON", "--skip-bad-records")
    assert_nothing_left(out)

    code, err = run_cli(capsys, *args, "--skip-bad-records")
    assert code == 0, err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["documents"]["skipped_by_reason"]["malformed_json"] == 1


def test_parquet_without_text_column_lists_columns(capsys, tmp_path, tiny_tokenizer):
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"body": ["x"], "id": [1]}), path)
    code, err = run_cli(capsys, *prepare_args([str(path)], tiny_tokenizer, tmp_path / "out"))
    assert_one_line_error(code, err, "no column 'text' (columns: body, id)", "--text-field")


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--seq-len", "1"], "'data.prepare.seq_len' is 1; it must be >= 2"),
        (["data.prepare.seq_lne=4"], "did you mean 'data.prepare.seq_len'"),
    ],
)
def test_config_errors_before_any_work(capsys, tmp_path, tiny_tokenizer, corpus, args, fragment):
    code, err = run_cli(capsys, *prepare_args([str(corpus)], tiny_tokenizer, tmp_path / "o", *args))
    assert_one_line_error(code, err, fragment)


def test_finished_output_is_kept_unless_overwrite(capsys, tiny_dataset, tiny_tokenizer, corpus):
    manifest = (tiny_dataset / "manifest.json").read_text()
    shard = tiny_dataset / json.loads(manifest)["splits"]["train"]["shards"][0]["path"]
    before = shard.read_bytes()
    code, err = run_cli(capsys, *prepare_args([str(corpus)], tiny_tokenizer, tiny_dataset))
    assert_one_line_error(code, err, "already holds a finished result", "--overwrite")
    assert (tiny_dataset / "manifest.json").read_text() == manifest

    # Rebuilding the same input gives the same shards: the pipeline is deterministic.
    code, err = run_cli(capsys, *prepare_args([str(corpus)], tiny_tokenizer, tiny_dataset,
                                              "--overwrite"))
    assert code == 0, err
    assert shard.read_bytes() == before
    new = json.loads((tiny_dataset / "manifest.json").read_text())
    assert new["splits"] == json.loads(manifest)["splits"]


def test_vocab_too_small_through_the_console_script(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "raytrain", "data", "tokenizer", "--input", "stdlib",
         "--vocab-size", "100", "--out", str(tmp_path / "t")],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "raytrain: error: config key 'data.tokenizer.vocab_size' is 100; it must be at least 263 "
        "(256 byte symbols plus the special tokens)"
    ]
