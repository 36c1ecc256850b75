"""The ir_datasets path of ``load_collection`` on a tiny in-memory stand-in (no downloads here)."""

from __future__ import annotations

import sys
import types
from collections import namedtuple

from mechir.data import load_collection

Doc = namedtuple("Doc", "doc_id text")
Query = namedtuple("Query", "query_id text")
Qrel = namedtuple("Qrel", "query_id doc_id relevance iteration")
Scored = namedtuple("Scored", "query_id doc_id score")


class FakeDataset:
    docs = [Doc("d1", "cats purr"), Doc("d2", "dogs bark"), Doc("d3", "fish swim")]

    def queries_iter(self):
        return iter([Query("q1", "cats")])

    def qrels_iter(self):
        return iter([Qrel("q1", "d1", 2, "0"), Qrel("q1", "d3", 0, "0")])

    def has_scoreddocs(self):
        return True

    def scoreddocs_iter(self):
        return iter([Scored("q1", "d2", 9.0), Scored("q1", "d1", 8.0), Scored("q1", "d3", 1.0)])

    def docs_iter(self):
        return iter(self.docs)

    def docs_count(self):
        return len(self.docs)

    def docs_store(self):
        docs = {d.doc_id: d for d in self.docs}
        return types.SimpleNamespace(get=docs.__getitem__)


def test_irds_collection(monkeypatch):
    loaded = []
    fake = types.ModuleType("ir_datasets")
    fake.load = lambda name: loaded.append(name) or FakeDataset()
    monkeypatch.setitem(sys.modules, "ir_datasets", fake)
    col = load_collection("msmarco-passage/trec-dl-2019/judged")
    assert loaded == ["msmarco-passage/trec-dl-2019/judged"]
    assert [(p.docid, p.document) for p in col.candidates(depth=2)] == [
        ("d2", "dogs bark"),
        ("d1", "cats purr"),
    ]
    assert col.hard_negatives("q1") == ["d3"] and col.relevant("q1") == ["d1"]
    assert col.easy_negatives("q1", 1) == ["d2"]
    assert len(col.docs) == 3 and set(col.docs) == {"d1", "d2", "d3"}
