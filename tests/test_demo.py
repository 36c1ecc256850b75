"""The embedded demo: the ``demo`` names, the compact weights and their float32 copy in the cache
(made once, atomically, checked by digest), the collection, and (shared tier) the measured
agreement with the float32 shared model."""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import mechir.demo as demo
from mechir import load_cross_encoder
from mechir.compact import FORMAT, load_compact
from mechir.data import load_collection, read_run
from mechir.demo import (
    DEMO_MODEL_FILES,
    DEMO_WEIGHTS,
    demo_collection_dir,
    demo_model_dir,
    demo_stored_model_dir,
    is_demo,
    resolve_model,
)
from mechir.fingerprint import files_fingerprint, tensors_fingerprint
from mechir.model_files import weights_fingerprint
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


def test_demo_weights_are_the_dequantized_compact_file(demo_model):
    """The float32 copy holds exactly the dequantized compact weights (digest recorded in the
    file), and the loaded model uses them unchanged."""
    stored = demo_stored_model_dir() / DEMO_WEIGHTS
    with safe_open(str(stored), framework="pt") as f:
        meta = f.metadata()
        kept = f.get_tensor("bert.embeddings.LayerNorm.weight")
    assert meta["format"] == FORMAT and json.loads(meta["layout"])
    assert not (demo_stored_model_dir() / "model.safetensors").exists()  # no float16 copy left
    copy = load_file(demo_model_dir() / "model.safetensors")
    assert {v.dtype for v in copy.values() if v.is_floating_point()} == {torch.float32}
    dequantized, _ = load_compact(stored)
    assert tensors_fingerprint(copy) == tensors_fingerprint(dequantized) == meta["state_sha256"]
    assert torch.equal(copy["bert.embeddings.LayerNorm.weight"], kept)  # 1-D kept in float32
    assert all(p.dtype == torch.float32 for p in demo_model.parameters())
    word = copy["bert.embeddings.word_embeddings.weight"]
    assert torch.equal(demo_model.embed.embed.W_E.detach(), word)


def _fresh_demo_dir(monkeypatch, cache) -> object:
    monkeypatch.setenv("MECHIR_CACHE", str(cache))
    monkeypatch.setattr(demo, "_ready", {})
    return demo_model_dir()


def test_demo_model_dir_is_made_once_in_the_cache(tmp_path, monkeypatch):
    first = _fresh_demo_dir(monkeypatch, tmp_path)
    digest = load_compact(demo_stored_model_dir() / DEMO_WEIGHTS)[1]["state_sha256"]
    assert first.parent == tmp_path
    assert first.name == "demo-model-" + digest.removeprefix("sha256:")[:12]
    assert sorted(p.name for p in tmp_path.iterdir()) == [first.name]  # no temporary left
    names = {p.name for p in first.iterdir()}
    assert names == {"model.safetensors", *DEMO_MODEL_FILES}
    assert first.stat().st_mode & 0o777 == 0o755  # readable by all, as a shared cache needs
    assert (first / "model.safetensors").stat().st_mode & 0o444 == 0o444
    weights = first / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    assert _fresh_demo_dir(monkeypatch, tmp_path) == first
    assert weights.stat().st_mtime_ns == stamp  # a valid copy is reused, not rewritten

    # a damaged copy (weights or another file) is made again
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    assert _fresh_demo_dir(monkeypatch, tmp_path) == first
    assert tensors_fingerprint(load_file(weights)) == digest
    (first / "config.json").write_text("{}", encoding="utf-8")
    assert _fresh_demo_dir(monkeypatch, tmp_path) == first
    stored_config = (demo_stored_model_dir() / "config.json").read_bytes()
    assert (first / "config.json").read_bytes() == stored_config
    assert sorted(p.name for p in tmp_path.iterdir()) == [first.name]


def test_demo_model_dir_concurrent_first_use(tmp_path, monkeypatch):
    """Several first uses at once (threads here; processes alike): one valid copy, no
    temporary directories left."""
    monkeypatch.setenv("MECHIR_CACHE", str(tmp_path))
    monkeypatch.setattr(demo, "_ready", {})
    stored = demo_stored_model_dir()
    digest = load_compact(stored / DEMO_WEIGHTS)[1]["state_sha256"]

    def make(_):
        return demo._materialize(stored, tmp_path, tmp_path / "demo-model-x", digest)

    with ThreadPoolExecutor(3) as pool:
        list(pool.map(make, range(3)))
    assert [p.name for p in tmp_path.iterdir()] == ["demo-model-x"]
    assert demo._is_demo_copy(tmp_path / "demo-model-x", stored, digest)


def test_demo_model_dir_falls_back_to_temp_dir(tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x", encoding="utf-8")
    monkeypatch.setattr(demo.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    made = _fresh_demo_dir(monkeypatch, blocker / "cache")
    assert made.parent == tmp_path / "tmp" / f"mechir-{os.getuid()}"
    assert (made / "model.safetensors").is_file()


def test_demo_fingerprint_is_the_float32_copy():
    directory = demo_model_dir()
    assert weights_fingerprint("demo") == files_fingerprint([directory / "model.safetensors"])


def test_demo_loads_in_sentence_transformers(demo_model):
    st = pytest.importorskip("sentence_transformers")
    col = load_collection("demo")
    pairs = col.candidates(depth=2, query_ids=col.query_ids(2))
    ce = st.CrossEncoder(str(demo_model_dir()), device="cpu", max_length=160)
    got = ce.predict([(p.query, p.document) for p in pairs], activation_fn=torch.nn.Identity())
    expected = demo_model.score(
        demo_model.encode([p.query for p in pairs], [p.document for p in pairs], max_length=160)
    )
    torch.testing.assert_close(torch.as_tensor(got), expected, rtol=1.3e-6, atol=4e-5)


def test_demo_scores_match_hugging_face(demo_model):
    """mechir's demo model against plain HF loading of the same (float32) directory."""
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
    card = (demo_stored_model_dir() / "README.md").read_text(encoding="utf-8")
    figures = json.loads((demo_stored_model_dir() / "measured.json").read_text(encoding="utf-8"))
    assert f"{figures['ndcg10_demo']:.4f}" in card and f"{figures['max_abs_diff']:.2e}" in card
    assert "within 1e-3" in card and figures["max_abs_diff"] <= 1e-3
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
    run_demo = rerank(demo_model, pairs, max_length=160, progress=False)
    ndcg32 = evaluate(run32, col.qrels).aggregate["nDCG@10"]
    ndcg_demo = evaluate(run_demo, col.qrels).aggregate["nDCG@10"]
    diff = max(abs(run_demo[q][d] - run32[q][d]) for q in run32 for d in run32[q])
    figures = json.loads((demo_stored_model_dir() / "measured.json").read_text(encoding="utf-8"))
    assert abs(ndcg32 - REFERENCE_NDCG) < 5e-5
    assert abs(ndcg_demo - REFERENCE_NDCG) <= 0.002
    assert ndcg_demo == pytest.approx(figures["ndcg10_demo"], abs=1e-4)
    assert diff == pytest.approx(figures["max_abs_diff"], rel=0.05)
    assert diff <= 1e-3  # the bound, stated in the card
