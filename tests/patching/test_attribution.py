"""Attribution patching: exact where the score is affine in the patched activation."""

from __future__ import annotations

import pytest
import torch

from patching import (
    attribution_estimates,
    attribution_patch,
    attribution_vs_exact,
    head_target,
    neuron_target,
    patch_sweep,
    pattern_target,
    pooled_target,
    qk_target,
    resid_target,
)

LINEAR_TARGETS = {
    "z/all": head_target(heads=["1/0", "1/1", "1/2", "1/3"]),
    "z/position": head_target(by="position", heads=["1/1"]),
    "z/part": head_target(by="part", heads=["1/2"]),
    "pattern": pattern_target(heads=["1/3"]),
    "neurons": neuron_target({1: range(0, 128, 3)}),
    "attn_out/position": resid_target("attn_out", layers=1),
    "mlp_out/part": resid_target("mlp_out", by="part", layers=1),
    "pooled/all": pooled_target(),
    "pooled/dimension": pooled_target(by="dimension"),
    # AtP*: the softmax is recomputed, so keys/queries of the last layer are exact too
    "k/all": qk_target("k", heads=["1/0", "1/1", "1/2", "1/3"]),
    "k/part": qk_target("k", by="part", heads=["1/1", "1/2"]),
    "q/position": qk_target("q", by="position", heads=["1/3"]),
}


@pytest.mark.parametrize("name", list(LINEAR_TARGETS))
def test_attribution_is_exact_on_a_model_linear_in_the_activation(linear_tail, pairs, name):
    target = LINEAR_TARGETS[name]
    exact = patch_sweep(linear_tail, pairs, target)
    approx = attribution_patch(linear_tail, pairs, target, batch_size=3)
    assert approx.method == "attribution" and approx.dims == exact.dims
    assert torch.equal(approx.patched.isnan(), exact.patched.isnan())
    scale = float(exact.patched.nan_to_num().abs().max())
    torch.testing.assert_close(
        approx.patched, exact.patched, atol=1e-5 * max(1.0, scale), rtol=0, equal_nan=True
    )
    effect = (exact.patched - exact.corrupted.view(-1, *[1] * (exact.patched.dim() - 1))).abs()
    assert effect.nan_to_num().max() > 1e-2  # the check is not vacuous


def test_plain_attribution_linearises_through_the_softmax(linear_tail, pairs):
    """Without the AtP* correction the key estimate goes through the softmax's tangent: wrong on
    the same model where the corrected estimate is exact."""
    target = qk_target("k", heads=["1/0", "1/1", "1/2", "1/3"])
    exact = patch_sweep(linear_tail, pairs, target)
    plain = attribution_patch(linear_tail, pairs, target, atp_star=False)
    star = attribution_patch(linear_tail, pairs, target)
    err_plain = (plain.patched - exact.patched).nan_to_num().abs().max()
    err_star = (star.patched - exact.patched).nan_to_num().abs().max()
    scale = max(1.0, float(exact.patched.nan_to_num().abs().max()))
    assert err_plain > 1e-2 * scale and err_star < 1e-5 * scale


def test_attribution_is_only_approximate_through_nonlinearities(model, pairs):
    target = resid_target("resid_pre")
    exact = patch_sweep(model, pairs, target)
    approx = attribution_patch(model, pairs, target)
    report = attribution_vs_exact(approx, exact)
    assert report["n_pairs"] == len(pairs)
    assert report["n_values"] == int((~exact.patched.isnan()).sum())
    assert -1 <= report["pearson"] <= 1 and -1 <= report["mean_metric_spearman"] <= 1
    assert report["max_abs_diff"] > 1e-4  # LayerNorm, GELU, softmax, tanh: not linear
    pooled = attribution_vs_exact(
        attribution_patch(model, pairs, pooled_target(by="dimension")),
        patch_sweep(model, pairs, pooled_target(by="dimension")),
    )
    assert pooled["pearson"] == pytest.approx(1.0, abs=1e-6)
    assert pooled["max_abs_diff"] < 1e-5


def test_attribution_leaves_parameter_gradients_alone(model, pairs):
    attribution_patch(model, pairs, head_target())
    assert all(p.grad is None for p in model.parameters())
    assert torch.is_grad_enabled()  # the default is left as it was


def test_attribution_vs_exact_needs_matching_results(model, pairs):
    a = attribution_patch(model, pairs, head_target())
    e = patch_sweep(model, pairs, head_target(by="part"))
    with pytest.raises(ValueError, match="differ in target or grid"):
        attribution_vs_exact(a, e)
    with pytest.raises(ValueError, match="batch_size"):
        attribution_patch(model, pairs, head_target(), batch_size=0)


@pytest.mark.usefixtures("unchecked_shapes")  # ends with a test of the library's own error
def test_mean_gradient_estimate_against_a_hand_written_two_run_formula(model, pairs):
    """``gradient="mean"``: effect of patching all of ``blocks.1.hook_resid_pre`` equals
    ``sum (a_clean - a_corr) * (g_clean + g_corr) / 2`` with the gradients of two plain runs."""
    name = "blocks.1.hook_resid_pre"
    target = resid_target("resid_pre", by="all", layers=1)
    approx = attribution_patch(model, pairs, target, gradient="mean", batch_size=3)
    acts, grads = {}, {}
    for which, batch in (("clean", pairs.clean), ("corr", pairs.corrupted)):

        def keep(act, hook, which=which):
            act.retain_grad()
            acts[which] = act
            return act

        with torch.enable_grad(), model.hooks(fwd_hooks=[(name, keep)]):
            model(batch).sum().backward()
        grads[which] = acts[which].grad
    model.zero_grad(set_to_none=True)
    diff = (acts["clean"] - acts["corr"]).detach().double()
    mean = (grads["clean"] + grads["corr"]).double() / 2
    expected = (diff * mean).sum((1, 2))
    got = (approx.patched[:, 1] - approx.corrupted).double()
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    plain = attribution_patch(model, pairs, target)
    assert ((plain.patched[:, 1] - approx.patched[:, 1]).abs() > 1e-4).any()  # not the same rule
    with pytest.raises(ValueError, match="unknown gradient"):
        attribution_patch(model, pairs, target, gradient="clean")


@pytest.mark.parametrize("target", [head_target(by="part"), qk_target("k", by="part")])
def test_several_gradient_rules_from_one_pass_equal_one_rule_each(model, pairs, target):
    both = attribution_estimates(model, pairs, target, batch_size=3)
    for gradient in ("corrupted", "mean"):
        one = attribution_patch(model, pairs, target, gradient=gradient, batch_size=3)
        torch.testing.assert_close(both[gradient].patched, one.patched, atol=1e-6, rtol=0)
        torch.testing.assert_close(both[gradient].corrupted, one.corrupted)
    with pytest.raises(ValueError, match="unknown gradient"):
        attribution_estimates(model, pairs, target, gradients=("corrupted", "clean"))


# ---------------------------------------------------------------- gradients along the input path
def _effects(result):
    n = len(result)
    return result.patched.reshape(n, -1).double() - result.corrupted.double()[:, None]


def test_path_points_on_the_embeddings_are_integrated_gradients(model, pairs):
    """For the embeddings (``resid_pre`` of layer 0) the input path is the straight line, so the
    mean of the path rules over midpoints is integrated gradients: summed over positions it is
    ``s_clean - s_corr`` (completeness), up to the midpoint rule's error."""
    target = resid_target("resid_pre", layers=0)
    points = tuple((i + 0.5) / 32 for i in range(32))
    rules = attribution_estimates(model, pairs, target, path_points=points)
    ig = torch.stack([_effects(rules[f"path:{a:g}"]) for a in points]).mean(0)
    delta = (rules["corrupted"].clean - rules["corrupted"].corrupted).double()
    torch.testing.assert_close(ig.nansum(1), delta, atol=2e-3 * float(delta.abs().max()), rtol=0)
    one_point = _effects(rules["corrupted"]).nansum(1)
    assert ((one_point - delta).abs() > 0.05 * delta.abs()).any()  # plain AtP is not complete


def test_a_path_point_is_the_gradient_where_the_embeddings_are_mixed(model, pairs):
    """Oracle by finite differences, without autograd: for a layer-0 cell (one position) the
    path rule at alpha is ``d/dt s(e_alpha + t * Δe_p)`` at t = 0, with ``e_alpha`` the mixed
    embeddings and ``Δe_p`` the clean-minus-corrupted embedding of position p only."""
    target = resid_target("resid_pre", layers=0)
    alpha, pair = 0.4, pairs[[1]]
    got = _effects(attribution_estimates(model, pair, target, path_points=(alpha,))["path:0.4"])
    with torch.no_grad():
        _, cc = model.run_with_cache(pair.clean, names_filter=["hook_full_embed"])
        _, kc = model.run_with_cache(pair.corrupted, names_filter=["hook_full_embed"])
    e_clean = cc["hook_full_embed"].double()
    e_corr = kc["hook_full_embed"].double()
    diff = (e_clean - e_corr)[0].abs().sum(-1)
    p = int(diff.argmax())  # a position whose embedding differs
    step = torch.zeros_like(e_clean)
    step[0, p] = (e_clean - e_corr)[0, p]
    mixed = e_corr + alpha * (e_clean - e_corr)

    def score(t: float) -> float:
        emb = (mixed + t * step).float()
        with torch.no_grad(), model.hooks(fwd_hooks=[("hook_full_embed", lambda a, hook: emb)]):
            return float(model(pair.corrupted).double())

    eps = 1e-2
    finite = (score(eps) - score(-eps)) / (2 * eps)
    assert abs(float(got[0, p]) - finite) < 2e-3 * max(1.0, abs(finite))
    assert abs(finite) > 1e-3  # the cell matters


@pytest.mark.parametrize("target", [head_target(by="part"), qk_target("k", by="part")])
def test_path_points_near_the_ends_meet_the_end_rules(model, pairs, target):
    """alpha -> 0: the corrupted-gradient rule (AtP* for keys); alpha -> 1: the clean-gradient
    rule ``2 * mean - corrupted`` (heads; keys have no clean rule)."""
    rules = attribution_estimates(model, pairs, target, path_points=(1e-5, 1 - 1e-5))
    plain = _effects(rules["corrupted"])
    torch.testing.assert_close(_effects(rules["path:1e-05"]), plain, atol=1e-3, rtol=0)
    if target.name == "z/part":
        clean_rule = 2 * _effects(rules["mean"]) - plain
        torch.testing.assert_close(_effects(rules["path:0.99999"]), clean_rule, atol=1e-3, rtol=0)
        assert ((clean_rule - plain).abs().nan_to_num() > 1e-2).any()  # the two ends differ
    with pytest.raises(ValueError, match="path point 1.5 out of range"):
        attribution_estimates(model, pairs, target, path_points=(1.5,))
