"""Activation patching: batched sweep vs per-cell reference, identities, targets, errors."""

from __future__ import annotations

import pytest
import torch

from patching import (
    AlignedPairs,
    head_target,
    neuron_target,
    patch_sweep,
    patch_sweep_reference,
    pattern_target,
    pooled_target,
    qk_target,
    resid_patch_hooks,
    resid_target,
    run_from_layers,
)

TARGETS = {
    "resid_pre/position": resid_target("resid_pre"),
    "attn_out/part": resid_target("attn_out", by="part"),
    "mlp_out/all": resid_target("mlp_out", by="all"),
    "resid_pre/position layer 1": resid_target("resid_pre", layers=[1]),
    "z/all": head_target(),
    "z/position": head_target(by="position", heads=["1/2", (0, 1)]),
    "z/part": head_target(by="part", heads=["0/0", "1/3"]),
    "pattern": pattern_target(heads=["0/3", "1/0"]),
    "neuron subset": neuron_target({0: [1, 5], 1: [3]}),
    "neuron document": neuron_target({1: range(0, 128, 9)}, parts="document"),
    "pooled/all": pooled_target(),
    "pooled/dimension": pooled_target(by="dimension"),
    "k/part": qk_target("k", by="part", heads=["0/2", "1/1"]),
    "q/position": qk_target("q", by="position", heads=["0/0"]),
}


def assert_same_cells(a, b, atol=1e-5):
    assert a.dims == b.dims and a.coords == b.coords
    assert torch.equal(a.patched.isnan(), b.patched.isnan())
    torch.testing.assert_close(a.patched, b.patched, atol=atol, rtol=0, equal_nan=True)
    torch.testing.assert_close(a.clean, b.clean, atol=atol, rtol=0)
    torch.testing.assert_close(a.corrupted, b.corrupted, atol=atol, rtol=0)


@pytest.mark.parametrize("name", list(TARGETS))
def test_batched_sweep_equals_per_cell_reference(model, pairs, name):
    target = TARGETS[name]
    # batch_size 7: chunks mix pairs (of different lengths) and start layers, and split pairs
    fast = patch_sweep(model, pairs, target, batch_size=7)
    ref = patch_sweep_reference(model, pairs, target)
    assert_same_cells(fast, ref)
    assert fast.patched.isfinite().any()


@pytest.mark.parametrize("name", ["resid_pre/position", "z/part", "pattern", "pooled/dimension"])
def test_patching_own_activation_changes_nothing(model, pairs, name):
    same = AlignedPairs(pairs.corrupted, pairs.corrupted, pairs.pair_ids, pairs.grades)
    result = patch_sweep(model, same, TARGETS[name], batch_size=64)
    done = ~result.patched.isnan()
    expected = result.corrupted.view(-1, *[1] * (result.patched.dim() - 1)).expand_as(done)
    torch.testing.assert_close(result.patched[done], expected[done], atol=1e-5, rtol=0)
    assert result.excluded() == dict.fromkeys(pairs.pair_ids, 0.0)  # delta 0: all excluded


def test_patching_all_of_resid_pre_at_layer_0_gives_the_clean_score(model, pairs):
    result = patch_sweep(model, pairs, resid_target("resid_pre", by="all", layers=0))
    torch.testing.assert_close(result.patched[:, 0], result.clean, atol=1e-5, rtol=0)
    torch.testing.assert_close(
        result.metric()[:, 0], torch.ones(len(pairs), dtype=torch.float64), atol=1e-4, rtol=0
    )
    # the same with the plain hook factory, pair by pair
    for i in range(len(pairs)):
        pair = pairs[i]
        _, cache = model.run_with_cache(pair.clean, names_filter="blocks.0.hook_resid_pre")
        hooks = resid_patch_hooks(cache, "resid_pre", 0, positions=None)
        with torch.no_grad():
            patched = model.run_with_hooks(pair.corrupted, fwd_hooks=hooks)
        torch.testing.assert_close(patched, model.score(pair.clean), atol=1e-5, rtol=0)


def test_patching_the_whole_pooled_output_gives_the_clean_score(model, pairs):
    result = patch_sweep(model, pairs, pooled_target())
    torch.testing.assert_close(result.patched, result.clean, atol=1e-5, rtol=0)


def test_sweep_respects_hooks_already_on_the_model(model, pairs):
    """Outer hooks (here: the last layer's attention to padding-free uniform weights) apply to
    the cached runs and to every patched row, exactly as in the reference."""

    def uniform(pattern, hook):
        return torch.where(pattern > 0, torch.ones_like(pattern), pattern) / (pattern > 0).sum(
            -1, keepdim=True
        )

    target = head_target(heads=["0/1", "0/2", "1/0"])
    with model.hooks(fwd_hooks=[("blocks.1.attn.hook_pattern", uniform)]):
        fast = patch_sweep(model, pairs, target, batch_size=5)
        ref = patch_sweep_reference(model, pairs, target)
    assert_same_cells(fast, ref)
    plain = patch_sweep(model, pairs, target)
    assert (plain.clean - fast.clean).abs().max() > 1e-4  # the outer hook did something


def test_grid_layout_and_unpatched_cells(model, pairs):
    result = patch_sweep(model, pairs, head_target(by="position", heads=["1/2"]))
    width = pairs.clean.input_ids.shape[1]
    assert result.dims == ("layer", "head", "position")
    assert result.patched.shape == (len(pairs), 2, 4, width)
    done = ~result.patched.isnan()
    assert done[:, 1, 2].sum(-1).tolist() == pairs.lengths.tolist()  # no cell past a pair's end
    assert done.sum() == done[:, 1, 2].sum()  # only head 1/2 patched
    parts = patch_sweep(model, pairs, resid_target("attn_out", by="part"))
    assert parts.coords["part"] == ["cls", "query", "sep1", "document", "sep2"]


def test_run_from_layers_matches_the_model(model, pairs):
    batch = pairs.clean
    _, cache = model.run_with_cache(batch)
    n = len(batch)
    starts = torch.tensor([0, 0, 1, 2])  # 2 = n_layers: start from the final hidden states
    rows = torch.arange(n)

    def initial(layer, which):
        name = (
            "blocks.1.hook_normalized_resid_post"
            if layer == 2
            else f"blocks.{layer}.hook_resid_pre"
        )
        return cache[name][rows[which]]

    with torch.no_grad():
        scores = run_from_layers(model, starts, initial, batch.attention_mask)
    torch.testing.assert_close(scores, model.score(batch), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="sorted"):
        run_from_layers(model, torch.tensor([1, 0, 0, 0]), initial, batch.attention_mask)


def test_default_batch_size_comes_from_the_memory_budget(model, pairs):
    small = patch_sweep(model, pairs, head_target(), memory_budget=1)  # 1 row per chunk
    big = patch_sweep(model, pairs, head_target())
    assert_same_cells(small, big)


@pytest.mark.usefixtures("unchecked_shapes")  # tests the library's own errors
def test_target_errors(model, pairs):
    with pytest.raises(ValueError, match="unknown component"):
        resid_target("resid_post")
    with pytest.raises(ValueError, match="granularity"):
        head_target(by="token")
    with pytest.raises(ValueError, match=r"layer 5 out of range: model has 2 layers"):
        patch_sweep(model, pairs, resid_target(layers=[5]))
    with pytest.raises(ValueError, match="head 7 out of range"):
        patch_sweep(model, pairs, head_target(heads=["1/7"]))
    with pytest.raises(ValueError, match="neuron index out of range"):
        patch_sweep(model, pairs, neuron_target({0: [999]}))
    with pytest.raises(ValueError, match="batch_size"):
        patch_sweep(model, pairs, head_target(), batch_size=-1)


def test_progress_counts_cells_with_a_total(model, pairs, capsys):
    target = head_target(by="part", heads=["0/1", "1/2"])
    patch_sweep(model, pairs, target, progress=True)
    err = capsys.readouterr().err
    total = 2 * 5 * len(pairs)  # heads x parts x pairs
    assert f"{total}/{total}" in err and "cell" in err and "4 pairs" in err
    patch_sweep(model, pairs, target)  # default: short sweeps stay quiet
    assert capsys.readouterr().err == ""


def test_part_dependent_hooks_on_the_model_read_each_row_parts(model, pairs):
    """Hooks built once that read the running batch's parts (direction ablation) stay active
    through the batched engine: it runs its rows as the model's running batch."""
    from mechir.hooks import direction_ablation_hooks

    ablate = direction_ablation_hooks(model, attending="document", attended="query", layers=[0])
    target = head_target(by="part", heads=["1/0", "1/3"])
    with model.hooks(fwd_hooks=ablate):
        fast = patch_sweep(model, pairs, target, batch_size=3)
        ref = patch_sweep_reference(model, pairs, target)
    assert_same_cells(fast, ref)
    assert (patch_sweep(model, pairs, target).clean - fast.clean).abs().max() > 1e-4
