"""Direction ablation vs a hand-written BERT forward with masked attention (independent oracle)."""

from __future__ import annotations

import pytest
import torch

from mechir import Part
from mechir.hooks import (
    ALL_DIRECTIONS,
    DIRECTION_GROUPS,
    cumulative_layer_ranges,
    direction_ablation,
    direction_group,
    direction_mask,
    sliding_layer_windows,
)
from tests.reference_bert import reference_logits

ATOL = 1e-5


def oracle(hf, batch, keep_per_layer, mode="zero"):
    with torch.no_grad():
        return reference_logits(
            hf,
            batch.input_ids,
            batch.token_type_ids,
            batch.attention_mask,
            layer_masks=keep_per_layer,
            mode=mode,
        )[:, 0]


def hand_keep(batch, attending, attended):
    """0/1 keep-mask built position by position from the part ids (no mechir mask code)."""
    parts = batch.parts.tolist()
    keep = torch.ones(len(parts), len(parts[0]), len(parts[0]))
    for b, row in enumerate(parts):
        for i, pi in enumerate(row):
            for j, pj in enumerate(row):
                if pi in attending and pj in attended:
                    keep[b, i, j] = 0
    return keep


def test_oracle_agrees_without_ablation(tiny, tiny_batch):
    model, hf, _ = tiny
    torch.testing.assert_close(
        model.score(tiny_batch), oracle(hf, tiny_batch, None), atol=ATOL, rtol=0
    )


@pytest.mark.parametrize("mode", ["zero", "renormalize"])
@pytest.mark.parametrize(
    "attending,attended,layers",
    [
        ((Part.QUERY,), (Part.DOCUMENT,), [0, 1]),
        ((Part.DOCUMENT,), (Part.QUERY,), [0]),
        ((Part.CLS,), tuple(Part)[:5], [0, 1]),  # CLS reads nothing: all-removed rows
        ((Part.DOCUMENT,), (Part.DOCUMENT,), [0]),
        ((Part.QUERY, Part.SEP1), (Part.CLS, Part.SEP2), [0]),
    ],
)
def test_direction_ablation_matches_oracle(tiny, tiny_batch, attending, attended, layers, mode):
    model, hf, _ = tiny
    keep = hand_keep(tiny_batch, [int(p) for p in attending], [int(p) for p in attended])
    expected = oracle(hf, tiny_batch, {layer: keep for layer in layers}, mode=mode)
    hooks = direction_ablation(
        tiny_batch, attending=attending, attended=attended, layers=layers, mode=mode, model=model
    )
    got = model.score(tiny_batch, hooks=hooks)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    assert not torch.allclose(got, model.score(tiny_batch), atol=1e-4), "ablation had no effect"


def test_head_subset_matches_oracle(tiny, tiny_batch):
    model, hf, _ = tiny
    keep = hand_keep(tiny_batch, [int(Part.QUERY)], [int(Part.DOCUMENT)])
    per_head = torch.ones(len(tiny_batch), model.cfg.n_heads, *keep.shape[1:])
    per_head[:, [1, 3]] = keep[:, None]
    expected = oracle(hf, tiny_batch, {1: per_head})
    hooks = direction_ablation(
        tiny_batch,
        attending="query",
        attended="document",
        heads=["1/1", "1/3"],
        layers=[0, 1],
        model=model,
    )
    assert [name for name, _ in hooks] == ["blocks.1.attn.hook_pattern"]
    torch.testing.assert_close(model.score(tiny_batch, hooks=hooks), expected, atol=ATOL, rtol=0)


def test_empty_direction_changes_nothing(tiny, tiny_batch):
    model, _, _ = tiny
    # query tokens attending to padding: no (real) entry selected
    hooks = direction_ablation(tiny_batch, attending="query", attended="pad", layers=[0, 1])
    torch.testing.assert_close(model.score(tiny_batch, hooks=hooks), model.score(tiny_batch))


def test_everything_removed_makes_score_document_independent(tiny):
    model, _, _ = tiny
    batch = model.encode(["what cat runs"] * 2, ["the dog sleeps", "blue fish in water"])
    every = [(p, tuple(Part)[:5]) for p in tuple(Part)[:5]]
    hooks = lambda b: direction_ablation(b, directions=every, model=model)  # noqa: E731
    s = model.score(batch, hooks=hooks, batch_size=1)
    assert s[0] != model.score(batch)[0]
    # CLS's final state no longer depends on any other token, so both pairs score the same
    # only if position/type embeddings match: [CLS] is at position 0 with type 0 in both.
    torch.testing.assert_close(s[0], s[1], atol=1e-6, rtol=0)


def test_mixed_length_batch_equals_per_example(tiny, tiny_batch):
    model, _, _ = tiny
    build = lambda b: direction_ablation(b, directions="no_interaction", model=model)  # noqa: E731
    together = model.score(tiny_batch, hooks=build(tiny_batch))
    alone = torch.cat(
        [model.score(tiny_batch[i], hooks=build(tiny_batch[i])) for i in range(len(tiny_batch))]
    )
    torch.testing.assert_close(together, alone, atol=ATOL, rtol=0)
    # sub-batches through a hook-building function equal the whole batch
    torch.testing.assert_close(
        model.score(tiny_batch, hooks=build, batch_size=3), together, atol=ATOL, rtol=0
    )


def test_composition_of_disjoint_lists(tiny, tiny_batch):
    model, _, _ = tiny
    a = direction_ablation(tiny_batch, attending="query", attended="document", layers=[0])
    b = direction_ablation(tiny_batch, attending="document", attended="query", layers=[1])
    both = direction_ablation(
        tiny_batch, attending="query", attended="document", layers=[0]
    ) + direction_ablation(tiny_batch, attending="document", attended="query", layers=[1])
    with model.hooks(fwd_hooks=a):
        nested = model.score(tiny_batch, hooks=b)
    torch.testing.assert_close(nested, model.score(tiny_batch, hooks=both))
    torch.testing.assert_close(model.run_with_hooks(tiny_batch, fwd_hooks=a + b), nested)


def test_wrong_batch_shape_is_a_clear_error(tiny, tiny_batch):
    model, _, _ = tiny
    hooks = direction_ablation(tiny_batch, attending="query", attended="document", layers=[0])
    with pytest.raises(ValueError, match="build the hooks for each batch"):
        model.score(tiny_batch, hooks=hooks, batch_size=2)


def test_validation(tiny, tiny_batch):
    model, _, _ = tiny
    kw = dict(attending="query", attended="document")
    with pytest.raises(ValueError, match="layer 2 out of range: model has 2 layers"):
        direction_ablation(tiny_batch, layers=[2], model=model, **kw)
    with pytest.raises(ValueError, match="head 4 out of range"):
        direction_ablation(tiny_batch, layers=[0], heads=[4], model=model, **kw)
    with pytest.raises(ValueError, match="unknown part name 'passage'"):
        direction_ablation(tiny_batch, attending="passage", attended="query", layers=[0])
    with pytest.raises(ValueError, match="empty layer selection"):
        direction_ablation(tiny_batch, layers=[], model=model, **kw)
    with pytest.raises(ValueError, match="needs model"):
        direction_ablation(tiny_batch, **kw)
    with pytest.raises(ValueError, match="unknown mode"):
        direction_ablation(tiny_batch, layers=[0], mode="drop", **kw)
    with pytest.raises(ValueError, match="unknown direction group"):
        direction_group("q2d")


def test_direction_helpers(tiny_batch):
    assert len(ALL_DIRECTIONS) == 25 and len(set(ALL_DIRECTIONS)) == 25
    assert cumulative_layer_ranges(3) == [[0], [0, 1], [0, 1, 2]]
    assert sliding_layer_windows(4, 2, 2) == [[0, 1], [2, 3]]
    nothing = direction_mask(tiny_batch, direction_group("cls_reads_nothing"))
    assert nothing[:, 0].eq(tiny_batch.attention_mask.bool()).all() and not nothing[:, 1:].any()
    no_inter = direction_mask(tiny_batch, DIRECTION_GROUPS["no_interaction"])
    q, d = tiny_batch.mask("query"), tiny_batch.mask("document")
    assert no_inter.sum() == 2 * (q.sum(-1) * d.sum(-1)).sum()
