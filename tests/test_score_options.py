"""``model.score`` options: ``batch_size="auto"`` sized by a memory budget, ``autocast``."""

from __future__ import annotations

import math

import pytest
import torch

from mechir.attribution import rows_for_memory
from mechir.hooks import direction_ablation_hooks

ATOL = 1e-5


def forward_sizes(model, batch, **kwargs):
    """The scores and the number of pairs of every forward pass ``score`` ran."""
    sizes: list[int] = []

    def count(act, hook):
        sizes.append(act.shape[0])

    scores = model.score(batch, hooks=[("hook_score", count)], **kwargs)
    return scores, sizes


def test_auto_batch_size_respects_the_memory_budget(tiny, tiny_batch):
    """A budget for two rows of one forward pass: chunks of two, scores as one pair at a time."""
    model, _, _ = tiny
    seq_len = tiny_batch.input_ids.shape[1]
    cfg = model.cfg  # one layer's activations of one row, float32
    one_row = 4 * seq_len * (12 * cfg.d_model + 4 * cfg.d_mlp + 3 * cfg.n_heads * seq_len)
    assert rows_for_memory(model, seq_len, 2 * one_row, backward=False) == 2
    scores, sizes = forward_sizes(model, tiny_batch, batch_size="auto", memory_budget=2 * one_row)
    assert sizes == [2] * math.ceil(len(tiny_batch) / 2)
    alone, alone_sizes = forward_sizes(model, tiny_batch, batch_size=1)
    assert alone_sizes == [1] * len(tiny_batch)
    torch.testing.assert_close(scores, alone, atol=ATOL, rtol=0)
    # a budget below one row still runs one row at a time
    _, sizes = forward_sizes(model, tiny_batch, batch_size="auto", memory_budget=1)
    assert sizes == [1] * len(tiny_batch)
    # the default budget (2 GiB on the CPU) takes the tiny batch at once
    _, sizes = forward_sizes(model, tiny_batch, batch_size="auto")
    assert sizes == [len(tiny_batch)]


def test_a_forward_pass_costs_one_layer_a_backward_pass_every_layer(tiny):
    model, _, _ = tiny
    budget = 10**8
    assert rows_for_memory(model, 64, budget, backward=False) == pytest.approx(
        model.cfg.n_layers * rows_for_memory(model, 64, budget), rel=0.01
    )


def test_memory_budget_without_auto_is_refused(tiny, tiny_batch):
    model, _, _ = tiny
    with pytest.raises(ValueError, match='batch_size="auto"'):
        model.score(tiny_batch, batch_size=2, memory_budget=10**6)


def test_autocast_bfloat16_scores_close_to_float32(tiny, tiny_batch):
    """bfloat16 (8 bits of mantissa) scores near the float32 ones, hook-free (fused attention)
    and with a direction-ablation hook (explicit attention); float32 stays the default."""
    model, _, _ = tiny
    ablate = direction_ablation_hooks(model, directions="query_to_document")
    for hooks in (None, ablate):
        exact = model.score(tiny_batch, hooks=hooks)
        low = model.score(tiny_batch, hooks=hooks, autocast=torch.bfloat16)
        assert low.dtype == torch.float32 and torch.isfinite(low).all()
        assert not torch.equal(low, exact)  # it did run in bfloat16
        tolerance = 0.05 * (1 + exact.abs().max())
        torch.testing.assert_close(low, exact, atol=float(tolerance), rtol=0)
    with pytest.raises(ValueError, match="bfloat16 or torch.float16"):
        model.score(tiny_batch, autocast=torch.float64)
