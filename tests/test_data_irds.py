"""The ir_datasets path of ``load_collection`` on a tiny in-memory stand-in (no downloads here)."""

from __future__ import annotations

import os
import sys
import time
import types
from collections import namedtuple
from pathlib import Path

import pytest

from mechir import data
from mechir.data import DatasetNotFoundError, load_collection

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


class UnreachableDataset(FakeDataset):
    """A dataset whose files are not stored locally: reading them tries to download."""

    def queries_iter(self):
        raise RuntimeError("All download sources failed")


def test_irds_files_missing_offline_fail_fast_with_one_line(monkeypatch):
    fake = types.ModuleType("ir_datasets")
    fake.load = lambda name: UnreachableDataset()
    monkeypatch.setitem(sys.modules, "ir_datasets", fake)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("IR_DATASETS_HOME", "/data/irds")
    with pytest.raises(DatasetNotFoundError) as err:
        load_collection("msmarco-passage/trec-dl-2019/judged")
    assert str(err.value) == (
        "dataset 'msmarco-passage/trec-dl-2019/judged': its files are not in the local "
        "ir_datasets store (/data/irds) and downloads were not tried (offline: HF_HUB_OFFLINE=1); "
        "pass a local collection directory (docs.tsv, queries*.tsv, qrels*.txt) instead, or "
        "--dataset demo in the CLI"
    )


def test_irds_mirror_unreachable(monkeypatch):
    fake = types.ModuleType("ir_datasets")
    fake.load = lambda name: UnreachableDataset()
    monkeypatch.setitem(sys.modules, "ir_datasets", fake)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(data, "IRDS_MIRROR", "http://127.0.0.1:9")
    with pytest.raises(
        DatasetNotFoundError, match=r"mirror http://127.0.0.1:9 is unreachable \(Connection refu"
    ):
        load_collection("x/y")


def test_real_irds_offline_does_not_download(monkeypatch):
    """The real ir_datasets with a dataset whose files are not stored: offline, it fails at once
    (downloads go to a closed port), in one line, and the proxy settings are restored."""
    pytest.importorskip("ir_datasets")
    store = Path(os.environ.get("IR_DATASETS_HOME", Path.home() / ".ir_datasets"))
    if any(p.is_file() for p in (store / "msmarco-passage").rglob("*")):
        pytest.skip("msmarco-passage is stored locally on this machine")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    proxy_before = os.environ.get("HTTPS_PROXY")
    start = time.perf_counter()
    with pytest.raises(
        DatasetNotFoundError, match=r"downloads were not tried \(offline: HF_HUB_OFFLINE=1\); pass"
    ):
        load_collection("msmarco-passage/trec-dl-2019/judged")
    assert time.perf_counter() - start < 15
    assert os.environ.get("HTTPS_PROXY") == proxy_before
