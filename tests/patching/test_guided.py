"""Guided exact top-k patching: the full sweep's top k, verified effects equal the reference."""

from __future__ import annotations

import pytest
import torch

from patching import (
    head_target,
    neuron_target,
    patch_sweep,
    patch_sweep_reference,
    patch_top_cells,
    pooled_target,
    qk_target,
    resid_target,
)

#: Targets of the last layer of ``linear_tail``: the score is affine in them (or, for keys, in
#: the pattern, which AtP* recomputes), so the estimates are exact and the answer is known.
#: (Only cells that reach [CLS] matter here; residual targets of this layer would tie at 0.)
LINEAR = {
    "z/all": head_target(heads=["1/0", "1/1", "1/2", "1/3"]),
    "z/part": head_target(by="part", heads=["1/0", "1/1", "1/2", "1/3"]),
    "k/part": qk_target("k", by="part", heads=["1/0", "1/1", "1/2", "1/3"]),
    "q/position": qk_target("q", by="position", heads=["1/0", "1/1", "1/2", "1/3"]),
    "neurons": neuron_target({1: range(128)}),
}
#: Targets on the (strongly nonlinear) random tiny model: attribution patching misjudges cells.
NONLINEAR = {
    "z/all": head_target(),
    "z/part": head_target(by="part"),
    "resid_pre/position": resid_target("resid_pre"),
    "attn_out/part": resid_target("attn_out", by="part"),
    "neurons": neuron_target({0: range(0, 128, 4), 1: range(1, 128, 4)}),
    "k/part": qk_target("k", by="part"),
}


def full_effects(result):
    """``[pair, cells]`` exact effects of a full sweep (NaN: no such cell)."""
    n = len(result)
    return result.patched.reshape(n, -1).double() - result.corrupted.double()[:, None]


def top_sets(values, k):
    """Flat indices of the k largest |values| per row (NaN never chosen)."""
    ranked = values.abs().nan_to_num(-1.0)
    return [set(row.tolist()) for row in ranked.topk(k, dim=1).indices]


def check_verified_and_top(guided, effects, k):
    """Verified cells carry the sweep's exact effect, the others NaN; ``top`` = the k largest
    verified |effects|."""
    n = len(effects)
    exact = guided.exact.reshape(n, -1).double()
    done = guided.verified.reshape(n, -1)
    scale = max(1.0, float(guided.clean.abs().max()))  # float32 rounding of the scores
    torch.testing.assert_close(exact[done], effects[done], atol=1e-5 * scale, rtol=0)
    assert exact[~done].isnan().all()
    assert [set(t.tolist()) for t in guided.top] == top_sets(effects.where(done, torch.nan), k)
    assert guided.n_rows == int(done.sum())


@pytest.mark.parametrize("name", list(LINEAR))
def test_top_cells_equal_the_full_sweep_where_estimates_are_exact(linear_tail, pairs, name):
    target, k = LINEAR[name], 3
    full = patch_sweep(linear_tail, pairs, target)
    guided = patch_top_cells(linear_tail, pairs, target, k=k, batch_size=5)
    effects = full_effects(full)
    check_verified_and_top(guided, effects, k)
    assert [set(t.tolist()) for t in guided.top] == top_sets(effects, k)
    assert guided.certified.all()
    assert guided.n_rows < guided.n_cells_total  # it did not need the full sweep


@pytest.mark.parametrize("name", list(NONLINEAR))
def test_the_certificate_holds_when_estimates_are_poor(model, pairs, name):
    """Where attribution patching misjudges cells the top k can differ from the sweep's (the
    documented failure mode), but the result is what the rule promises: exact values for the
    verified cells, their top k, and every unverified estimate below the margin."""
    target, k, rtol = NONLINEAR[name], 3, 0.25
    full = patch_sweep(model, pairs, target)
    guided = patch_top_cells(model, pairs, target, k=k, rtol=rtol, batch_size=7)
    effects = full_effects(full)
    check_verified_and_top(guided, effects, k)
    est = guided.estimate.reshape(len(pairs), -1).double()
    done = guided.verified.reshape(len(pairs), -1)
    for p in range(len(pairs)):
        free = ~done[p] & ~est[p].isnan()
        if free.any():
            kth = effects[p][done[p]].abs().topk(k).values[-1]
            assert kth > (1 + rtol) * est[p][free].abs().max()


def test_a_huge_margin_reproduces_the_full_sweep_on_any_model(model, pairs):
    target, k = head_target(by="part"), 4
    effects = full_effects(patch_sweep(model, pairs, target))
    guided = patch_top_cells(model, pairs, target, k=k, rtol=1e9)
    assert [set(t.tolist()) for t in guided.top] == top_sets(effects, k)
    nonzero = guided.estimate.reshape(len(pairs), -1).nan_to_num().abs() > 0
    assert guided.verified.reshape(len(pairs), -1)[nonzero].all()


def test_verified_effects_equal_the_per_cell_reference(model, two_pairs):
    target = head_target(by="part", heads=["0/0", "0/3", "1/1", "1/2"])
    ref = patch_sweep_reference(model, two_pairs, target)
    guided = patch_top_cells(model, two_pairs, target, k=2, step=1)
    done = guided.verified.reshape(2, -1)
    exact = guided.exact.reshape(2, -1).double()
    torch.testing.assert_close(exact[done], full_effects(ref)[done], atol=1e-5, rtol=0)
    torch.testing.assert_close(guided.clean, ref.clean, atol=1e-5, rtol=0)
    torch.testing.assert_close(guided.corrupted, ref.corrupted, atol=1e-5, rtol=0)


def test_pooled_dimensions_closed_form(model, pairs):
    """The score is affine in the pooled output for a 1-label model: the effect of patching
    dimension d is (pooled_clean - pooled_corr)[d] * W[d], estimates are exact, and the top k
    needs no more than the first round plus one step."""
    k = 4
    guided = patch_top_cells(model, pairs, pooled_target(by="dimension"), k=k)
    with torch.no_grad():
        diff = model(pairs.clean, return_type="pooled") - model(
            pairs.corrupted, return_type="pooled"
        )
    w = model.classifier.W[:, 0] if hasattr(model.classifier, "W") else None
    if w is None:
        w = next(p for p in model.classifier.parameters() if p.dim() == 2).reshape(-1)
    closed = (diff * w).double()
    assert [set(t.tolist()) for t in guided.top] == top_sets(closed, k)
    torch.testing.assert_close(guided.attribution_error, torch.zeros(len(pairs)), atol=1e-4, rtol=0)
    assert guided.verified.reshape(len(pairs), -1).sum(1).max() < 3 * k


def test_averaged_top_cells_equal_the_mean_metric_of_the_full_sweep(linear_tail, pairs):
    target, k = LINEAR["z/part"], 3  # 4 cells are not 0 here
    full = patch_sweep(linear_tail, pairs, target)
    guided = patch_top_cells(linear_tail, pairs, target, k=k, average=True)
    mean = full.mean().reshape(1, -1)
    assert guided.units == ["mean"] and guided.measure == "metric"
    assert set(guided.top[0].tolist()) == top_sets(mean, k)[0]
    done = guided.verified.reshape(1, -1)
    torch.testing.assert_close(
        guided.exact.reshape(1, -1)[done].double(), mean[done], atol=1e-4, rtol=0
    )
    assert guided.n_rows < guided.n_cells_total


def test_k_beyond_the_grid_verifies_everything(model, pairs):
    target = head_target(heads=["0/1", "1/0", "1/3"])
    big_k = patch_top_cells(model, pairs, target, k=5)
    assert (big_k.top[:, 3:] == -1).all() and big_k.certified.all()
    assert len(big_k.top_labels(0)) == 3 and big_k.top_labels(0)[0][0] in (0, 1)
    frame = big_k.to_frame()
    assert len(frame) == 3 * len(pairs) and set(frame["rank"]) == {1, 2, 3}
    assert "certified 4/4" in repr(big_k)


def test_max_cells_stops_early_without_certifying(model, pairs):
    capped = patch_top_cells(model, pairs, head_target(by="part"), k=3, max_cells=3, rtol=1e9)
    assert capped.verified.reshape(len(pairs), -1).sum(1).tolist() == [3] * len(pairs)
    assert not capped.certified.any()


def test_errors(model, pairs):
    with pytest.raises(ValueError, match="k must be >= 1"):
        patch_top_cells(model, pairs, head_target(), k=0)
    with pytest.raises(ValueError, match="safety margin"):
        patch_top_cells(model, pairs, head_target(), rtol=-1)
