"""One selection grammar: every head/layer form behaves the same in every factory."""

from __future__ import annotations

import pytest
import torch

from mechir.hooks import direction_ablation_hooks, head_knockout_hooks
from mechir.selection import select_heads, select_layers, select_neurons

# (form, layers, expected heads) on the tiny model (2 layers x 4 heads)
ACCEPTED = [
    ("1/2", None, [(1, 2)]),
    ("L1H2", None, [(1, 2)]),
    ((1, 2), None, [(1, 2)]),
    (["0/1", (1, 3), "L0H1"], None, [(0, 1), (1, 3)]),
    ({1: [0, 2]}, None, [(1, 0), (1, 2)]),
    ({0: 3}, None, [(0, 3)]),
    ([0, 3], [1], [(1, 0), (1, 3)]),
    ([2], [0, 1], [(0, 2), (1, 2)]),
    ({1: [0]}, [0, 1], [(1, 0)]),
]

REJECTED = [
    ([], None, "empty head selection"),
    ({1: [0]}, [0], "not among the selected layers"),
    ("1-2", None, "not of the form"),
    ([-1], [0], "head -1 out of range"),
    (["1/4"], None, "head 4 out of range"),
    ([2.5], [0], "head index must be an int, got 2.5"),
    (["2/0"], None, "layer 2 out of range: model has 2 layers"),
    ("0/0", [2.7], "layer must be an int, got 2.7"),
    ("0/0", [5], "layer 5 out of range"),
    ("0/0", [], "empty layer selection"),
]


def knockout_score(model, batch, heads, layers):
    return model.score(batch, hooks=head_knockout_hooks(model, heads, layers=layers))


def ablation_score(model, batch, heads, layers):
    hooks = direction_ablation_hooks(
        model, attending="query", attended="document", heads=heads, layers=layers or [0, 1]
    )
    return model.score(batch, hooks=hooks)


FACTORIES = {"knockout": knockout_score, "direction_ablation": ablation_score}


@pytest.mark.parametrize("factory", sorted(FACTORIES))
@pytest.mark.parametrize("form,layers,expected", ACCEPTED)
def test_every_form_selects_the_same_heads_everywhere(
    tiny, tiny_batch, factory, form, layers, expected
):
    model, _, _ = tiny
    assert select_heads(model, form, layers=layers) == expected
    run = FACTORIES[factory]
    torch.testing.assert_close(
        run(model, tiny_batch, form, layers), run(model, tiny_batch, expected, None)
    )


@pytest.mark.usefixtures("unchecked_shapes")  # tests the library's own errors
@pytest.mark.parametrize("factory", ["select_heads", *sorted(FACTORIES)])
@pytest.mark.parametrize("form,layers,message", REJECTED)
def test_every_bad_form_is_rejected_everywhere_alike(
    tiny, tiny_batch, factory, form, layers, message
):
    model, _, _ = tiny
    if factory == "direction_ablation" and layers is None and form != []:
        layers = [0, 1]  # its layers default to all; give them so the head form is what is tested
    with pytest.raises(ValueError, match=message):
        if factory == "select_heads":
            select_heads(model, form, layers=layers)
        elif factory == "knockout":
            head_knockout_hooks(model, form, layers=layers)
        else:
            direction_ablation_hooks(
                model, attending="query", attended="document", heads=form, layers=layers
            )


@pytest.mark.usefixtures("unchecked_shapes")  # tests the library's own errors
def test_layers_and_neurons(tiny):
    model, _, _ = tiny
    assert select_layers(model, None) == select_layers(model, "all") == [0, 1]
    assert select_layers(model, range(2)) == [0, 1] and select_layers(model, 1) == [1]
    for bad, message in [(2.7, "got 2.7"), (True, "got True"), ("0-1", "use 'all'"), (-1, "-1")]:
        with pytest.raises(ValueError, match=message):
            select_layers(model, bad)
    mask = select_neurons(model, {1: [0, 5]})
    assert mask.sum() == 2 and mask[1, 0] and mask[1, 5]
    with pytest.raises(ValueError, match="neuron index in layer 0 must be an int"):
        select_neurons(model, {0: [1.5]})
    with pytest.raises(ValueError, match="layer must be an int"):
        select_neurons(model, {0.5: [1]})
