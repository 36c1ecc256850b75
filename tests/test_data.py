"""Local collections, TREC files, candidates, negatives."""

from __future__ import annotations

import re

import pandas as pd
import pytest

from mechir.data import (
    DatasetNotFoundError,
    load_collection,
    matching_pairs,
    read_qrels,
    read_run,
    write_run,
)
from tests.helpers import DL19, SCIFACT, requires_shared
from tests.test_matching import toy_collection


def make_collection(root):
    (root / "docs.tsv").write_text("d1\tcats purr\nd2\tdogs bark\nd3\tfish swim\nd4\tbirds fly\n")
    (root / "queries.test.tsv").write_text("q1\tcats\nq2\tdogs\n")
    (root / "qrels.test.txt").write_text("q1 0 d1 2\nq1 0 d2 0\nq2 0 d2 1\n")
    (root / "run.bm25.test.trec").write_text(
        "q1 Q0 d2 1 3.0 bm25\nq1 Q0 d1 2 2.0 bm25\nq1 Q0 d3 3 1.0 bm25\n"
        "q2 Q0 d2 1 5.0 bm25\nq2 Q0 d4 2 1.0 bm25\n"
    )
    return load_collection(root, split="test")


def test_local_collection(tmp_path):
    c = make_collection(tmp_path)
    assert c.query_ids() == ["q1", "q2"]
    assert [(p.qid, p.docid) for p in c.candidates(depth=2)] == [
        ("q1", "d2"),
        ("q1", "d1"),
        ("q2", "d2"),
        ("q2", "d4"),
    ]
    assert [p.docid for p in c.candidates(source="judged")] == ["d1", "d2", "d2"]
    assert c.relevant("q1") == ["d1"] and c.relevant("q1", min_rel=3) == []
    assert c.hard_negatives("q1") == ["d2"]
    assert c.hard_negatives("q2") == ["d4"]  # no judged negative: unjudged run documents
    easy = c.easy_negatives("q1", 2, seed=3)
    assert easy == c.easy_negatives("q1", 2, seed=3) and not set(easy) & {"d1", "d2"}
    with pytest.raises(ValueError, match="unjudged"):
        c.easy_negatives("q1", 3)


def test_run_roundtrip(tmp_path):
    run = {"q1": {"a": 0.5, "b": 2.0}, "q2": {"c": -1.0}}
    write_run(run, tmp_path / "r.trec")
    assert read_run(tmp_path / "r.trec") == run
    assert (tmp_path / "r.trec").read_text().splitlines()[0] == "q1 Q0 b 1 2.000000 mechir"


def test_missing_directory_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="docs.tsv"):
        load_collection(tmp_path)


@pytest.mark.shared
def test_shared_collections():
    requires_shared(SCIFACT)
    quick = load_collection(SCIFACT, split="quick")
    assert len(quick.candidates(depth=20)) == 1000
    dl = load_collection(DL19)
    assert len(dl.query_ids()) == 43 and len(dl.candidates(depth=100)) == 4300


# ---------------------------------------------------------------------------- bad data, named
def test_run_listing_a_document_twice(tmp_path):
    path = tmp_path / "run.trec"
    path.write_text("q1 Q0 d1 1 3.0 t\nq1 Q0 d2 2 2.0 t\nq2 Q0 d1 1 1.0 t\nq1 Q0 d1 3 1.0 t\n")
    message = f"{path}:4: qid 'q1' lists docid 'd1' twice (first at line 1)"
    with pytest.raises(ValueError, match=re.escape(message)):
        read_run(path)


@pytest.mark.parametrize("score", ["abc", "nan", "inf"])
def test_run_score_not_a_number(tmp_path, score):
    path = tmp_path / "run.trec"
    path.write_text(f"q1 Q0 d1 1 3.0 t\nq1 Q0 d2 2 {score} t\n")
    message = f"{path}:2: score '{score}' of qid 'q1', docid 'd2' is not a finite number"
    with pytest.raises(ValueError, match=re.escape(message)):
        read_run(path)


def test_qrels_relevance_not_an_integer(tmp_path):
    path = tmp_path / "qrels.txt"
    path.write_text("q1 0 d1 1\nq1 0 d2 high\n")
    with pytest.raises(ValueError, match=re.escape(f"{path}:2: relevance 'high' is not an")):
        read_qrels(path)


def test_docs_tsv_not_utf8(tmp_path):
    make_collection(tmp_path)
    (tmp_path / "docs.tsv").write_bytes("d1\tcats\nd2\tcaf\xe9 dogs\n".encode("latin-1"))
    message = f"{tmp_path / 'docs.tsv'}:2: not valid UTF-8 (byte 0xe9 at column 7)"
    with pytest.raises(ValueError, match=re.escape(message)):
        load_collection(tmp_path, split="test")


def test_run_referencing_a_missing_document(tmp_path):
    make_collection(tmp_path)
    run_path = tmp_path / "other.trec"
    run_path.write_text("q1 Q0 d1 1 3.0 t\nq2 Q0 d9 1 2.0 t\n")
    c = load_collection(tmp_path, split="test", run=run_path)
    message = f"{run_path}: qid 'q2' ranks docid 'd9', which is not among the documents"
    with pytest.raises(ValueError, match=re.escape(message)):
        c.candidates(depth=5)
    with pytest.raises(ValueError, match="qid 'q1' refers to docid 'd7'"):
        c.pair("q1", "d7")


@pytest.mark.usefixtures("unchecked_shapes")  # tests the library's own errors
@pytest.mark.parametrize("limit", [0, -1, 1.5])
def test_limit_queries_must_be_positive(tmp_path, limit):
    c = make_collection(tmp_path)
    with pytest.raises(ValueError, match=re.escape(repr(limit))):
        c.query_ids(limit)


@pytest.mark.parametrize("depth", [0, -1])
def test_depth_must_be_positive(tmp_path, depth):
    c = make_collection(tmp_path)
    message = f"depth must be an int >= 1 (documents per query), got {depth}"
    with pytest.raises(ValueError, match=re.escape(message)):
        c.candidates(depth=depth)


def test_relative_collection_path_that_does_not_exist(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DatasetNotFoundError, match=r"\./nope: no such collection directory"):
        load_collection("./nope")


def test_unknown_ir_datasets_id():
    """The real ir_datasets registry answers without network: one line, what to pass instead."""
    pytest.importorskip("ir_datasets")
    with pytest.raises(DatasetNotFoundError) as err:
        load_collection("nope-collection/x")
    assert str(err.value).startswith("dataset 'nope-collection/x' not found: no local directory ")
    assert str(err.value).endswith(
        "and not an ir_datasets id; pass a local collection directory (docs.tsv, queries*.tsv, "
        "qrels*.txt) instead, or --dataset demo in the CLI"
    )


def test_collection_repr_is_short(tmp_path):
    c = make_collection(tmp_path)
    text = repr(c)
    assert text.startswith("Collection(") and len(text) < 1000
    assert "2 queries {q1: 'cats', q2: 'dogs'}" in text and "4 documents" in text
    assert "run: 2 queries from " in text and "run.bm25.test.trec" in text


@pytest.mark.shared
def test_shared_collection_repr_is_short():
    requires_shared(SCIFACT)
    text = repr(load_collection(SCIFACT))
    assert len(text) < 1000 and "5183 documents" in text


def test_matching_pairs_from_a_collection():
    col = toy_collection()
    pairs = matching_pairs(col, seed=1)
    assert list(pairs.pair) == list(range(len(pairs)))
    assert set(pairs.qid) == {f"q{i}" for i in range(6)}  # "unjudged" has no relevant document
    counts = pairs.groupby(["qid", "kind"]).size().unstack()
    assert (counts["relevant"] == [1 + i % 2 for i in range(6)]).all()
    assert (counts["easy_negative"] == counts["relevant"]).all() and (
        counts.hard_negative == 1
    ).all()
    assert set(pairs[pairs.kind == "relevant"].relevance) == {1}
    assert set(pairs[pairs.kind == "hard_negative"].relevance) == {0}
    assert set(pairs[pairs.kind == "easy_negative"].relevance) == {-1}
    easy = pairs[pairs.kind == "easy_negative"]
    assert all(d not in col.qrels[q] for q, d in zip(easy.qid, easy.docid))
    assert pairs.document.tolist() == [col.docs[d] for d in pairs.docid]
    pd.testing.assert_frame_equal(pairs, matching_pairs(col, seed=1))  # reproducible
    small = matching_pairs(col, n_queries=3, max_relevant=1, n_easy=2, max_hard=0)
    assert small.qid.nunique() == 3 and (small.groupby("qid").size() == 3).all()
    assert "easy_negative" not in set(matching_pairs(col, n_easy=0).kind)
    with pytest.raises(ValueError, match="not in the collection"):
        matching_pairs(col, query_ids=["zzz"])
    with pytest.raises(ValueError, match="no query has a document judged >= 5"):
        matching_pairs(col, min_rel=5)
