import json

import pytest

from raytrain.data.sources import decode_utf8, parse_jsonl, resolve_sources, stdlib_files
from raytrain.errors import DataError


def test_stdlib_corpus_excludes_tests_and_site_packages():
    files = stdlib_files()
    assert len(files) > 300
    assert any(f.endswith("/json/decoder.py") for f in files)
    assert not [f for f in files if "/test/" in f or "site-packages" in f or "/tests/" in f]


def test_resolve_files_folders_globs_and_uris(corpus):
    kinds = {f.path.rsplit("/", 1)[-1]: f.kind for f in resolve_sources([str(corpus)])}
    assert kinds["docs.jsonl"] == "jsonl" and kinds["docs.parquet"] == "parquet"
    assert kinds["readme.md"] == "text" and kinds["module_00.txt"] == "text"
    assert len(resolve_sources([f"{corpus}/**/*.md"])) == 2
    uri = resolve_sources([f"file://{corpus}/docs.jsonl"])
    assert [f.path for f in uri] == [f"file://{corpus}/docs.jsonl"]
    # The same file named twice is read once.
    assert len(resolve_sources([str(corpus / "latin1.txt")] * 2)) == 1


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p / "missing", "does not exist; check the path"),
        (lambda p: p, "has no .txt, .md, .jsonl or .parquet files"),
        (lambda p: (p / "x.csv").write_text("a") and p / "x.csv", "unsupported type"),
    ],
)
def test_unusable_inputs(tmp_path, make, message):
    with pytest.raises(DataError, match=message):
        resolve_sources([str(make(tmp_path))])


def test_files_of_other_suffixes_are_counted_or_read_as_text(corpus, tmp_path, caplog):
    kinds = {f.path.rsplit("/", 1)[-1]: f.kind for f in resolve_sources([str(corpus)])}
    assert kinds["LICENSE"] == kinds["todo.rst"] == "other" and "HEAD" not in kinds
    assert "2 file(s) skipped as not .txt/.md/.jsonl/.parquet" in caplog.text
    assert "--other-files-as-text" in caplog.text
    kinds = {f.path.rsplit("/", 1)[-1]: f.kind for f in resolve_sources([str(corpus)], other_files_as_text=True)}
    assert kinds["LICENSE"] == kinds["todo.rst"] == "text"

    for name in ("LICENSE", "COPYING", "GPL-3"):
        (tmp_path / name).write_text("licence text")
    with pytest.raises(DataError, match=r"no \.txt.*\(3 file\(s\) skipped .*--other-files-as-text"):
        resolve_sources([str(tmp_path)])
    assert len(resolve_sources([str(tmp_path)], other_files_as_text=True)) == 3


def test_decode_counts_replaced_bytes():
    assert decode_utf8("ok ✓".encode()) == ("ok ✓", 0)
    text, replaced = decode_utf8(b"caf\xe9 \xff\xfe end")
    assert (text, replaced) == ("caf\ufffd \ufffd\ufffd end", 3)


def test_jsonl_errors_name_file_and_line():
    data = b'{"text": "a"}\n\n{"text": "b"\n'
    with pytest.raises(DataError, match=r"^f.jsonl:3: invalid JSON .*--skip-bad-records"):
        parse_jsonl(data, "f.jsonl", "text", skip_bad_records=False)
    with pytest.raises(DataError, match=r"f.jsonl:1: no field 'body' \(found: text\); set --text-field"):
        parse_jsonl(data, "f.jsonl", "body", skip_bad_records=False)
    with pytest.raises(DataError, match=r"f.jsonl:1: field 'text' is int"):
        parse_jsonl(b'{"text": 3}', "f.jsonl", "text", skip_bad_records=False)


def test_jsonl_skip_bad_records_counts_them():
    lines = [json.dumps({"text": "one"}), "{broken", json.dumps({"other": 1}), json.dumps([1])]
    rows = parse_jsonl("\n".join(lines).encode(), "f.jsonl", "text", skip_bad_records=True)
    assert rows == [("one", 0, ""), ("", 0, "malformed_json"), ("", 0, "missing_field"),
                    ("", 0, "missing_field")]
