"""Direction ablation vs a hand-written BERT forward with masked attention (independent oracle)."""

from __future__ import annotations

import pytest
import torch

from mechir import Part
from mechir.hooks import (
    ALL_DIRECTIONS,
    DIRECTION_GROUPS,
    cumulative_layer_ranges,
    direction_ablation_hooks,
    direction_group,
    direction_mask,
    sliding_layer_windows,
)
from mechir.models.encoder import hooked_cross_encoder_from_hf
from tests.helpers import tiny_hf_model, tiny_tokenizer
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
    hooks = direction_ablation_hooks(
        model, attending=attending, attended=attended, layers=layers, mode=mode
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
    hooks = direction_ablation_hooks(
        model, attending="query", attended="document", heads=["1/1", "L1H3"], layers=[0, 1]
    )
    assert [name for name, _ in hooks] == ["blocks.1.attn.hook_pattern"]
    torch.testing.assert_close(model.score(tiny_batch, hooks=hooks), expected, atol=ATOL, rtol=0)


def test_empty_direction_changes_nothing(tiny, tiny_batch):
    model, _, _ = tiny
    # query tokens attending to padding: no (real) entry selected
    hooks = direction_ablation_hooks(model, attending="query", attended="pad", layers=[0, 1])
    torch.testing.assert_close(model.score(tiny_batch, hooks=hooks), model.score(tiny_batch))


def test_everything_removed_makes_score_document_independent(tiny):
    model, _, _ = tiny
    batch = model.encode(["what cat runs"] * 2, ["the dog sleeps", "blue fish in water"])
    every = [(p, tuple(Part)[:5]) for p in tuple(Part)[:5]]
    hooks = direction_ablation_hooks(model, directions=every)
    s = model.score(batch, hooks=hooks, batch_size=1)
    assert s[0] != model.score(batch)[0]
    # CLS's final state no longer depends on any other token, so both pairs score the same
    # only if position/type embeddings match: [CLS] is at position 0 with type 0 in both.
    torch.testing.assert_close(s[0], s[1], atol=1e-6, rtol=0)


def test_mixed_length_batch_equals_per_example(tiny, tiny_batch):
    model, _, _ = tiny
    hooks = direction_ablation_hooks(model, directions="no_interaction")
    together = model.score(tiny_batch, hooks=hooks)
    alone = torch.cat([model.score(tiny_batch[i], hooks=hooks) for i in range(len(tiny_batch))])
    torch.testing.assert_close(together, alone, atol=ATOL, rtol=0)
    # the same list on sub-batches, and a per-sub-batch builder (still accepted), agree
    torch.testing.assert_close(
        model.score(tiny_batch, hooks=hooks, batch_size=3), together, atol=ATOL, rtol=0
    )
    build = lambda b: direction_ablation_hooks(model, directions="no_interaction")  # noqa: E731
    torch.testing.assert_close(
        model.score(tiny_batch, hooks=build, batch_size=3), together, atol=ATOL, rtol=0
    )


def same_shape_batches(model):
    """Two batches of identical shape whose parts differ (queries of 1 and 4 tokens)."""
    a = model.encode(["cat", "dog"], ["the cat runs in the big house", "a red fish"])
    b = model.encode(["what cat runs in", "dog"], ["the cat runs in", "a red fish"])
    assert a.input_ids.shape == b.input_ids.shape and not torch.equal(a.parts, b.parts)
    return a, b


@pytest.mark.parametrize("mode", ["zero", "renormalize"])
def test_hooks_built_once_read_each_batch_parts(tiny, mode):
    model, hf, _ = tiny
    hooks = direction_ablation_hooks(
        model, attending="query", attended="document", layers=[0, 1], mode=mode
    )
    for batch in same_shape_batches(model):
        keep = hand_keep(batch, [int(Part.QUERY)], [int(Part.DOCUMENT)])
        expected = oracle(hf, batch, {0: keep, 1: keep}, mode=mode)
        torch.testing.assert_close(model.score(batch, hooks=hooks), expected, atol=ATOL, rtol=0)
        with model.hooks(fwd_hooks=hooks):
            torch.testing.assert_close(model(batch), expected, atol=ATOL, rtol=0)
        # on bare token ids the parts are inferred from [CLS]/[SEP]
        got = model.run_with_hooks(
            batch.input_ids, batch.token_type_ids, batch.attention_mask, fwd_hooks=hooks
        )
        torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def extreme_logit_model(tmp_path, dtype):
    """A tiny model whose layer-0 attention logits are scaled by 40: kept probabilities of
    ablated rows underflow, so renormalizing the post-softmax pattern would give zero rows."""
    hf = tiny_hf_model(3)
    with torch.no_grad():
        hf.bert.encoder.layer[0].attention.self.query.weight.mul_(40)
        hf.bert.encoder.layer[0].attention.self.query.bias.mul_(40)
    model = hooked_cross_encoder_from_hf(hf, tiny_tokenizer(tmp_path), device="cpu", dtype=dtype)
    return model, hf


def post_softmax_renormalize(batch, keep):
    """The old formulation: rescale the kept post-softmax probabilities (underflows)."""

    def hook(pattern, hook):
        kept = pattern * keep[:, None].to(pattern)
        denom = kept.sum(-1, keepdim=True)
        return torch.where(denom > 0, kept / denom.clamp_min(1e-30), torch.zeros_like(kept))

    return [("blocks.0.attn.hook_pattern", hook)]


@pytest.mark.parametrize(
    "dtype,atol,old_fails",
    # bf16 has fp32's exponent range: the old formulation underflows no sooner there
    [(torch.float32, ATOL, True), (torch.float16, 0.05, True), (torch.bfloat16, 0.1, False)],
)
def test_renormalize_is_minus_inf_before_softmax(tmp_path, dtype, atol, old_fails):
    model, hf = extreme_logit_model(tmp_path, dtype)
    batch = model.encode(
        ["what cat runs", "blue fish", "who eats the red stone"],
        ["the cat runs in the house", "a small fish is blue", "the bird eats the red stone"],
    )
    keep = hand_keep(batch, [int(Part.QUERY)], [int(Part.QUERY), int(Part.CLS)])
    expected = oracle(hf, batch, {0: keep}, mode="renormalize")
    hooks = direction_ablation_hooks(
        model, attending="query", attended=["query", "cls"], layers=[0], mode="renormalize"
    )
    got = model.score(batch, hooks=hooks)
    torch.testing.assert_close(got, expected, atol=atol, rtol=0)
    if old_fails:  # the case is one where rescaling probabilities goes wrong
        old = model.score(batch, hooks=post_softmax_renormalize(batch, keep))
        assert (old - expected).abs().max() > 3 * (got - expected).abs().max()


def test_composition_of_disjoint_lists(tiny, tiny_batch):
    model, _, _ = tiny
    a = direction_ablation_hooks(model, attending="query", attended="document", layers=[0])
    b = direction_ablation_hooks(model, attending="document", attended="query", layers=[1])
    both = a + b
    with model.hooks(fwd_hooks=a):
        nested = model.score(tiny_batch, hooks=b)
    torch.testing.assert_close(nested, model.score(tiny_batch, hooks=both))
    torch.testing.assert_close(model.run_with_hooks(tiny_batch, fwd_hooks=a + b), nested)


@pytest.mark.usefixtures("unchecked_shapes")  # tests the library's own errors
def test_validation(tiny, tiny_batch):
    model, _, _ = tiny
    kw = dict(attending="query", attended="document")
    with pytest.raises(ValueError, match="layer 2 out of range: model has 2 layers"):
        direction_ablation_hooks(model, layers=[2], **kw)
    with pytest.raises(ValueError, match="head 4 out of range"):
        direction_ablation_hooks(model, layers=[0], heads=[4], **kw)
    with pytest.raises(ValueError, match="unknown part name 'passage'"):
        direction_ablation_hooks(model, attending="passage", attended="query", layers=[0])
    with pytest.raises(ValueError, match="empty layer selection"):
        direction_ablation_hooks(model, layers=[], **kw)
    with pytest.raises(ValueError, match="unknown mode"):
        direction_ablation_hooks(model, layers=[0], mode="drop", **kw)
    with pytest.raises(ValueError, match="layer must be an int, got 2.7"):
        direction_ablation_hooks(model, layers=[2.7], **kw)
    with pytest.raises(ValueError, match="mode 'mean'"):
        direction_ablation_hooks(model, layers=[0], mode="mean", **kw)
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
