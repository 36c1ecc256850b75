"""Activation path (layer integrated gradients): nested refinement reuses its points."""

from __future__ import annotations

import pytest

from mechir.attribution import neuron_integrated_gradients


def test_auto_reuses_the_points_it_has(tiny, tiny_batch):
    model = tiny[0]
    rows: list[int] = []
    last = model.cfg.n_layers - 1

    def count(act, hook):  # rows leaving the last block: one per interpolated forward row
        rows.append(act.shape[0])

    with pytest.warns(UserWarning, match="max_steps=32"):
        result = neuron_integrated_gradients(
            model, tiny_batch, path="activation", n_steps="auto", rtol=1e-9, max_steps=32,
            hooks=[(f"blocks.{last}.hook_resid_post", count)], max_batch=1000,
        )  # fmt: skip
    # grids 8, 16, 32: 9 + 8 + 16 points per layer, one forward per grid (the clean row rides
    # along in each); plus the clean pass (1 row) and the a_l := a' pass (1 + n_layers rows)
    n_layers, b = model.cfg.n_layers, len(tiny_batch)
    assert result.n_points.tolist() == [33] * b
    assert sum(rows) == b * (1 + (1 + n_layers) + 3 * 1 + n_layers * 33)


def test_auto_equals_simpson_of_the_same_points(tiny, tiny_batch):
    model = tiny[0]
    with pytest.warns(UserWarning, match="max_steps"):
        auto = neuron_integrated_gradients(
            model, tiny_batch, path="activation", n_steps="auto", rtol=1e-9, max_steps=8
        )
    # Simpson on 9 points = 4/3 T(8) - 1/3 T(4) (trapezoid rules with 9 and 5 nodes)
    t8 = neuron_integrated_gradients(
        model, tiny_batch, path="activation", method="riemann_trapezoid", n_steps=9
    )
    t4 = neuron_integrated_gradients(
        model, tiny_batch, path="activation", method="riemann_trapezoid", n_steps=5
    )
    want = (4 * t8.attributions - t4.attributions) / 3
    assert (auto.attributions - want).abs().max() <= 1e-5 * want.abs().max()


def test_nested_error_estimate_costs_no_extra_points(tiny, tiny_batch):
    result = neuron_integrated_gradients(
        tiny[0], tiny_batch, path="activation", method="riemann_right", n_steps=8
    )
    assert result.n_points.tolist() == [8] * len(tiny_batch)
    assert result.error.shape == (len(tiny_batch), tiny[0].cfg.n_layers)
