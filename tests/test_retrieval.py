"""Dense retrieval: exact search scores equal the model's pair scores; the cached index is
reused only for the same weights, settings and documents."""

from __future__ import annotations

import pytest
import torch

from mechir.models.biencoder import load_bi_encoder
from mechir.retrieval import build_index, search
from tests.helpers import DOCUMENTS, QUERIES, tiny_hf_model, tiny_tokenizer


@pytest.fixture(scope="module")
def bi(tmp_path_factory):
    tok = tiny_tokenizer(tmp_path_factory.mktemp("tok"))
    return load_bi_encoder(tiny_hf_model(7).bert, tokenizer=tok, device="cpu")


@pytest.mark.parametrize("similarity", ["cosine", "dot"])
def test_search_scores_are_the_pair_scores(bi, similarity):
    bi.similarity = similarity
    try:
        docs = {f"d{i}": text for i, text in enumerate(DOCUMENTS)}
        queries = {f"q{i}": text for i, text in enumerate(QUERIES)}
        run = search(bi, build_index(bi, docs, batch_size=3), queries, k=3)
        for qid, ranked in run.items():
            assert len(ranked) == 3
            ids = list(ranked)
            batch = bi.encode([queries[qid]] * 3, [docs[d] for d in ids])
            torch.testing.assert_close(
                torch.tensor(list(ranked.values())), bi.score(batch), atol=1e-5, rtol=0
            )
            every = bi.score(bi.encode([queries[qid]] * len(docs), list(docs.values())))
            assert max(ranked.values()) == pytest.approx(float(every.max()), abs=1e-5)
    finally:
        bi.similarity = "cosine"


def test_the_cached_index_is_reused_only_when_it_matches(bi, tmp_path, monkeypatch):
    docs = {f"d{i}": text for i, text in enumerate(DOCUMENTS)}
    first = build_index(bi, docs, cache=tmp_path / "index")
    calls = []
    original = bi.embeddings
    monkeypatch.setattr(bi, "embeddings", lambda *a, **k: calls.append(1) or original(*a, **k))
    again = build_index(bi, docs, cache=tmp_path / "index")
    assert calls == [] and (again.embeddings == first.embeddings).all()
    build_index(bi, {**docs, "d9": "a new red fish"}, cache=tmp_path / "index")
    assert calls == [1]


def test_rerank_from_index_equals_pair_scores_and_refuses_unindexed(bi):
    from mechir.retrieval import rerank_from_index

    docs = {f"d{i}": text for i, text in enumerate(DOCUMENTS)}
    index = build_index(bi, docs)
    queries = {"q0": QUERIES[0], "q1": QUERIES[1]}
    candidates = {"q0": {"d2": 0.0, "d0": 0.0}, "q1": {"d3": 0.0}}
    run = rerank_from_index(bi, index, queries, candidates)
    for qid, ranked in run.items():
        batch = bi.encode([queries[qid]] * len(ranked), [docs[d] for d in ranked])
        torch.testing.assert_close(
            torch.tensor(list(ranked.values())), bi.score(batch), atol=1e-5, rtol=0
        )
    with pytest.raises(ValueError, match="docid 'd9' is not in the index"):
        rerank_from_index(bi, index, queries, {"q0": {"d9": 0.0}})


def test_the_index_cache_never_replaces_a_file_mechir_did_not_write(bi, tmp_path):
    """A user's ``index.npy`` where the cache would go is refused in one line, byte-identical
    (the rule of :mod:`mechir.outputs`); mechir's own stale cache is replaced."""
    docs = {f"d{i}": text for i, text in enumerate(DOCUMENTS)}
    (tmp_path / "index.npy").write_bytes(b"mine")
    with pytest.raises(ValueError, match="index.npy exists and was not written by mechir"):
        build_index(bi, docs, cache=tmp_path / "index")
    assert (tmp_path / "index.npy").read_bytes() == b"mine"
    build_index(bi, docs, cache=tmp_path / "own")
    build_index(bi, {**docs, "d9": "a new red fish"}, cache=tmp_path / "own")  # stale: replaced


def test_dense_retrieval_study_refuses_a_user_file_before_loading(tmp_path, capsys):
    """The study's outputs go through mechir.outputs: a user's summary.md is refused in one line
    (status 2) before the model loads, and left byte-identical."""
    from analyses.dense_retrieval import main

    (tmp_path / "summary.md").write_text("my notes\n")
    assert main(["--model", str(tmp_path / "absent"), "--output", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "summary.md exists and was not written by mechir" in err[0]
    assert (tmp_path / "summary.md").read_text() == "my notes\n"
