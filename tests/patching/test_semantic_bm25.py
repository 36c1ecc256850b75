"""Lu, Chen & Eickhoff (2025) analyses (patching/semantic_bm25.py) against independent references:
head -> [CLS] path patching vs one plain-hook forward per (pair, sender); duplicate-token scores
vs Python loops; token IDF vs TermStatistics; the embedding SVD's Spearman vs scipy on a
planted IDF direction; the direction edit vs weight surgery; soft-TF x IDF vs a hand count; the
held-out linear fit vs numpy's polyfit."""

from __future__ import annotations

import copy
import math

import numpy as np
import pandas as pd
import pytest
import torch

from patching import TermStatistics
from patching.semantic_bm25 import (
    cls_path_patch,
    cls_path_patch_reference,
    duplicate_token_scores,
    duplicate_token_scores_reference,
    embedding_direction_hooks,
    embedding_idf_svd,
    linear_fit,
    soft_tf_idf,
    token_idf,
)
from tests.helpers import DOCUMENTS, QUERIES


@pytest.mark.parametrize("freeze_mlps", [False, True])
def test_cls_path_patching_equals_the_plain_hook_reference(model3, two_pairs, freeze_mlps):
    fast = cls_path_patch(model3, two_pairs, freeze_mlps=freeze_mlps, batch_size=7)
    ref = cls_path_patch_reference(model3, two_pairs, freeze_mlps=freeze_mlps)
    torch.testing.assert_close(fast.patched, ref.patched, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast.clean, ref.clean)
    assert fast.dims == ("layer", "head") and fast.method == "path"
    assert fast.target == "path->cls" + (":frozen_mlps" if freeze_mlps else "")
    assert not torch.isnan(fast.patched).any()


@pytest.mark.parametrize("family", ["modernbert", "modernbert-cls"])
def test_cls_path_patching_on_modernbert(family, tmp_path):
    """Rotary, pre-LN, local layers; mean pooling (every position carried) and [CLS] pooling
    (the [CLS] position alone)."""
    from mechir import load_cross_encoder
    from patching import AlignedPairs, PairBuilder
    from tests.families.builders import save_tiny_family

    model = load_cross_encoder(save_tiny_family(family, tmp_path), device="cpu")
    builder = PairBuilder(model.tokenizer, max_length=40, choose="first")
    built = [
        builder.tfc1(q, d, pair_id=str(i)) for i, (q, d) in enumerate(zip(QUERIES[:2], DOCUMENTS))
    ]
    pairs = AlignedPairs.from_pairs(built, model.tokenizer)
    fast = cls_path_patch(model, pairs, batch_size=5)
    ref = cls_path_patch_reference(model, pairs)
    torch.testing.assert_close(fast.patched, ref.patched, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(fast.patched[:, 0], fast.corrupted[:, None])


def test_cls_paths_add_up_to_nothing_when_no_head_changes(model3, pairs):
    """A pair whose clean and corrupted inputs are identical: every path score is the score."""
    same = pairs.__class__.from_batches(pairs.clean, pairs.clean, pair_ids=pairs.pair_ids)
    result = cls_path_patch(model3, same, senders=["0/1", "2/3"])
    expected = result.clean[:, None].expand(-1, 2)
    torch.testing.assert_close(result.patched[:, [0, 2], [1, 3]], expected, atol=1e-5, rtol=0)
    assert torch.isnan(result.patched[:, 1]).all()  # unselected senders stay NaN


def test_a_last_layer_sender_is_its_cls_output(model3, pairs):
    """A last-layer sender: the other heads of its layer read the corrupted stream anyway, so
    path patching equals patching its z at [CLS] alone (the only position the pooler reads)."""
    from mechir.hooks import patch_hooks

    result = cls_path_patch(model3, pairs, senders=["2/1"])
    with torch.no_grad():
        _, clean = model3.run_with_cache(pairs.clean)
        hooks = patch_hooks(model3, clean, "z", units=["2/1"], positions=[0])
        direct = model3.score(pairs.corrupted, hooks=hooks)
    torch.testing.assert_close(result.patched[:, 2, 1], direct, atol=1e-5, rtol=1e-5)


def test_duplicate_token_scores_equal_the_loop(model, tok):
    queries = ["cat cat runs", "the blue fish", "who eats", "red car road"]
    docs = [DOCUMENTS[0], "a small fish is blue fish", "the bird eats the red stone", "slow car"]
    batch = model.encode(queries, docs, max_length=64)
    fast = duplicate_token_scores(model, batch, batch_size=3)
    ref = duplicate_token_scores_reference(model, batch)
    assert fast.tokens.iloc[0] == ref.tokens.iloc[0] > 0
    np.testing.assert_allclose(fast.score, ref.score, atol=1e-6)
    np.testing.assert_allclose(fast.uniform, ref.uniform, atol=1e-9)
    assert (fast.label == ref.label).all() and len(fast) == 8
    assert ((fast.score >= 0) & (fast.score <= 1)).all()


def test_token_idf_is_bm25_idf_of_single_token_words(tok):
    idf, df = token_idf(tok, DOCUMENTS)
    terms = TermStatistics.from_documents(DOCUMENTS)
    for word in ("cat", "the", "fish", "road"):
        (i,) = tok(word, add_special_tokens=False)["input_ids"]
        assert float(idf[i]) == pytest.approx(terms(word), rel=1e-6)
    (cat,) = tok("cat", add_special_tokens=False)["input_ids"]
    assert int(df[cat]) == 1 and int(df[tok.convert_tokens_to_ids("the")]) == 2
    with pytest.raises(ValueError, match="no documents"):
        token_idf(tok, [])


def test_embedding_svd_finds_a_planted_idf_direction():
    gen = torch.Generator().manual_seed(0)
    n, d = 200, 16
    idf = torch.rand(n, generator=gen) * 5
    basis, _ = torch.linalg.qr(torch.randn(d, d, generator=gen))
    # component 0: large and random; component 1: follows IDF; the rest small noise
    E = 40 * torch.randn(n, 1, generator=gen) * basis[:, 0] + (3 * idf[:, None]) * basis[:, 1]
    E = E + 0.05 * torch.randn(n, d, generator=gen)
    mask = torch.ones(n, dtype=torch.bool)
    mask[:10] = False
    table, direction = embedding_idf_svd(E, idf, mask, k=4)
    from scipy.stats import spearmanr

    _, S, Vh = torch.linalg.svd(E.double(), full_matrices=False)
    for row in table.itertuples():
        rho, _ = spearmanr((E.double()[mask] @ Vh[row.component]).numpy(), idf[mask].numpy())
        assert row.spearman == pytest.approx(rho, abs=1e-9)
        assert row.sigma == pytest.approx(float(S[row.component]))
    best = int(table.spearman.abs().idxmax())
    assert abs(table.spearman[best]) > 0.95 and abs(float(direction @ basis[:, 1])) > 0.98
    assert spearmanr((E @ direction)[mask].numpy(), idf[mask].numpy())[0] > 0.95  # signed up


def test_embedding_direction_edit_equals_weight_surgery(model, pairs):
    gen = torch.Generator().manual_seed(1)
    v = torch.randn(model.cfg.d_model, generator=gen)
    unit = v / v.norm()
    for factor in (0.0, 0.5, 2.0):
        with torch.no_grad():
            hooked = model.score(
                pairs.clean, hooks=embedding_direction_hooks(model, v, factor=factor)
            )
            edited = copy.deepcopy(model)
            W = edited.embed.embed.W_E
            W += (factor - 1) * (W @ unit)[:, None] * unit
            torch.testing.assert_close(hooked, edited.score(pairs.clean), atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        same = model.score(pairs.clean, hooks=embedding_direction_hooks(model, v, factor=1.0))
    torch.testing.assert_close(same, model.score(pairs.clean), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="token embeddings have 32 dimensions"):
        embedding_direction_hooks(model, torch.ones(5))


def test_soft_tf_idf_counts_matches_by_hand(model, tok):
    batch = model.encode(["cat dog", "fish"], ["the cat and the cat", "a bird"], max_length=64)
    E = torch.eye(len(tok))  # orthogonal embeddings: softTF = exact TF for any power
    idf = torch.arange(len(tok), dtype=torch.float) / 10
    frame = soft_tf_idf(E, idf, batch, power=3.0)
    cat, dog = tok.convert_tokens_to_ids(["cat", "dog"])
    assert frame.tf_idf[0] == pytest.approx(2 * idf[cat].item())
    assert frame.soft_tf_idf[0] == pytest.approx(frame.tf_idf[0])
    assert frame.soft_tf_idf_log[0] == pytest.approx(math.log(3) * idf[cat].item())
    assert frame.tf_idf[1] == 0 and frame.query_tokens.tolist() == [2, 1]
    # "dog" made similar to "cat" (cos 0.6): it adds 0.6^p for each "cat" in the document
    E2 = E.clone()
    E2[dog] = 0.6 * E[cat] + 0.8 * E[dog]
    soft = soft_tf_idf(E2, idf, batch, power=3.0).soft_tf_idf[0]
    assert soft == pytest.approx(2 * idf[cat].item() + 2 * 0.6**3 * idf[dog].item(), rel=1e-5)
    skipped = soft_tf_idf(E2, idf, batch, power=3.0, exclude=[dog]).soft_tf_idf[0]
    assert skipped == pytest.approx(2 * idf[cat].item(), rel=1e-6)


def test_linear_fit_matches_polyfit_and_scores_held_out_rows():
    rng = np.random.default_rng(0)
    x = rng.normal(size=40)
    y = 3 * x + 1 + 0.1 * rng.normal(size=40)
    train = np.arange(40) < 25
    out = linear_fit(x, y, train)
    a, b = np.polyfit(x[train], y[train], 1)
    assert out["slope"] == pytest.approx(a) and out["intercept"] == pytest.approx(b)
    pred = a * x[~train] + b
    r2 = 1 - ((y[~train] - pred) ** 2).sum() / ((y[~train] - y[~train].mean()) ** 2).sum()
    assert out["r2_heldout"] == pytest.approx(r2) and out["r2_heldout"] > 0.99
    assert out["n_train"] == 25 and out["n_heldout"] == 15
    noise = linear_fit(x, rng.normal(size=40), train)
    assert noise["r2_heldout"] < 0.3
    with pytest.raises(ValueError, match="at least 2 training and 2 held-out rows"):
        linear_fit(x[:3], y[:3], [True, True, False])
    assert isinstance(pd.DataFrame([out]), pd.DataFrame)
