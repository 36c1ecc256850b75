from __future__ import annotations

import pytest
import torch

from mechir.attribution import fuse_scores, intersect, n_selected, random_control, top_neurons


def scores():
    s = torch.zeros(3, 10)
    s[0, 2], s[1, 7], s[2, 0], s[2, 9], s[1, 1] = 5.0, 4.0, 3.0, -6.0, -2.0
    return s


def test_n_selected():
    assert n_selected(9216, 0.05) == 5
    assert n_selected(9216, 0.5) == 46
    assert n_selected(9216, 0.005) == 1  # at least one
    with pytest.raises(ValueError, match="percent"):
        n_selected(100, 0)


def test_top_neurons_is_global_and_signed():
    sel = top_neurons(scores(), 10)  # 10% of 30 = 3 neurons
    assert len(sel) == 3
    assert sel.table[["layer", "neuron"]].values.tolist() == [[0, 2], [1, 7], [2, 0]]
    assert sel.table["rank"].tolist() == [1, 2, 3]
    assert sel.table["score"].tolist() == [5.0, 4.0, 3.0]
    assert sel.neurons() == {0: [2], 1: [7], 2: [0]}
    assert sel.per_layer() == [1, 1, 1]
    neg = top_neurons(scores(), 10, sign="negative")
    assert neg.table[["layer", "neuron"]].values.tolist()[:2] == [[2, 9], [1, 1]]
    absolute = top_neurons(scores(), 4, sign="absolute")  # round(1.2) = 1
    assert absolute.neurons() == {2: [9]}


@pytest.mark.usefixtures("unchecked_shapes")  # tests the library's own errors
def test_top_neurons_maps_rows_to_model_layers():
    sel = top_neurons(scores()[1:], 10, layers=[4, 5], n_layers=6)
    assert sel.mask.shape == (6, 10)
    assert sel.neurons() == {4: [7], 5: [0]}
    with pytest.raises(ValueError, match="3 layers given for 2 score rows"):
        top_neurons(scores()[1:], 10, layers=[1, 2, 3])
    with pytest.raises(ValueError, match="unknown sign"):
        top_neurons(scores(), 10, sign="up")


def test_fusion_and_intersection():
    a, b = scores(), scores()
    b[1, 7], b[0, 3] = -1.0, 20.0
    fused = fuse_scores([a, b])
    torch.testing.assert_close(fused, (a + b) / 2)
    normed = fuse_scores([a, b * 100], normalize=True)
    torch.testing.assert_close(normed, (a / 6 + b / 20) / 2)
    both = intersect([top_neurons(a, 10), top_neurons(b, 10)])
    assert both.neurons() == {0: [2], 2: [0]}
    assert both.table["score"].tolist() == [5.0, 3.0]
    with pytest.raises(ValueError, match="differ in shape"):
        fuse_scores([a, a[:2]])


def test_random_control_keeps_per_layer_counts():
    gen = torch.Generator().manual_seed(3)
    sel = top_neurons(torch.randn(6, 200, generator=gen), 2)
    assert len(sel) == 24
    controls = [random_control(sel, seed) for seed in range(3)]
    for c in controls:
        assert c.per_layer() == sel.per_layer()
        assert not (c.mask & sel.mask).any()
    assert torch.equal(random_control(sel, 1).mask, controls[1].mask)
    assert not torch.equal(controls[0].mask, controls[1].mask)


def test_old_module_name_is_a_deprecated_alias():
    import importlib
    import sys

    sys.modules.pop("mechir.attribution.selection", None)
    with pytest.warns(DeprecationWarning, match="renamed mechir.attribution.neuron_selection"):
        old = importlib.import_module("mechir.attribution.selection")
    assert old.top_neurons is top_neurons
