"""sae_hooks against plain TransformerLens hooks computing the same reconstruction by hand from
the SAE's weights (encode and decode called directly, no mechir splicing code)."""

from __future__ import annotations

import threading

import pytest
import torch

from mechir.features.splice import FeatureEdit, sae_hooks
from mechir.hooks import head_knockout_hooks
from tests.features.conftest import SITE


def oracle_hooks(sae, *, error: str, edit=None, where_parts=None):
    """A hand-written hook: x -> decode(f') + (x - decode(f)) (or without the error) at real
    tokens, f' = f with ``edit(f)`` applied where ``where_parts`` (a [batch,pos] mask fn)."""

    def fn(act, hook):
        from mechir.running import running_batch

        batch = running_batch(hook)
        f = sae.encode(act)
        f2 = f.clone()
        if edit is not None:
            where = batch.attention_mask.bool() if where_parts is None else batch.mask(where_parts)
            f2[where] = edit(f[where])
        rec, rec2 = sae.decode(f), sae.decode(f2)
        out = rec2 + (act - rec) if error == "keep" else rec2
        return torch.where(batch.attention_mask.bool()[..., None], out, act)

    return [(SITE, fn)]


def test_error_kept_scores_exactly_as_the_model(bert_sae, tiny_batch):
    model, sae, _ = bert_sae
    clean = model.score(tiny_batch)
    for error in ("keep", "detach"):
        spliced = model.score(tiny_batch, hooks=sae_hooks(model, sae, error=error))
        assert (spliced - clean).abs().max() <= 1e-5
    assert torch.equal(model.score(tiny_batch, hooks=sae_hooks(model, sae)), clean)


def test_error_dropped_runs_on_the_reconstruction(bert_sae, tiny_batch):
    model, sae, _ = bert_sae
    got = model.score(tiny_batch, hooks=sae_hooks(model, sae, error="drop"))
    want = model.score(tiny_batch, hooks=oracle_hooks(sae, error="drop"))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (got - model.score(tiny_batch)).abs().max() > 1e-3


@pytest.mark.parametrize(
    "edit,fn",
    [
        (
            FeatureEdit((0, 3), "ablate"),
            lambda f: torch.cat([f[:, :0], 0 * f[:, 0:1], f[:, 1:3], 0 * f[:, 3:4], f[:, 4:]], 1),
        ),
        (FeatureEdit((5,), "clamp", 2.5), None),
        (FeatureEdit((5,), "scale", 3.0), None),
        (FeatureEdit((5,), "steer", 1.5), None),
    ],
)
@pytest.mark.parametrize("parts", [None, "query"])
def test_edits_equal_the_hand_written_edit(bert_sae, tiny_batch, edit, fn, parts):
    model, sae, acts = bert_sae
    live = int(sae.encode(acts.acts).count_nonzero(0).argmax())  # a feature that fires
    if fn is None:
        edit = FeatureEdit((live,), edit.mode, edit.value)
        op = {
            "clamp": lambda v: torch.full_like(v, edit.value),
            "scale": lambda v: v * edit.value,
            "steer": lambda v: v + edit.value,
        }[edit.mode]

        def fn(f):
            f = f.clone()
            f[:, live] = op(f[:, live])
            return f

    got = model.score(tiny_batch, hooks=sae_hooks(model, sae, edit=edit, parts=parts))
    want = model.score(
        tiny_batch, hooks=oracle_hooks(sae, error="keep", edit=fn, where_parts=parts)
    )
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_edit_restricted_to_parts_leaves_other_parts_alone(bert_sae, tiny_batch):
    model, sae, _ = bert_sae
    edit = FeatureEdit(tuple(range(sae.cfg.d_sae)), "ablate")
    seen = {}

    def catch(act, hook):
        seen["x"] = act.detach().clone()

    read = [("blocks.1.hook_resid_pre", catch)]
    with model.hooks(fwd_hooks=read):
        model.score(tiny_batch)
    clean = seen["x"]
    with model.hooks(fwd_hooks=sae_hooks(model, sae, edit=edit, parts="document") + read):
        model.score(tiny_batch)
    changed = (seen["x"] - clean).abs().amax(-1) > 0
    assert not changed[~tiny_batch.mask("document")].any()
    assert changed[tiny_batch.mask("document")].any()


def test_composes_with_other_factories(bert_sae, tiny_batch):
    model, sae, _ = bert_sae
    knock = head_knockout_hooks(model, ["0/1", "1/2"])
    both = model.score(tiny_batch, hooks=sae_hooks(model, sae) + knock)
    torch.testing.assert_close(both, model.score(tiny_batch, hooks=knock), rtol=0, atol=1e-6)


def test_threads_get_their_own_splicing(bert_sae, tiny_batch):
    model, sae, _ = bert_sae
    plain = model.score(tiny_batch)
    drop = model.score(tiny_batch, hooks=sae_hooks(model, sae, error="drop"))
    hooks = sae_hooks(model, sae, error="drop")
    results: dict[int, list] = {0: [], 1: []}

    def work(i):
        for _ in range(5):
            results[i].append(model.score(tiny_batch, hooks=hooks if i else None))

    threads = [threading.Thread(target=work, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(torch.equal(r, plain) for r in results[0])
    assert all(torch.allclose(r, drop, atol=1e-6) for r in results[1])


def test_bad_arguments_are_refused_in_one_line(bert_sae, unchecked_shapes):
    model, sae, _ = bert_sae
    with pytest.raises(ValueError, match="unknown error mode"):
        sae_hooks(model, sae, error="kept")
    with pytest.raises(ValueError, match="out of range"):
        sae_hooks(model, sae, edit=FeatureEdit((sae.cfg.d_sae,)))
    with pytest.raises(ValueError, match="unknown edit mode"):
        FeatureEdit((0,), "zero")
    with pytest.raises(ValueError, match="no hook point"):
        sae_hooks(model, {"blocks.9.hook_resid_pre": sae})


def test_a_dormant_hook_point_is_refused_not_silently_skipped(bert_sae, unchecked_shapes):
    """``blocks.0.hook_mlp_in`` is in the BERT's hook_dict but never runs (TransformerLens's
    ``use_hook_mlp_in`` is off): splicing there would change nothing, so it is refused."""
    model, sae, _ = bert_sae
    assert "blocks.0.hook_mlp_in" in model.hook_dict and not model.cfg.use_hook_mlp_in
    with pytest.raises(ValueError, match="exists but never runs .*use_hook_mlp_in=False"):
        sae_hooks(model, {"blocks.0.hook_mlp_in": sae})
