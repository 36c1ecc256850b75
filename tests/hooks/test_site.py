"""One intervention vocabulary (mechir/hooks/site.py, mechir/hooks/patch.py): every factory is an
intervention on a site; patching hooks find each running example in their cached source or fail
in one line (regression test of ../shared/repros/r10_reuse.py)."""

from __future__ import annotations

import pytest
import torch

from mechir.hooks import (
    SITES,
    activation_source,
    head_knockout_hooks,
    head_scaling_hooks,
    neuron_ablation_hooks,
    patch_hooks,
    running_batch,
    site_hooks,
)
from mechir.hooks.site import Scale, Zero
from patching import AlignedPairs, head_patch_hooks, resid_patch_hooks

ATOL = 1e-5


def scaled_z_hook(layer_heads: dict[int, list[int]], factor: float, part: str | None = None):
    """Plain hooks scaling ``z`` of heads by hand (the oracle)."""

    def make(heads):
        def hook(z, hook):
            out = z.clone()
            if part is None:
                out[:, :, heads] = z[:, :, heads] * factor
            else:
                where = running_batch(hook).mask(part)
                for h in heads:
                    out[:, :, h] = torch.where(where[..., None], z[:, :, h] * factor, z[:, :, h])
            return out

        return hook

    return [(f"blocks.{layer}.attn.hook_z", make(hs)) for layer, hs in layer_heads.items()]


@pytest.fixture
def xy(tiny):
    """r10: two batches of the same shape whose rows are each other's, reordered."""
    model, _, _ = tiny
    x = model.encode(
        ["cat", "how big is the blue fish"], ["the cat runs in the house and the dog", "a fish"]
    )
    y = model.encode(
        ["how big is the blue fish", "cat"], ["a fish", "the cat runs in the house and the dog"]
    )
    assert x.input_ids.shape == y.input_ids.shape and not torch.equal(x.parts, y.parts)
    return x, y


@pytest.mark.parametrize("factor", [0.0, 0.5, 2.0])
def test_head_scaling_equals_scaling_z_by_hand(tiny, tiny_batch, factor):
    model, _, _ = tiny
    heads = {0: [1, 3], 1: [2]}
    for part in (None, "document"):
        hooks = head_scaling_hooks(model, heads, factor=factor, parts=part)
        expected = model.score(tiny_batch, hooks=scaled_z_hook(heads, factor, part))
        torch.testing.assert_close(
            model.score(tiny_batch, hooks=hooks), expected, atol=ATOL, rtol=0
        )


def test_head_scaling_identities(tiny, tiny_batch):
    """Factor 1 changes nothing (exactly); factor 0 is zero knockout (exactly)."""
    model, _, _ = tiny
    heads = ["0/1", "1/2", "1/3"]
    plain = model.score(tiny_batch)
    one = model.score(tiny_batch, hooks=head_scaling_hooks(model, heads, factor=1.0))
    torch.testing.assert_close(one, plain, atol=0, rtol=0)
    zero = model.score(tiny_batch, hooks=head_scaling_hooks(model, heads, factor=0.0))
    knocked = model.score(tiny_batch, hooks=head_knockout_hooks(model, heads))
    torch.testing.assert_close(zero, knocked, atol=0, rtol=0)
    assert (zero - plain).abs().max() > 1e-3


def test_partial_neuron_scaling(tiny, tiny_batch):
    model, _, _ = tiny
    neurons = {0: [1, 5, 9], 1: list(range(0, 40, 4))}
    zero = model.score(tiny_batch, hooks=neuron_ablation_hooks(model, neurons))
    plain = model.score(tiny_batch)
    torch.testing.assert_close(
        model.score(tiny_batch, hooks=neuron_ablation_hooks(model, neurons, factor=0.0)),
        zero, atol=0, rtol=0,
    )  # fmt: skip
    torch.testing.assert_close(
        model.score(tiny_batch, hooks=neuron_ablation_hooks(model, neurons, factor=1.0)),
        plain, atol=0, rtol=0,
    )  # fmt: skip

    def half(act, hook):
        layer = int(hook.name.split(".")[1])
        out = act.clone()
        out[..., neurons[layer]] = act[..., neurons[layer]] * 0.5
        return out

    by_hand = [(f"blocks.{layer}.mlp.hook_post", half) for layer in neurons]
    torch.testing.assert_close(
        model.score(tiny_batch, hooks=neuron_ablation_hooks(model, neurons, factor=0.5)),
        model.score(tiny_batch, hooks=by_hand), atol=ATOL, rtol=0,
    )  # fmt: skip


@pytest.mark.usefixtures("unchecked_shapes")  # tests the library's own errors
def test_one_mode_vocabulary_with_one_message(tiny):
    model, _, _ = tiny
    with pytest.raises(ValueError, match="mode 'renormalize' is not defined for head knockout"):
        head_knockout_hooks(model, ["0/1"], mode="renormalize")
    with pytest.raises(ValueError, match="mode 'renormalize' is not defined for neuron ablation"):
        neuron_ablation_hooks(model, {0: [1]}, mode="renormalize")
    with pytest.raises(ValueError, match="mode='mean' needs means"):
        head_knockout_hooks(model, ["0/1"], mode="mean")
    with pytest.raises(ValueError, match="give factor= or mode='mean', not both"):
        neuron_ablation_hooks(model, {0: [1]}, mode="mean", factor=0.5)
    with pytest.raises(ValueError, match="unknown mode 'drop'"):
        head_knockout_hooks(model, ["0/1"], mode="drop")


@pytest.mark.usefixtures("unchecked_shapes")
def test_selection_errors_name_the_site(tiny):
    model, _, _ = tiny
    with pytest.raises(ValueError, match="site 'resid_pre' has no units"):
        site_hooks(model, "resid_pre", action=Zero(), units=["0/1"])
    with pytest.raises(ValueError, match="site 'pooled' has no token axis"):
        site_hooks(model, "pooled", action=Zero(), parts="query")
    with pytest.raises(ValueError, match="site 'z' has no token axis 'key'"):
        site_hooks(model, "z", action=Zero(), parts={"key": "query"})
    with pytest.raises(ValueError, match="unknown site 'zz'"):
        site_hooks(model, "zz", action=Zero())
    with pytest.raises(ValueError, match="head 7 out of range"):
        site_hooks(model, "z", action=Zero(), units=["0/7"])


def test_attention_site_selects_rows_and_columns_by_part(tiny, tiny_batch):
    """A union of (row part, column part) boxes on the pattern equals masking by hand."""
    model, _, _ = tiny
    boxes = [{"position": "query", "key": "document"}, {"position": "cls", "key": "query"}]
    hooks = site_hooks(model, "pattern", action=Scale(0.25), layers=[1], units=["1/0"], parts=boxes)

    def by_hand(pattern, hook):
        batch = running_batch(hook)
        q, d, c = batch.mask("query"), batch.mask("document"), batch.mask("cls")
        box = (q[:, :, None] & d[:, None, :]) | (c[:, :, None] & q[:, None, :])
        out = pattern.clone()
        out[:, 0] = torch.where(box, pattern[:, 0] * 0.25, pattern[:, 0])
        return out

    expected = model.score(tiny_batch, hooks=[("blocks.1.attn.hook_pattern", by_hand)])
    torch.testing.assert_close(model.score(tiny_batch, hooks=hooks), expected, atol=ATOL, rtol=0)


# ---------------------------------------------------------------------- patching
def test_r10_patch_hooks_from_a_cache_of_reordered_rows_patch_each_row_from_itself(tiny, xy):
    """Built from X's cache and run on Y (X's rows reordered): each row is found by its token
    ids, so patching its own activations back changes nothing."""
    model, _, _ = tiny
    x, y = xy
    _, cache = model.run_with_cache(x)
    plain = model.score(y)
    for hooks in (
        resid_patch_hooks(cache, "resid_pre", 1, positions=[1]),
        head_patch_hooks(cache, 0, 1, positions=[1]),
        patch_hooks(model, cache, "z", units=["0/1", "1/3"], parts="document"),
    ):
        torch.testing.assert_close(model.score(y, hooks=hooks), plain, atol=ATOL, rtol=0)
        torch.testing.assert_close(
            model.score(y, hooks=hooks, batch_size=1), plain, atol=ATOL, rtol=0
        )


def test_r10_patch_hooks_on_other_inputs_fail_in_one_line(tiny, xy):
    model, _, _ = tiny
    x, _ = xy
    _, cache = model.run_with_cache(x)
    other = model.encode(["red car road", "who eats"], ["slow car on a dark road", "the bird eats"])
    for hooks in (
        resid_patch_hooks(cache, "resid_pre", 1, positions=[1]),
        head_patch_hooks(cache, 0, 1, positions=[1]),
    ):
        with pytest.raises(
            ValueError, match="example 0 of the running batch is not in the patching"
        ):
            model.score(other, hooks=hooks)
    with pytest.raises(ValueError, match="does not know the batch it was cached on"):
        resid_patch_hooks(dict(cache.items()), "resid_pre", 1)


def aligned(model):
    clean = model.encode(
        ["cat", "how big is the blue fish", "red car"],
        ["the cat runs in the house", "a small fish is blue", "a red car on the road"],
    )
    ids = clean.input_ids.clone()
    ids[clean.mask("document")] = model.tokenizer.convert_tokens_to_ids("the")
    corrupted = type(clean)(ids, clean.token_type_ids, clean.attention_mask, clean.parts)
    return AlignedPairs.from_batches(clean, corrupted, pair_ids=["a", "b", "c"])


def test_patching_finds_pairs_by_id_in_any_sub_batch_or_order(tiny):
    model, _, _ = tiny
    pairs = aligned(model)
    _, clean = model.run_with_cache(pairs.clean)
    hooks = patch_hooks(model, clean, "z", units=["0/1", "1/2"], parts="document")

    def by_hand(z, hook):  # z of heads 0/1 and 1/2 from the clean run, by index
        layer = int(hook.name.split(".")[1])
        head = {0: 1, 1: 2}[layer]
        out = z.clone()
        doc = pairs.corrupted.mask("document")
        out[:, :, head] = torch.where(doc[..., None], clean[hook.name][:, :, head], z[:, :, head])
        return out

    expected = model.score(
        pairs.corrupted, hooks=[(f"blocks.{layer}.attn.hook_z", by_hand) for layer in (0, 1)]
    )
    torch.testing.assert_close(
        model.score(pairs.corrupted, hooks=hooks), expected, atol=ATOL, rtol=0
    )
    torch.testing.assert_close(
        model.score(pairs.corrupted, hooks=hooks, batch_size=2), expected, atol=ATOL, rtol=0
    )
    reordered = pairs[[2, 0, 1]]
    torch.testing.assert_close(
        model.score(reordered.corrupted, hooks=hooks), expected[[2, 0, 1]], atol=ATOL, rtol=0
    )
    # a pair the source does not hold: one line naming it
    stranger = pairs.corrupted[[0]].with_pair_ids(["zz"])
    with pytest.raises(ValueError, match="pair 'zz' of the running batch is not in the patching"):
        model.score(stranger, hooks=hooks)


def test_patching_refuses_a_source_of_another_length(tiny):
    model, _, _ = tiny
    pairs = aligned(model)
    longer = model.encode(["cat"], ["the cat runs in the house and sleeps"], pair_ids=["a"])
    source = activation_source(model, longer, [SITES["z"].hook_name(0)])
    hooks = patch_hooks(model, source, "z", units=["0/1"])
    with pytest.raises(ValueError, match="example 'a' has .* tokens but its patching source"):
        model.score(pairs.corrupted[[0]], hooks=hooks)
