"""nDCG@10 against a hand computation; significance tests; end-to-end rerank on shared assets."""

from __future__ import annotations

import math

import pytest
import torch

from mechir import load_cross_encoder
from mechir.data import Pair, load_collection
from mechir.evaluation import evaluate, holm, paired_ttest, rerank
from tests.helpers import SCIFACT, SHARED_MAX_LENGTH, SHARED_MODEL, requires_shared


def test_ndcg_at_10_by_hand():
    qrels = {"q": {"a": 2, "b": 1, "c": 0}}
    run = {"q": {"c": 3.0, "a": 2.0, "x": 1.5, "b": 1.0}}
    # ir_measures' nDCG (pytrec_eval) uses the relevance grade itself as the gain
    dcg = 0 / math.log2(2) + 2 / math.log2(3) + 0 / math.log2(4) + 1 / math.log2(5)
    idcg = 2 / math.log2(2) + 1 / math.log2(3)
    ev = evaluate(run, qrels)
    assert ev.aggregate["nDCG@10"] == pytest.approx(dcg / idcg, abs=1e-9)
    assert ev.values("nDCG@10") == {"q": pytest.approx(dcg / idcg, abs=1e-9)}


def test_queries_missing_from_the_run():
    qrels = {"q1": {"a": 1}, "q2": {"b": 1}}
    run = {"q1": {"a": 1.0, "x": 0.5}}
    assert evaluate(run, qrels).aggregate["nDCG@10"] == pytest.approx(1.0)
    assert evaluate(run, qrels, missing="zero").aggregate["nDCG@10"] == pytest.approx(0.5)


def test_paired_ttest_and_holm():
    from scipy.stats import ttest_rel

    a = {"1": 0.1, "2": 0.5, "3": 0.3, "4": 0.9}
    b = {"1": 0.2, "2": 0.4, "3": 0.6, "4": 1.0, "5": 0.0}
    res = paired_ttest(a, b)
    ref = ttest_rel([0.2, 0.4, 0.6, 1.0], [0.1, 0.5, 0.3, 0.9])
    assert res.n == 4 and res.p == pytest.approx(ref.pvalue) and res.delta == pytest.approx(0.1)
    assert paired_ttest(a, a).p == 1.0
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])


def test_paired_ttest_zero_variance():
    """A constant shift is maximally significant; identical runs are not significant at all."""
    a = {str(q): v for q, v in enumerate([0.1, 0.3, 0.7, 0.9, 0.25])}
    shifted = {q: v - 0.5 for q, v in a.items()}
    down = paired_ttest(a, shifted)
    assert down.t == -math.inf and down.p == 0.0 and down.delta == pytest.approx(-0.5)
    up = paired_ttest(shifted, a)
    assert up.t == math.inf and up.p == 0.0
    same = paired_ttest(a, dict(a))
    assert same.t == 0.0 and same.p == 1.0 and same.delta == 0.0
    # a near-constant shift agrees with scipy's own limit
    jitter = {q: v + 0.2 + 1e-3 * i for i, (q, v) in enumerate(a.items())}
    assert paired_ttest(a, jitter).p < 1e-6


def test_constant_shift_is_significant_after_holm():
    from analyses.reranking import compare_to_baseline

    base = {str(q): 0.1 * q for q in range(6)}
    values = {
        "base": base,
        "shift": {q: v - 0.5 for q, v in base.items()},
        "same": dict(base),
    }
    frame = compare_to_baseline(values, "base", ["shift", "same"]).set_index("unit")
    assert frame.loc["shift", "p_holm"] == 0.0 and bool(frame.loc["shift", "significant"])
    assert frame.loc["same", "p_holm"] == 1.0 and not bool(frame.loc["same", "significant"])


def test_paired_ttest_rejects_non_finite():
    with pytest.raises(ValueError, match=r"non-finite for queries \['2'\]"):
        paired_ttest({"1": 0.1, "2": 0.2}, {"1": 0.3, "2": math.nan})


def test_queries_without_relevant_documents_warn_and_count_as_zero():
    run = {"1": {"a": 2.0, "b": 1.0}, "2": {"c": 1.0}}
    qrels = {"1": {"a": 1}, "2": {"c": 0, "d": 0}}
    with pytest.warns(UserWarning, match=r"1 of 2 judged queries have no relevant document \(e"):
        result = evaluate(run, qrels)
    assert result.values() == {"1": 1.0, "2": 0.0}
    assert result.aggregate["nDCG@10"] == pytest.approx(0.5)


def test_empty_document_names_the_pair(tiny):
    model, _, _ = tiny
    pairs = [Pair("q1", "d1", "cat", "the cat"), Pair("q1", "d2", "cat", "  ")]
    with pytest.raises(ValueError, match="qid 'q1', docid 'd2': the document is empty"):
        rerank(model, pairs, progress=False)


def test_non_finite_scores_name_the_pairs(tiny):
    model, _, _ = tiny
    pairs = [Pair("q1", f"d{i}", "cat", d) for i, d in enumerate(["the cat", "a dog", "fish"])]
    clean = rerank(model, pairs, progress=False)["q1"]
    lowest = min(clean, key=clean.get)

    def poison_lowest(x, hook):  # the lowest-scored pair of the (single) sub-batch becomes NaN
        out = x.clone()
        out[x.argmin()] = math.nan
        return out

    message = rf"1 of 3 scores are not finite \(NaN/inf\), e.g. \(qid 'q1', docid '{lowest}'\)"
    with pytest.raises(ValueError, match=message):
        rerank(model, pairs, hooks=[("hook_score", poison_lowest)], progress=False)


def test_rerank_tiny(tiny):
    model, _, _ = tiny
    pairs = [
        Pair("q1", f"d{i}", "what cat runs", d)
        for i, d in enumerate(["the cat runs", "a dog", "blue fish", "red car road the", "cat"])
    ]
    run = rerank(model, pairs, batch_size=2, progress=False)
    direct = model.score(model.encode([p.query for p in pairs], [p.document for p in pairs]))
    assert list(run) == ["q1"]
    torch.testing.assert_close(
        torch.tensor([run["q1"][p.docid] for p in pairs]), direct, atol=1e-5, rtol=0
    )


@pytest.mark.shared
def test_mechir_rerank_shared_quick_reproduces_reference(tmp_path, capsys):
    """README reference on the quick SciFact set: BM25 0.7923, the model 0.7684 (through the
    ``mechir rerank`` command), and the model's scores equal Hugging Face's."""
    requires_shared()
    requires_shared(SCIFACT)
    import json

    from transformers import AutoModelForSequenceClassification

    from mechir.cli import main
    from mechir.data import read_run

    col = load_collection(SCIFACT, split="quick")
    assert evaluate(col.run, col.qrels).aggregate["nDCG@10"] == pytest.approx(0.7923, abs=1e-4)
    out = tmp_path / "run.trec"
    argv = [
        "rerank",
        "--model",
        str(SHARED_MODEL),
        "--dataset",
        str(SCIFACT),
        "--split",
        "quick",
        "--depth",
        "20",
        "--max-length",
        str(SHARED_MAX_LENGTH),
        "--device",
        "cpu",
        "--output",
        str(out),
    ]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["pairs"] == 1000 and summary["nDCG@10"] == pytest.approx(0.7684, abs=0.002)
    run = read_run(out)
    model = load_cross_encoder(SHARED_MODEL, device="cpu")
    hf = AutoModelForSequenceClassification.from_pretrained(
        SHARED_MODEL, attn_implementation="eager"
    ).eval()
    pairs = col.candidates(depth=20)[:40]
    batch = model.encode(
        [p.query for p in pairs], [p.document for p in pairs], max_length=SHARED_MAX_LENGTH
    )
    with torch.no_grad():
        ref = hf(
            input_ids=batch.input_ids,
            token_type_ids=batch.token_type_ids,
            attention_mask=batch.attention_mask,
        ).logits[:, 0]
    written = torch.tensor([run[p.qid][p.docid] for p in pairs])
    torch.testing.assert_close(written, ref, atol=2e-5, rtol=0)  # 6 decimals in the run file
