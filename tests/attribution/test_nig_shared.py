"""Neuron integrated gradients on the shared SciFact cross-encoder (skipped without ../shared)."""

from __future__ import annotations

import pytest
import torch

from mechir.attribution import neuron_integrated_gradients, neuron_integrated_gradients_reference
from tests.helpers import SCIFACT, SHARED_MODEL, requires_shared

pytestmark = pytest.mark.shared


@pytest.fixture(scope="module")
def shared():
    requires_shared(SHARED_MODEL)
    requires_shared(SCIFACT)
    from mechir import load_cross_encoder
    from mechir.data import load_collection

    model = load_cross_encoder(str(SHARED_MODEL), device="cpu")
    pair = load_collection(SCIFACT, split="quick").candidates(depth=1)[0]
    # one short input keeps the naive loop cheap (padding is covered by the tiny-model tests)
    batch = model.encode([pair.query], [pair.document], max_length=40)
    return model, batch


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(path="input", method="riemann_right", n_steps=2),
        dict(path="activation", method="gauss_legendre", n_steps=2, activation_baseline="input"),
    ],
    ids=["input", "activation"],
)
def test_batched_equals_naive_on_the_shared_model(shared, kwargs):
    model, batch = shared
    got = neuron_integrated_gradients(model, batch, max_batch=8, **kwargs)
    want = neuron_integrated_gradients_reference(model, batch, **kwargs)
    scale = want.attributions.abs().max()
    assert got.layers == list(range(6))
    assert (got.attributions - want.attributions).abs().max() <= 1e-5 * scale
    score_scale = want.scores.abs().max()  # completeness holds score differences
    assert (got.unexplained - want.unexplained).abs().max() <= 1e-5 * score_scale


def test_completeness_on_the_shared_model(shared):
    model, batch = shared

    def error(n_steps):
        r = neuron_integrated_gradients(
            model, batch, path="activation", method="gauss_legendre", n_steps=n_steps
        )
        return r.completeness_error()

    # sum of a layer's attributions = F(x) - F(x with that layer zeroed), to quadrature error
    coarse, fine = error(2), error(8)
    assert fine < 1e-3
    assert fine < coarse / 10


def test_error_estimate_brackets_the_true_error_on_the_shared_model(shared):
    model, batch = shared
    ref_run = neuron_integrated_gradients(model, batch, method="riemann_middle", n_steps=64)
    ref = (4 * ref_run.per_neuron() - ref_run.coarse) / 3  # Richardson on 128 intervals
    scale = ref.abs().max()
    assert (ref_run.per_neuron() - ref).abs().max() < 2e-3 * scale  # a converged reference
    for kwargs in (dict(method="riemann_right", n_steps=16), dict(n_steps="auto", rtol=0.05)):
        result = neuron_integrated_gradients(model, batch, **kwargs)
        true = (result.per_neuron() - ref).abs().max(-1).values  # [batch, layer]
        assert torch.all(result.error + 2e-3 * scale >= true), (kwargs, result.error / true)
    assert float(result.relative_error().max()) <= 0.05
