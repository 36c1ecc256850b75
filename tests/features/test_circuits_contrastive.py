"""Contrastive feature circuits (relevant pairs against query-corrupted copies): attribution
patching against the exact slope of patching each node, integrated-gradient completeness,
exact faithfulness against a naive per-pair, per-position loop, and the graph scores in closed
form."""

from __future__ import annotations

import math

import pytest
import torch

from mechir.data import Pair
from mechir.features.circuits import (
    FeatureCircuit,
    contrastive_faithfulness,
    feature_circuit,
)
from mechir.features.saes import decode, encode
from patching.edges import replace_query_words
from tests.features.conftest import DOWN, UP
from tests.helpers import DOCUMENTS, QUERIES


@pytest.fixture(scope="module")
def setting(two_saes):
    model, up, down = two_saes
    items = [Pair(f"q{i}", f"d{i}", q, d) for i, (q, d) in enumerate(zip(QUERIES, DOCUMENTS))]
    pairs, skipped = replace_query_words(model.tokenizer, items, max_length=64)
    assert not skipped
    return model, up, down, pairs.clean, pairs.corrupted


def site_values(model, batch, saes):
    """``{site: (f, e)}`` of a plain run, read through run_with_cache (not the library's)."""
    _, cache = model.run_with_cache(batch, names_filter=lambda n: n in saes)
    out = {}
    for site, sae in saes.items():
        x = cache[site]
        f = encode(sae, x)
        out[site] = (f, x - decode(sae, f))
    return out


def nodes_of(d_up, d_down):
    """``(site, feature index or None for the error)`` in node_effects order."""
    return (
        [(UP, i) for i in range(d_up)]
        + [(UP, None)]
        + [(DOWN, j) for j in range(d_down)]
        + [(DOWN, None)]
    )


def partial_patch_score(model, batch, saes, base, site, index, t):
    """The summed score with one node moved a fraction ``t`` of the way to its corrupted
    value, every other node at its running value (a hook written here, not the library's)."""
    sae = saes[site]
    f_c, e_c = base[site]
    real = batch.attention_mask.bool()[..., None]

    def fn(act, hook):
        f = encode(sae, act)
        if index is None:
            moved = act + t * (e_c - (act - decode(sae, f)))
        else:
            g = f.clone()
            g[..., index] = f[..., index] + t * (f_c[..., index] - f[..., index])
            moved = act + (decode(sae, g) - decode(sae, f))
        return torch.where(real, moved, act)

    with torch.no_grad():
        return float(model.score(batch, hooks=[(site, fn)]).sum())


def test_attribution_patching_is_the_exact_slope_of_patching_each_node(setting):
    model, up, down, clean, corrupted = setting
    saes = {UP: up, DOWN: down}
    circuit = feature_circuit(model, clean, up, down, corrupted=corrupted, n_down=3)
    base = site_values(model, corrupted, saes)
    effect = circuit.node_effects()
    nodes = nodes_of(up.cfg.d_sae, down.cfg.d_sae)
    top = effect.abs().argsort(descending=True)[:8].tolist()
    assert up.cfg.d_sae in top or circuit.n_nodes - 1 in top  # an error node among them
    h = 1e-2
    for n in top:
        site, index = nodes[n]
        plus = partial_patch_score(model, clean, saes, base, site, index, h)
        minus = partial_patch_score(model, clean, saes, base, site, index, -h)
        slope = (minus - plus) / (2 * h)  # d/dt of s(clean) - s(t): the first-order effect
        assert float(effect[n]) == pytest.approx(slope, rel=0.02, abs=2e-4), circuit.node_label(n)


def test_integrated_gradients_are_complete_per_site(setting):
    """Each site carries the whole residual stream, so its nodes' effects sum to
    s(clean) - s(corrupted); the midpoint rule's error falls as 1/n_steps^2 (documented
    tolerance 1% at 16 steps)."""
    model, up, down, clean, corrupted = setting
    with torch.no_grad():
        delta = float(model(clean).sum() - model(corrupted).sum())
    errors = {}
    for n_steps in (4, 16):
        c = feature_circuit(
            model, clean, up, down, corrupted=corrupted, n_down=1, method="ig", n_steps=n_steps
        )
        assert c.clean - c.baseline == pytest.approx(delta, rel=1e-5)
        errors[n_steps] = c.completeness_error()
    assert max(errors[16].values()) <= 0.01
    assert errors[16]["up"] < errors[4]["up"] / 4


def naive_faithfulness_score(model, clean, corrupted, saes, keep_nodes, d_up, d_down):
    """The summed score with nodes outside ``keep_nodes`` at their corrupted values: one pair
    at a time, one position at a time, each site's vector rebuilt as decode(f') + e'."""
    nodes = nodes_of(d_up, d_down)
    kept = {(nodes[n][0], nodes[n][1]) for n in keep_nodes}
    total = 0.0
    for b in range(len(clean)):
        one, one_c = clean[b : b + 1], corrupted[b : b + 1]
        base = site_values(model, one_c, saes)

        def make(site, one=one, base=base):
            sae = saes[site]

            def fn(act, hook):
                out = act.clone()
                for p in range(act.shape[1]):
                    if not one.attention_mask[0, p]:
                        continue
                    f = encode(sae, act[0, p])
                    e = act[0, p] - decode(sae, f)
                    f_c, e_c = base[site][0][0, p], base[site][1][0, p]
                    mixed = torch.stack(
                        [f[i] if (site, i) in kept else f_c[i] for i in range(len(f))]
                    )
                    out[0, p] = decode(sae, mixed) + (e if (site, None) in kept else e_c)
                return out

            return fn

        with torch.no_grad():
            total += float(model.score(one, hooks=[(s, make(s)) for s in saes]).sum())
    return total


def test_contrastive_faithfulness_against_a_naive_loop(setting):
    model, up, down, clean, corrupted = setting
    saes = {UP: up, DOWN: down}
    circuit = feature_circuit(model, clean, up, down, corrupted=corrupted, n_down=2)
    budgets = [0, 1, 3, 7, circuit.n_nodes]
    curve = contrastive_faithfulness(model, clean, corrupted, up, down, circuit, budgets)
    with torch.no_grad():
        s_clean, s_corrupt = float(model(clean).sum()), float(model(corrupted).sum())
    order = circuit.node_effects().abs().argsort(descending=True).tolist()
    for n, row in zip(budgets, curve):
        naive = naive_faithfulness_score(
            model, clean, corrupted, saes, order[:n], up.cfg.d_sae, down.cfg.d_sae
        )
        assert row["score"] == pytest.approx(naive, abs=2e-4), n
        assert row["faithfulness"] == pytest.approx(
            (naive - s_corrupt) / (s_clean - s_corrupt), abs=1e-3
        )
    # the empty circuit is the corrupted run, the full one the clean run
    assert curve[0]["score"] == pytest.approx(s_corrupt, abs=1e-4)
    assert curve[-1]["score"] == s_clean and curve[-1]["faithfulness"] == 1


def test_per_site_budgets_against_a_naive_loop(setting):
    """Split budgets keep the top nodes of each site; a circuit with nodes at the upstream site
    only scores exactly as the corrupted run (the downstream site is a complete cut)."""
    model, up, down, clean, corrupted = setting
    saes = {UP: up, DOWN: down}
    circuit = feature_circuit(model, clean, up, down, corrupted=corrupted, n_down=1)
    effect = circuit.node_effects().abs()
    n_up = up.cfg.d_sae + 1
    curve = contrastive_faithfulness(model, clean, corrupted, up, down, circuit, [5], per_site=True)
    ups = effect[:n_up].argsort(descending=True)[:3].tolist()
    downs = (effect[n_up:].argsort(descending=True)[:2] + n_up).tolist()
    naive = naive_faithfulness_score(
        model, clean, corrupted, saes, ups + downs, up.cfg.d_sae, down.cfg.d_sae
    )
    assert curve[0]["score"] == pytest.approx(naive, abs=2e-4)
    only_up = naive_faithfulness_score(
        model, clean, corrupted, saes, ups, up.cfg.d_sae, down.cfg.d_sae
    )
    with torch.no_grad():
        assert only_up == pytest.approx(float(model(corrupted).sum()), abs=2e-4)


def test_unaligned_batches_and_the_zero_form_are_refused(setting):
    model, up, down, clean, corrupted = setting
    with pytest.raises(ValueError, match="not token-aligned"):
        feature_circuit(model, clean, up, down, corrupted=corrupted[:2])
    zero = feature_circuit(model, clean, up, down, n_down=1)
    with pytest.raises(ValueError, match="contrastive form"):
        zero.completeness_error()
    with pytest.raises(ValueError, match="corrupted="):
        contrastive_faithfulness(model, clean, corrupted, up, down, zero, [1])
    with pytest.raises(ValueError, match="unknown method"):
        feature_circuit(model, clean, up, down, method="eap")


def test_replacement_and_completeness_scores_closed_form():
    c = FeatureCircuit(
        up_effect=torch.tensor([1.0, 0.0]),
        down_effect=torch.tensor([3.0, -1.0]),
        up_error=0.5,
        down_error=1.0,
        down_nodes=[0, 1],
        edges=torch.tensor([[2.0, 0.0, 1.0], [0.5, -0.5, 0.0]]),
        clean=5.0,
        baseline=1.0,
    )
    # c(score) = 4/5; w = (3/5, 1/5); c(0) = 2/3, c(1) = 1
    assert c.replacement_score() == pytest.approx(3 / 5 * 2 / 3 + 1 / 5)
    assert c.completeness_score() == pytest.approx((4 / 5 + 3 / 5) / (1 + 4 / 5))
    assert c.completeness_error() == pytest.approx({"up": 0.625, "down": 0.25})
    assert [c.node_label(i) for i in (0, 2, 3, 5)] == ["up:0", "up:error", "down:0", "down:error"]
    assert not math.isnan(c.baseline) and c.contrastive
