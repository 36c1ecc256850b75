"""Input path (neuron conductance): nested points are reused, never recomputed."""

from __future__ import annotations

import pytest
import torch

from mechir.attribution import neuron_integrated_gradients


def _counting_hook(counter):
    def count(act, hook):
        counter.append(act.shape[0])

    return [("hook_full_embed", count)]


def test_auto_reuses_the_points_it_has(tiny, tiny_batch):
    rows: list[int] = []
    with pytest.warns(UserWarning, match="max_steps=32"):
        result = neuron_integrated_gradients(
            tiny[0], tiny_batch, n_steps="auto", rtol=1e-9, max_steps=32,
            hooks=_counting_hook(rows), max_batch=1000,
        )  # fmt: skip
    # grids 8, 16, 32: 7 + 8 + 16 new points per example, plus the two clean passes
    assert result.n_points.tolist() == [31] * len(tiny_batch)
    assert sum(rows) == len(tiny_batch) * (2 + 31)
    assert result.n_steps == 32
    assert result.meta["forwards"] == len(tiny_batch) * 31


def test_auto_equals_the_finest_of_two_fixed_midpoint_runs(tiny, tiny_batch):
    """``auto`` stopped at grid 16 reports the midpoint sum on 8 cells; its error estimate is
    the difference from the one on 4 cells (the run's ``coarse``)."""
    with pytest.warns(UserWarning, match="max_steps"):
        auto = neuron_integrated_gradients(
            tiny[0], tiny_batch, n_steps="auto", rtol=1e-9, max_steps=16, aggregate="position"
        )
    fine = neuron_integrated_gradients(
        tiny[0], tiny_batch, method="riemann_middle", n_steps=8, aggregate="position"
    )
    coarse = neuron_integrated_gradients(
        tiny[0], tiny_batch, method="riemann_middle", n_steps=4, aggregate="position"
    )
    scale = fine.attributions.abs().max()
    assert (auto.attributions - fine.attributions).abs().max() <= 1e-5 * scale
    assert (auto.coarse - coarse.per_neuron()).abs().max() <= 1e-5 * scale
    want = (fine.per_neuron() - coarse.per_neuron()).abs().max(-1).values
    torch.testing.assert_close(auto.error, want, atol=1e-5 * float(scale), rtol=1e-4)
    torch.testing.assert_close(auto.scores, fine.scores)


def test_auto_does_not_stop_before_grid_16(tiny, tiny_batch):
    """A loose tolerance still refines to 16 intervals (15 path points) before it may stop."""
    result = neuron_integrated_gradients(tiny[0], tiny_batch, n_steps="auto", rtol=0.99)
    assert result.n_points.tolist() == [15] * len(tiny_batch)


@pytest.mark.parametrize(
    "method, n_steps, points",
    [("riemann_right", 8, 8), ("riemann_left", 8, 8), ("riemann_middle", 8, 15)],
)
def test_nested_error_estimate_costs_no_extra_points(tiny, tiny_batch, method, n_steps, points):
    rows: list[int] = []
    result = neuron_integrated_gradients(
        tiny[0], tiny_batch, method=method, n_steps=n_steps, hooks=_counting_hook(rows)
    )
    assert result.n_points.tolist() == [points] * len(tiny_batch)
    assert sum(rows) == len(tiny_batch) * (2 + points)
    assert result.meta["coarse_n_steps"] == n_steps // 2


def test_auto_arguments_are_checked(tiny, tiny_batch):
    model = tiny[0]
    with pytest.raises(ValueError, match="leave method unset or 'auto'"):
        neuron_integrated_gradients(model, tiny_batch, n_steps="auto", method="riemann_right")
    with pytest.raises(ValueError, match="method='auto' goes with n_steps='auto'"):
        neuron_integrated_gradients(model, tiny_batch, method="auto", n_steps=8)
    with pytest.raises(ValueError, match="rtol must be in"):
        neuron_integrated_gradients(model, tiny_batch, n_steps="auto", rtol=0)
    with pytest.raises(ValueError, match="max_steps must be an int >= 8"):
        neuron_integrated_gradients(model, tiny_batch, n_steps="auto", max_steps=4)
