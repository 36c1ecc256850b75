"""The PyTerrier reranker: a DataFrame pipeline over the demo collection (no Java), scores equal
to :func:`mechir.evaluation.rerank`, interventions compared by ``pt.Experiment``."""

from __future__ import annotations

import pandas as pd
import pytest
from ir_measures import nDCG

pt = pytest.importorskip(
    "pyterrier", reason="python-terrier not installed (pip install 'mechir[pyterrier]')"
)

from mechir import load_cross_encoder  # noqa: E402
from mechir.data import load_collection  # noqa: E402
from mechir.evaluation import rerank  # noqa: E402
from mechir.hooks import head_knockout_hooks  # noqa: E402
from mechir.pyterrier import MechirReranker  # noqa: E402

N_QUERIES = 3


@pytest.fixture(scope="module")
def setting():
    model = load_cross_encoder("demo", device="cpu")
    col = load_collection("demo")
    qids = col.query_ids(N_QUERIES)
    pairs = col.candidates(depth=20, query_ids=qids)
    topics = pd.DataFrame({"qid": qids, "query": [col.queries[q] for q in qids]})
    first_stage = pd.DataFrame(
        {
            "qid": [p.qid for p in pairs],
            "query": [p.query for p in pairs],
            "docno": [p.docid for p in pairs],
            "text": [p.document for p in pairs],
            "score": [col.run[p.qid][p.docid] for p in pairs],
        }
    )
    bm25 = pt.Transformer.from_df(pt.model.add_ranks(first_stage))
    qrels = pd.DataFrame(
        [(q, d, r) for q in qids for d, r in col.qrels[q].items()],
        columns=["qid", "docno", "label"],
    )
    return model, pairs, topics, bm25, qrels


def _scores(frame: pd.DataFrame) -> dict[tuple[str, str], float]:
    return {(q, d): s for q, d, s in zip(frame.qid, frame.docno, frame.score)}


@pytest.mark.slow
def test_pipeline_scores_equal_rerank_and_experiment_compares(setting):
    model, pairs, topics, bm25, qrels = setting
    knockout = head_knockout_hooks(model, heads=["0/1", "2/3"])  # built once
    plain = MechirReranker(model, max_length=160, name="plain")
    ablated = MechirReranker(model, hooks=knockout, max_length=160, name="knockout")

    for stage, hooks in ((plain, None), (ablated, knockout)):
        frame = (bm25 >> stage).transform(topics)
        expected = rerank(model, pairs, hooks=hooks, max_length=160, progress=False)
        got = _scores(frame)
        assert len(got) == len(pairs)
        for p in pairs:
            assert got[(p.qid, p.docid)] == pytest.approx(expected[p.qid][p.docid], abs=1e-5)
        for _, group in frame.groupby("qid"):  # ranks follow the scores
            ordered = group.sort_values("rank")
            assert ordered["rank"].tolist() == list(range(len(group)))
            assert ordered.score.is_monotonic_decreasing
    plain_scores = _scores((bm25 >> plain).transform(topics))
    ablated_scores = _scores((bm25 >> ablated).transform(topics))
    assert max(abs(plain_scores[k] - ablated_scores[k]) for k in plain_scores) > 1e-3

    table = pt.Experiment(
        [bm25 >> plain, bm25 >> ablated],
        topics,
        qrels,
        eval_metrics=[nDCG @ 10],
        names=["plain", "knockout"],
        baseline=0,
    )
    assert list(table.name) == ["plain", "knockout"]
    assert "nDCG@10 p-value" in table.columns
    from mechir.evaluation import evaluate

    expected = evaluate(
        rerank(model, pairs, max_length=160, progress=False),
        {q: dict(zip(g.docno, g.label)) for q, g in qrels.groupby("qid")},
    ).aggregate["nDCG@10"]
    assert table.loc[0, "nDCG@10"] == pytest.approx(expected, abs=1e-9)


def test_missing_text_column_says_what_to_do(setting):
    model, *_ = setting
    frame = pd.DataFrame({"qid": ["1"], "query": ["q"], "docno": ["d"]})
    with pytest.raises(ValueError, match="missing \\['text'\\].*get_text"):
        MechirReranker(model).transform(frame)
