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
