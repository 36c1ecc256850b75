"""Activation source: tagged rows equal the cached activations at real tokens, matched-term
tags equal a naive loop, the stream yields exactly-sized batches forever."""

from __future__ import annotations

import pytest
import torch

from mechir import Part
from mechir.features.source import (
    ActivationStream,
    collect_activations,
    site_activations,
    site_forward,
)
from tests.features.conftest import PAIRS


@pytest.mark.parametrize(
    "site", ["blocks.0.hook_resid_post", "blocks.1.attn.hook_z", "blocks.0.hook_mlp_out"]
)
def test_rows_are_the_cached_activations_of_real_tokens(tiny, tiny_batch, site):
    model, _, _ = tiny
    rows = site_activations(model, tiny_batch, site)
    _, cache = model.run_with_cache(tiny_batch)
    ref = cache[site].reshape(*cache[site].shape[:2], -1)
    real = tiny_batch.attention_mask.bool()
    assert len(rows) == int(real.sum())
    torch.testing.assert_close(rows.acts, ref[rows.pair, rows.position], rtol=1e-5, atol=2e-5)
    assert (rows.part != int(Part.PAD)).all()
    assert torch.equal(rows.token, tiny_batch.input_ids[rows.pair, rows.position])


def test_special_tokens_can_be_dropped(tiny, tiny_batch):
    model, _, _ = tiny
    rows = site_activations(model, tiny_batch, "blocks.0.hook_resid_post", special_tokens=False)
    content = tiny_batch.mask(["query", "document"])
    assert len(rows) == int(content.sum())
    assert set(rows.part.tolist()) == {int(Part.QUERY), int(Part.DOCUMENT)}


def test_matched_tags_equal_a_naive_loop(tiny, tiny_batch):
    model, _, _ = tiny
    rows = site_activations(model, tiny_batch, "blocks.0.hook_resid_post")
    for r in range(len(rows)):
        b, pos = int(rows.pair[r]), int(rows.position[r])
        ids, parts = tiny_batch.input_ids[b].tolist(), tiny_batch.parts[b].tolist()
        other = {Part.QUERY: Part.DOCUMENT, Part.DOCUMENT: Part.QUERY}.get(Part(parts[pos]))
        expected = other is not None and any(
            t == ids[pos] and p == other for t, p in zip(ids, parts)
        )
        assert bool(rows.matched[r]) == expected
    assert rows.matched.any()


def test_the_forward_stops_at_the_site(tiny, tiny_batch):
    model, _, _ = tiny
    ran = []
    with model.hooks(fwd_hooks=[("blocks.1.hook_resid_post", lambda a, hook: ran.append(1))]):
        site_forward(model, tiny_batch, "blocks.0.hook_resid_post")
    assert not ran


def test_collect_numbers_pairs_in_input_order(tiny):
    model, _, _ = tiny
    rows = collect_activations(model, PAIRS, "blocks.0.hook_resid_post", pairs_per_forward=3)
    assert rows.pair.unique().tolist() == list(range(len(PAIRS)))


def test_stream_batches_are_exact_and_never_run_dry(tiny):
    model, _, _ = tiny
    site = "blocks.0.hook_resid_post"
    total = len(collect_activations(model, PAIRS, site))
    stream = ActivationStream(model, PAIRS, site, batch_size=7, buffer_size=20)
    batches = [next(stream) for _ in range(3 * total // 7 + 5)]  # > 3 epochs of rows
    assert all(b.shape == (7, model.cfg.d_model) for b in batches)
    assert stream.epoch >= 3


def test_unknown_site_is_refused_in_one_line(tiny, tiny_batch):
    model, _, _ = tiny
    with pytest.raises(ValueError, match="no hook point"):
        site_activations(model, tiny_batch, "blocks.0.hook_resid_pots")


def test_row_stream_and_fp16_cache(tiny, tmp_path):
    from mechir.features.source import RowStream, load_rows, save_rows

    model, _, _ = tiny
    rows = collect_activations(model, PAIRS, "blocks.0.hook_resid_post")
    save_rows(rows, tmp_path / "rows.pt")
    back = load_rows(tmp_path / "rows.pt")
    torch.testing.assert_close(back.acts, rows.acts.half().float())
    assert torch.equal(back.matched, rows.matched) and torch.equal(back.pair, rows.pair)
    stream = RowStream(back.acts, batch_size=len(rows) - 1)
    first = [next(stream) for _ in range(3)]
    assert all(b.shape == (len(rows) - 1, rows.acts.shape[1]) for b in first)
    assert stream.epoch >= 3
