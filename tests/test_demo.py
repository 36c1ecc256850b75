"""The embedded demo: the ``demo`` names, the float16 weights upcast at load, the collection, and
(shared tier) its measured agreement with the float32 shared model."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from mechir import load_cross_encoder
from mechir.data import load_collection, read_run
from mechir.demo import (
    demo_collection_dir,
    demo_model_dir,
    is_demo,
    resolve_model,
)
from tests.helpers import SHARED_MODEL, requires_shared

REFERENCE_NDCG = 0.7684  # ../shared/README.md: the float32 model, plain Hugging Face


@pytest.fixture(scope="module")
def demo_model():
    return load_cross_encoder("demo", device="cpu")


def test_demo_name_is_explicit():
    assert is_demo("demo")
    assert not is_demo("./demo") and not is_demo("demo/") and not is_demo(None)
    assert resolve_model("demo") == str(demo_model_dir())
    assert resolve_model("bert-base-uncased") == "bert-base-uncased"


def test_demo_collection():
    col = load_collection("demo")
    assert col.name.startswith("demo")
    assert len(col.queries) == 50 and len(col.query_ids()) == 50
    pairs = col.candidates(depth=20)
    assert len(pairs) == 1000
    ranked = {p.docid for p in pairs}
    judged = {d for docs in col.qrels.values() for d in docs}
    assert len(ranked) == 782 and len(col.docs) == len(ranked | judged) == 789
    assert judged <= set(col.docs)  # every judged document is there (matching_pairs needs them)
    assert load_collection("demo", split="quick").queries == col.queries
    with pytest.raises(ValueError, match="only the 'quick' split"):
        load_collection("demo", split="test")


def test_demo_collection_run_override(tmp_path):
    run = tmp_path / "one.trec"
    run.write_text("1 Q0 10608397 1 3.0 x\n", encoding="utf-8")
    col = load_collection("demo", run=run)
    assert col.run == read_run(run)


def test_demo_weights_are_float16_upcast_exactly(demo_model):
    stored = load_file(demo_model_dir() / "model.safetensors")
    assert {v.dtype for v in stored.values() if v.is_floating_point()} == {torch.float16}
    assert all(p.dtype == torch.float32 for p in demo_model.parameters())
    word = stored["bert.embeddings.word_embeddings.weight"].float()
    assert torch.equal(demo_model.embed.embed.W_E.detach(), word)


def test_demo_scores_match_hugging_face(demo_model):
    """mechir's demo model against plain HF loading of the same directory (which upcasts too:
    the config keeps dtype float32)."""
    from transformers import AutoTokenizer, BertForSequenceClassification

    col = load_collection("demo")
    pairs = col.candidates(depth=2, query_ids=col.query_ids(3))
    hf = BertForSequenceClassification.from_pretrained(
        demo_model_dir(), attn_implementation="eager"
    ).eval()
    assert hf.dtype == torch.float32
    tok = AutoTokenizer.from_pretrained(demo_model_dir())
    assert tok.model_max_length == 160
    enc = tok(
        [p.query for p in pairs],
        [p.document for p in pairs],
        truncation="only_second",
        max_length=160,
        padding=True,
        return_tensors="pt",
    )
    with torch.no_grad():
        expected = hf(**enc).logits[:, 0]
    got = demo_model.score(
        demo_model.encode([p.query for p in pairs], [p.document for p in pairs], max_length=160)
    )
    torch.testing.assert_close(got, expected, rtol=1.3e-6, atol=4e-5)


def test_demo_assets_documented():
    card = (demo_model_dir() / "README.md").read_text(encoding="utf-8")
    figures = json.loads((demo_model_dir() / "measured.json").read_text(encoding="utf-8"))
    assert f"{figures['ndcg10_demo']:.4f}" in card and f"{figures['max_abs_diff']:.2e}" in card
    licence = (demo_collection_dir() / "README.md").read_text(encoding="utf-8")
    assert "CC BY-NC 2.0" in licence and "Wadden" in licence


@pytest.mark.shared
def test_demo_against_float32_shared_model(demo_model):
    """Re-measure the model card's figures: nDCG@10 of both models and the score difference."""
    requires_shared()
    from mechir.evaluation import evaluate, rerank

    col = load_collection("demo")
    pairs = col.candidates(depth=20)
    full = load_cross_encoder(SHARED_MODEL, device="cpu")
    run32 = rerank(full, pairs, max_length=160, progress=False)
    run16 = rerank(demo_model, pairs, max_length=160, progress=False)
    ndcg32 = evaluate(run32, col.qrels).aggregate["nDCG@10"]
    ndcg16 = evaluate(run16, col.qrels).aggregate["nDCG@10"]
    diff = max(abs(run16[q][d] - run32[q][d]) for q in run32 for d in run32[q])
    figures = json.loads((demo_model_dir() / "measured.json").read_text(encoding="utf-8"))
    assert abs(ndcg32 - REFERENCE_NDCG) < 5e-5
    assert abs(ndcg16 - REFERENCE_NDCG) <= 0.002
    assert ndcg16 == pytest.approx(figures["ndcg10_demo"], abs=1e-4)
    # The card's stated bound (float16 cannot reach 1e-3 on this model; see the card).
    assert diff == pytest.approx(figures["max_abs_diff"], rel=0.05)
    assert diff <= 0.02
