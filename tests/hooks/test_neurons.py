"""Neuron ablation vs weight surgery (zeroing W_out rows) and vs explicit means."""

from __future__ import annotations

import copy

import pytest
import torch

from mechir.hooks import neuron_ablation_hooks, neuron_means


def test_zero_neurons_equals_zeroing_w_out(tiny, tiny_batch):
    model, _, _ = tiny
    neurons = {0: [1, 5, 100], 1: [0]}
    got = model.score(tiny_batch, hooks=neuron_ablation_hooks(model, neurons))
    surgered = copy.deepcopy(model)
    with torch.no_grad():
        for layer, idx in neurons.items():
            surgered.blocks[layer].mlp.W_out[idx] = 0
    torch.testing.assert_close(got, surgered.score(tiny_batch), atol=1e-6, rtol=0)
    assert not torch.allclose(got, model.score(tiny_batch), atol=1e-5)
    mask = torch.zeros(model.cfg.n_layers, model.cfg.d_mlp, dtype=torch.bool)
    mask[0, [1, 5, 100]] = mask[1, 0] = True
    torch.testing.assert_close(
        model.score(tiny_batch, hooks=neuron_ablation_hooks(model, mask)), got
    )


def test_mean_neurons_pre_hook(tiny, tiny_batch):
    model, _, _ = tiny
    means = neuron_means(model, tiny_batch, hook="pre", batch_size=2)
    with torch.no_grad():
        _, cache = model.run_with_cache(tiny_batch, names_filter="blocks.1.mlp.hook_pre")
    real = tiny_batch.attention_mask.bool()
    torch.testing.assert_close(
        means[1], cache["blocks.1.mlp.hook_pre"][real].mean(0), atol=1e-6, rtol=0
    )
    seen = {}
    hooks = neuron_ablation_hooks(
        model, {1: [3]}, mode="mean", means=means, hook="pre", parts="document"
    )
    model.run_with_hooks(
        tiny_batch,
        fwd_hooks=hooks
        + [("blocks.1.mlp.hook_pre", lambda a, hook: seen.setdefault("a", a.clone()))],
    )
    d = tiny_batch.mask("document")
    assert torch.equal(seen["a"][d][:, 3], means[1, 3].expand(int(d.sum())))
    torch.testing.assert_close(seen["a"][~d], cache["blocks.1.mlp.hook_pre"][~d])


@pytest.mark.usefixtures("unchecked_shapes")  # tests the library's own errors
def test_neuron_validation(tiny):
    model, _, _ = tiny
    with pytest.raises(ValueError, match="neuron index out of range in layer 0"):
        neuron_ablation_hooks(model, {0: [model.cfg.d_mlp]})
    with pytest.raises(ValueError, match="layer 3 out of range"):
        neuron_ablation_hooks(model, {3: [0]})
    with pytest.raises(ValueError, match="empty neuron selection"):
        neuron_ablation_hooks(model, {0: []})
    with pytest.raises(ValueError, match="bool tensor of shape"):
        neuron_ablation_hooks(model, torch.zeros(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="unknown neuron hook"):
        neuron_ablation_hooks(model, {0: [0]}, hook="mid")
