"""Local collections, TREC files, candidates, negatives."""

from __future__ import annotations

import pytest

from mechir.data import load_collection, read_run, write_run
from tests.helpers import DL19, SCIFACT, requires_shared


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
