"""Ranking-aware fidelity: identities (spliced = clean, spliced = floor), the listwise KL by
hand, PCA at full rank reconstructs exactly, the table on the tiny model."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mechir.data import Pair
from mechir.features.fidelity import PCABaseline, fidelity_table, score_fidelity
from mechir.features.splice import sae_hooks
from tests.features.conftest import PAIRS, SITE

QIDS = ["a"] * 5 + ["b"] * 4
DOCIDS = [f"d{i}" for i in range(9)]
QRELS = {"a": {"d0": 1, "d3": 2}, "b": {"d6": 1}}


def test_identical_scores_are_perfect():
    s = np.array([3.0, 1.0, 2.0, 0.5, -1.0, 0.2, 0.9, -0.3, 1.5])
    fid = score_fidelity(s, s, s[::-1].copy(), QIDS, docids=DOCIDS, qrels=QRELS).values
    assert fid["score_fvu"] == 0 and fid["spearman"] == pytest.approx(1)
    assert fid["kl_score"] == pytest.approx(1) and fid["kendall_tau"] == pytest.approx(1)
    assert fid["top10_overlap"] == 1 and fid["ndcg10_change"] == 0 and fid["ndcg10_p"] == 1


def test_floor_scores_zero_and_kl_by_hand():
    s = np.array([3.0, 1.0, 2.0, 0.5, -1.0, 0.2, 0.9, -0.3, 1.5])
    floor = np.zeros(9)
    fid = score_fidelity(s, floor, floor, QIDS).values
    assert fid["kl_score"] == pytest.approx(0)
    p = np.exp(s[:5]) / np.exp(s[:5]).sum()
    kl_a = float((p * np.log(p * 5)).sum())  # KL(softmax(s) || uniform)
    q = np.exp(s[5:]) / np.exp(s[5:]).sum()
    kl_b = float((q * np.log(q * 4)).sum())
    assert fid["kl_floor"] == pytest.approx((kl_a + kl_b) / 2)
    assert math.isnan(fid["kendall_tau"]) or fid["kendall_tau"] < 1


def test_pca_at_full_rank_reconstructs_exactly(bert_sae, tiny_batch):
    model, _, acts = bert_sae
    pca = PCABaseline(acts.acts, model.cfg.d_model, site=SITE)
    x = acts.acts[:10]
    torch.testing.assert_close(pca.decode(pca.encode(x)), x, rtol=1e-4, atol=1e-4)
    spliced = model.score(tiny_batch, hooks=sae_hooks(model, pca, error="drop"))
    torch.testing.assert_close(spliced, model.score(tiny_batch), rtol=1e-4, atol=1e-4)


def test_fidelity_table_on_the_tiny_model(bert_sae):
    model, sae, acts = bert_sae
    pairs = [Pair(q, f"{q}-{i}", q, d) for q, _ in PAIRS for i, (_, d) in enumerate(PAIRS)]
    pca = PCABaseline(acts.acts, 4, site=SITE)
    rows = fidelity_table(
        model,
        pairs,
        {"sae": sae, "pca": pca},
        site=SITE,
        eval_acts=acts.acts,
        mean=acts.acts.mean(0),
    )
    assert [r["codec"] for r in rows] == ["sae", "pca"]
    assert rows[1]["l0"] == pytest.approx(4)
    for r in rows:
        assert 0 <= r["fvu"] and -1 <= r["spearman"] <= 1 and 0 <= r["top10_overlap"] <= 1
