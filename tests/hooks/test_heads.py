"""Head knockout vs weight surgery (zeroing W_O rows) and vs explicit means."""

from __future__ import annotations

import copy

import pytest
import torch

from mechir.hooks import head_knockout_hooks, head_output_means


def test_zero_knockout_equals_zeroing_w_o(tiny, tiny_batch):
    model, _, _ = tiny
    heads = [(0, 1), "1/2", (1, 3)]
    got = model.score(tiny_batch, hooks=head_knockout_hooks(model, heads))
    surgered = copy.deepcopy(model)
    with torch.no_grad():
        for layer, h in [(0, 1), (1, 2), (1, 3)]:
            surgered.blocks[layer].attn.W_O[h] = 0
    torch.testing.assert_close(got, surgered.score(tiny_batch), atol=1e-6, rtol=0)
    assert not torch.allclose(got, model.score(tiny_batch), atol=1e-4)


def test_mean_knockout_uses_streamed_means(tiny, tiny_batch):
    model, _, _ = tiny
    means = head_output_means(model, tiny_batch, batch_size=3)
    with torch.no_grad():
        _, cache = model.run_with_cache(tiny_batch, names_filter=lambda n: n.endswith("hook_z"))
    real = tiny_batch.attention_mask.bool()
    for layer in range(model.cfg.n_layers):
        z = cache[f"blocks.{layer}.attn.hook_z"][real]  # [tokens, heads, d_head]
        torch.testing.assert_close(means[layer], z.mean(0), atol=1e-6, rtol=0)
    seen = {}
    record = lambda z, hook: seen.setdefault(hook.name, z.clone())  # noqa: E731
    hooks = head_knockout_hooks(model, ["0/2"], mode="mean", means=means)
    model.run_with_hooks(tiny_batch, fwd_hooks=hooks + [("blocks.0.attn.hook_z", record)])
    z = seen["blocks.0.attn.hook_z"]
    assert torch.equal(z[:, :, 2], means[0, 2].expand_as(z[:, :, 2]))
    torch.testing.assert_close(z[:, :, 0], cache["blocks.0.attn.hook_z"][:, :, 0])


def test_knockout_restricted_to_parts(tiny, tiny_batch):
    model, _, _ = tiny
    seen = {}
    record = lambda z, hook: seen.setdefault("z", z.clone())  # noqa: E731
    hooks = head_knockout_hooks(model, [(1, 0)], parts=["query"])
    model.run_with_hooks(tiny_batch, fwd_hooks=hooks + [("blocks.1.attn.hook_z", record)])
    q = tiny_batch.mask("query")
    assert seen["z"][q][:, 0].abs().sum() == 0 and seen["z"][~q][:, 0].abs().sum() > 0
    # built once, the same hooks follow each sub-batch's own parts
    whole = model.score(tiny_batch, hooks=hooks)
    torch.testing.assert_close(model.score(tiny_batch, hooks=hooks, batch_size=1), whole)


def test_knockout_validation(tiny, tiny_batch):
    model, _, _ = tiny
    with pytest.raises(ValueError, match="head 9 out of range"):
        head_knockout_hooks(model, ["1/9"])
    with pytest.raises(ValueError, match="layer 5 out of range"):
        head_knockout_hooks(model, [(5, 0)])
    with pytest.raises(ValueError, match="empty head selection"):
        head_knockout_hooks(model, [])
    with pytest.raises(ValueError, match="needs means"):
        head_knockout_hooks(model, ["0/0"], mode="mean")
    with pytest.raises(ValueError, match="not of the form"):
        head_knockout_hooks(model, ["0-0"])
    with pytest.raises(ValueError, match="unknown part name"):
        head_knockout_hooks(model, ["0/0"], parts="title")
    with pytest.raises(ValueError, match="name the heads"):
        head_knockout_hooks(model)
    # heads as indices need their layers; all heads of a layer
    assert len(head_knockout_hooks(model, [0, 1], layers=[0, 1])) == 2
    with pytest.raises(ValueError, match="does not say its layer"):
        head_knockout_hooks(model, [0, 1])
