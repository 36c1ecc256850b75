"""The error estimate of neuron attributions against a high-resolution reference (tiny model)."""

from __future__ import annotations

import pytest
import torch

from mechir.attribution import n_selected, neuron_integrated_gradients

METHODS = ["riemann_right", "riemann_left", "riemann_middle", "gauss_legendre", "riemann_trapezoid"]


@pytest.fixture(scope="module", params=["input", "activation"])
def reference(request, tiny, tiny_batch):
    """Per-neuron attributions from 1,024 midpoint cells (error ~1e-6 of the scale here)."""
    model = tiny[0]
    ref = neuron_integrated_gradients(
        model, tiny_batch, path=request.param, method="riemann_middle", n_steps=1024, max_batch=512
    )
    return request.param, ref.per_neuron()


def _true_error(result, ref):
    return (result.per_neuron() - ref).abs().max(-1).values  # [batch, layer]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("n_steps", [8, 16, 32])
def test_error_estimate_brackets_the_true_error(tiny, tiny_batch, reference, method, n_steps):
    path, ref = reference
    result = neuron_integrated_gradients(
        tiny[0], tiny_batch, path=path, method=method, n_steps=n_steps, max_batch=512
    )
    true = _true_error(result, ref)
    scale = ref.abs().max()
    resolved = true > 1e-4 * scale  # above the reference's own error
    if not resolved.any():  # Gauss-Legendre on the activation path at 32 steps
        pytest.skip("converged below the reference's own accuracy")
    assert torch.all(result.error[resolved] >= true[resolved]), (result.error / true).min()
    if method.startswith("gauss") or method.endswith("trapezoid"):
        return  # higher-order rules: the estimate is about the half-step rule's error (loose)
    # the Riemann rules' estimate is asymptotically 2-3x the truth: not uselessly loose
    assert torch.all(result.error[resolved] <= 20 * true[resolved] + 1e-4 * scale)


@pytest.mark.parametrize("rtol", [0.05, 0.01, 0.002])
def test_auto_reaches_its_tolerance(tiny, tiny_batch, reference, rtol):
    path, ref = reference
    result = neuron_integrated_gradients(tiny[0], tiny_batch, path=path, n_steps="auto", rtol=rtol)
    assert result.method == "auto"
    assert torch.all(result.relative_error() <= rtol)
    true = _true_error(result, ref)
    assert torch.all(true <= result.error + 1e-5 * ref.abs().max())
    scale = ref.abs().flatten(1).max(1).values
    assert torch.all(true.max(1).values / scale <= rtol)
    # a tighter tolerance never uses fewer points
    looser = neuron_integrated_gradients(
        tiny[0], tiny_batch, path=path, n_steps="auto", rtol=rtol * 5
    )
    assert torch.all(result.n_points >= looser.n_points)


def test_selection_overlap_reads_the_two_resolutions(tiny, tiny_batch):
    result = neuron_integrated_gradients(tiny[0], tiny_batch, n_steps=16)
    fine, coarse = result.per_neuron().flatten(1), result.coarse.flatten(1)
    k = n_selected(fine.shape[1], 10)
    for b in range(len(result)):
        want = len(set(fine[b].topk(k).indices.tolist()) & set(coarse[b].topk(k).indices.tolist()))
        assert result.selection_overlap(10)[b] == pytest.approx(want / k)
    # same resolution twice: a stable selection
    result.coarse = result.per_neuron().clone()
    assert torch.all(result.selection_overlap(0.5, sign="absolute") == 1)
    with pytest.raises(ValueError, match="unknown sign"):
        result.selection_overlap(1, sign="largest")


def test_input_path_bypass_is_named_and_completeness_deprecated(tiny, tiny_batch):
    result = neuron_integrated_gradients(tiny[0], tiny_batch, n_steps=4)
    with pytest.warns(DeprecationWarning, match="bypass"):
        old = result.completeness
    assert torch.equal(old, result.bypass)
    act = neuron_integrated_gradients(tiny[0], tiny_batch, n_steps=4, path="activation")
    with pytest.raises(ValueError, match="input path"):
        _ = act.bypass


def test_no_estimate_when_asked_for_none(tiny, tiny_batch):
    result = neuron_integrated_gradients(tiny[0], tiny_batch, n_steps=4, error_estimate=False)
    assert result.error is None and result.coarse is None
    with pytest.raises(ValueError, match="no error estimate"):
        result.relative_error()
