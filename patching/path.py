"""Path patching: how much of the score change flows from a sender head into receiver heads.

For a sender head ``s`` and receiver heads ``R`` reading through channels ``C`` (query, key and/or
value inputs), in two runs on the corrupted input:

1. Sender ``s``'s output ``z`` is patched from the clean run while every other head's ``z`` (and,
   with ``freeze_mlps``, every MLP output) is frozen to its corrupted value. The residual stream
   reaching each receiver layer then carries the sender's signal only along direct paths (through
   the residual connections and LayerNorms). Record it: ``x_l`` for each receiver layer ``l``.
2. The receivers' ``C`` inputs (``blocks.{l}.hook_{q,k,v}_input`` of TransformerLens'
   ``use_split_qkv_input``) are set to ``x_l``; everything else runs normally. Its score is
   the patched score; the metric is ``(patched - corrupted) / (clean - corrupted)``.

A sender at or after every receiver's layer has no path to them: the score stays the corrupted
one. :func:`path_patch` batches all senders (one row per (pair, sender));
:func:`path_patch_reference` runs the two forwards per (pair, sender) with plain hooks.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from functools import partial
from typing import Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor

from mechir.hooks.patch import ActivationSource, patch_hooks
from mechir.interface import HookedReranker
from mechir.parts import CrossEncoderBatch
from mechir.running import Hooks
from mechir.selection import HeadLike, HeadSelection, head_label, heads_by_layer, select_heads
from patching.perturbations import AlignedPairs
from patching.results import PatchingResult
from patching.sweep import (
    DEFAULT_MEMORY_BUDGET,
    batch_rows,
    check_batch_size,
    rows_per_chunk,
    run_from_layers,
)
from patching.targets import CleanCache

Channel = Literal["q", "k", "v"]
CHANNELS: tuple[str, ...] = ("q", "k", "v")


@contextmanager
def split_qkv_input(model: HookedReranker) -> Iterator[HookedReranker]:
    """Enable ``blocks.{l}.hook_{q,k,v}_input`` (TransformerLens ``use_split_qkv_input``) inside
    the block; the previous setting is restored on exit."""
    previous = model.cfg.use_split_qkv_input
    model.cfg.use_split_qkv_input = True
    try:
        yield model
    finally:
        model.cfg.use_split_qkv_input = previous


def _check_channels(
    channels: Iterable[str], model: HookedReranker | None = None
) -> tuple[str, ...]:
    out = tuple(dict.fromkeys(channels))
    bad = [c for c in out if c not in CHANNELS]
    if bad or not out:
        raise ValueError(f"channels must be a non-empty subset of {CHANNELS}, got {channels!r}")
    shared = [c for c in out if c in ("k", "v")]
    if shared and model is not None and model.abilities.grouped_kv:
        n_kv = model.cfg.n_key_value_heads
        raise ValueError(
            f"channels {shared}: the model's {n_kv} key/value heads are each shared by "
            f"{model.cfg.n_heads // n_kv} query heads (grouped-query attention), so one receiver "
            "head's key/value input cannot be patched alone; use channels=('q',)"
        )
    return out


# ---------------------------------------------------------------------- hook factories
def path_freeze_hooks(
    model: HookedReranker,
    clean: CleanCache | ActivationSource,
    corrupted: CleanCache | ActivationSource,
    sender: HeadLike,
    *,
    freeze_mlps: bool = False,
) -> Hooks:
    """Step 1 of path patching, on the corrupted input: the sender's ``z`` patched from the
    clean run, every other head's ``z`` (and every MLP output, with ``freeze_mlps``) frozen to
    the corrupted run. ``clean`` and ``corrupted`` are caches of ``model.run_with_cache`` on the
    two inputs of the same pairs (their examples are matched by pair id: the patch intervention
    of :func:`mechir.hooks.patch_hooks`)."""
    ((s_layer, s_head),) = select_heads(model, [sender])
    others = [
        (layer, head)
        for layer in range(model.cfg.n_layers)
        for head in range(model.cfg.n_heads)
        if (layer, head) != (s_layer, s_head)
    ]
    hooks = patch_hooks(model, corrupted, "z", units=others)
    hooks += patch_hooks(model, clean, "z", units=[(s_layer, s_head)])
    if freeze_mlps:
        hooks += patch_hooks(model, corrupted, "mlp_out")
    return hooks


def receiver_input_hooks(
    model: HookedReranker,
    batch: CrossEncoderBatch,
    values: Mapping[int, Float[Tensor, "batch pos d_model"]],
    receivers: HeadSelection,
    channels: Iterable[Channel] = CHANNELS,
) -> Hooks:
    """Step 2 of path patching: set the receivers' q/k/v inputs to ``values[layer]``, the
    residual streams recorded in step 1 on ``batch`` (running the hooks on other inputs is an
    error).

    Needs :func:`split_qkv_input` active (the hooks ``blocks.{l}.hook_{c}_input`` have shape
    ``[batch, pos, n_heads, d_model]``; only the receivers' head slots are replaced).
    """
    channels = _check_channels(channels, model)
    heads = select_heads(model, receivers)
    n_heads = model.cfg.n_heads
    acts = {
        f"blocks.{layer}.hook_{c}_input": values[layer][:, :, None, :].expand(-1, -1, n_heads, -1)
        for layer in {layer for layer, _ in heads}
        for c in channels
    }
    source = ActivationSource(batch, acts, model)
    return [
        hook for c in channels for hook in patch_hooks(model, source, f"{c}_input", units=heads)
    ]


def _replace_hook(value: Tensor, act: Tensor, hook: Any) -> Tensor:
    return value.to(act.dtype)


def _receiver_hook(value: Tensor, heads: list[int], act: Tensor, hook: Any) -> Tensor:
    mask = torch.zeros(act.shape[2], dtype=torch.bool, device=act.device)
    mask[heads] = True
    return torch.where(mask[None, None, :, None], value.to(act.dtype)[:, :, None, :], act)


# ---------------------------------------------------------------------- shared set-up
def _senders(
    model: HookedReranker, receivers: list[tuple[int, int]], senders: Iterable[HeadLike] | None
) -> list[tuple[int, int]]:
    if senders is not None:
        return select_heads(model, senders)
    last = max(layer for layer, _ in receivers)
    return [(lay, h) for lay in range(last) for h in range(model.cfg.n_heads)]


def _result(
    model: HookedReranker,
    pairs: AlignedPairs,
    senders: list[tuple[int, int]],
    patched_rows: Tensor,
    clean: Tensor,
    corrupted: Tensor,
    receivers: list[tuple[int, int]],
    channels: tuple[str, ...],
) -> PatchingResult:
    cfg = model.cfg
    grid = torch.full((len(pairs), cfg.n_layers, cfg.n_heads), float("nan"))
    for j, (layer, head) in enumerate(senders):
        grid[:, layer, head] = patched_rows[:, j]
    labels = ",".join(head_label(*r) for r in receivers)
    return PatchingResult(
        target=f"path->{labels}:{''.join(channels)}",
        dims=("layer", "head"),
        coords={"layer": list(range(cfg.n_layers)), "head": list(range(cfg.n_heads))},
        patched=grid,
        clean=clean,
        corrupted=corrupted,
        pair_ids=list(pairs.pair_ids),
        grades=list(pairs.grades),
        method="path",
    )


# ---------------------------------------------------------------------- batched
def path_patch(
    model: HookedReranker,
    pairs: AlignedPairs,
    receivers: Iterable[HeadLike],
    *,
    channels: Iterable[Channel] = CHANNELS,
    senders: Iterable[HeadLike] | None = None,
    freeze_mlps: bool = False,
    batch_size: int | None = None,
    memory_budget: float = DEFAULT_MEMORY_BUDGET,
) -> PatchingResult:
    """Path-patched scores for every sender head -> ``receivers`` (``channels`` inputs).

    Args:
        receivers: receiver heads (``"l/h"`` or ``(l, h)``).
        channels: which receiver inputs get the sender's signal: any of ``"q"``, ``"k"``, ``"v"``.
        senders: sender heads (default: every head before the last receiver layer).
        freeze_mlps: also freeze MLP outputs in step 1 (default: MLPs recompute, the usual
            IOI convention; True keeps only residual + LayerNorm paths).
        batch_size: rows (pair x sender) per forward; default from ``memory_budget``.

    Returns:
        A :class:`PatchingResult` over a ``(layer, head)`` grid of senders (``method="path"``).
    """
    channels = _check_channels(channels, model)
    recv = select_heads(model, receivers)
    send = _senders(model, recv, senders)
    recv_layers = sorted({layer for layer, _ in recv})
    stop = recv_layers[-1]
    n = len(pairs)
    width = pairs.clean.input_ids.shape[1]
    check_batch_size(batch_size)
    rows_budget = batch_size or rows_per_chunk(model, width, memory_budget)
    s_layers = torch.tensor([layer for layer, _ in send])
    s_heads = torch.tensor([h for _, h in send])
    patched = torch.empty(n, len(send))
    clean_scores, corrupted_scores = torch.empty(n), torch.empty(n)
    pairs_per_group = max(1, rows_budget // max(1, len(send)))
    for g0 in range(0, n, pairs_per_group):
        group = pairs[g0 : g0 + pairs_per_group]
        with torch.no_grad():
            c_score, clean = model.run_with_cache(
                group.clean, names_filter=lambda name: name.endswith("attn.hook_z")
            )
            k_score, corrupted = model.run_with_cache(
                group.corrupted,
                names_filter=lambda name: name.endswith(("hook_z", "hook_mlp_out", "resid_pre")),
            )
        clean_scores[g0 : g0 + len(group)] = c_score.float().cpu()
        corrupted_scores[g0 : g0 + len(group)] = k_score.float().cpu()
        # rows: (pair, sender), sorted by the sender's layer (clamped to the last receiver layer)
        pair_of_row = torch.arange(len(group)).repeat_interleave(len(send))
        send_of_row = torch.arange(len(send)).repeat(len(group))
        starts = s_layers[send_of_row].clamp(max=stop)
        order = torch.argsort(starts, stable=True)
        pair_of_row, send_of_row, starts = pair_of_row[order], send_of_row[order], starts[order]
        for lo in range(0, len(order), rows_budget):
            sl = slice(lo, lo + rows_budget)
            p_rows, s_rows, st = pair_of_row[sl], send_of_row[sl], starts[sl]
            with torch.no_grad():
                values = _step1(
                    model, group, clean, corrupted, p_rows, s_layers[s_rows], s_heads[s_rows],
                    st, recv_layers, freeze_mlps,
                )  # fmt: skip
                scores = _step2(model, group, corrupted, p_rows, values, recv, channels)
            patched[g0 + p_rows.to(torch.long), s_rows] = scores.float().cpu()
    return _result(model, pairs, send, patched, clean_scores, corrupted_scores, recv, channels)


def _step1(
    model: HookedReranker,
    group: AlignedPairs,
    clean: CleanCache,
    corrupted: CleanCache,
    pair_rows: Tensor,
    sender_layers: Tensor,
    sender_heads: Tensor,
    starts: Tensor,
    receiver_layers: list[int],
    freeze_mlps: bool,
) -> dict[int, Tensor]:
    """Residual stream at each receiver layer with only the senders' direct paths active."""
    device = model.cfg.device
    idx = pair_rows.to(device)
    stop = receiver_layers[-1]
    values = {
        layer: corrupted[f"blocks.{layer}.hook_resid_pre"][idx].clone() for layer in receiver_layers
    }
    hooks: Hooks = []
    first = int(starts[0])
    n_heads = model.cfg.n_heads
    for layer in range(first, stop):
        active = int((starts <= layer).sum())
        z_name = f"blocks.{layer}.attn.hook_z"
        frozen = corrupted[z_name][idx[:active]]
        is_sender = (sender_layers[:active] == layer).to(device)
        heads = torch.arange(n_heads, device=device)[None] == sender_heads[:active, None].to(device)
        mask = (is_sender[:, None] & heads)[:, None, :, None]
        source = torch.where(mask, clean[z_name][idx[:active]], frozen)
        hooks.append((z_name, partial(_replace_hook, source)))
        if freeze_mlps:
            mlp = f"blocks.{layer}.hook_mlp_out"
            hooks.append((mlp, partial(_replace_hook, corrupted[mlp][idx[:active]])))

    def initial(layer: int, rows: Tensor) -> Tensor:
        return corrupted[f"blocks.{layer}.hook_resid_pre"][idx[rows.to(device)]]

    def record(layer: int, resid: Tensor) -> None:
        if layer in values:
            values[layer][: len(resid)] = resid

    rows = batch_rows(group.corrupted, pair_rows)
    with model.hooks(fwd_hooks=hooks):
        final = run_from_layers(model, starts, initial, rows, stop_layer=stop, on_layer=record)
    values[stop][: len(final)] = final
    return values


def _step2(
    model: HookedReranker,
    group: AlignedPairs,
    corrupted: CleanCache,
    pair_rows: Tensor,
    values: dict[int, Tensor],
    receivers: list[tuple[int, int]],
    channels: tuple[str, ...],
) -> Tensor:
    """Score with the receivers' inputs set to the step-1 residual streams."""
    device = model.cfg.device
    idx = pair_rows.to(device)
    start = min(layer for layer, _ in receivers)
    starts = torch.full((len(pair_rows),), start)

    def initial(layer: int, rows: Tensor) -> Tensor:
        return corrupted[f"blocks.{layer}.hook_resid_pre"][idx[rows.to(device)]]

    hooks: Hooks = []
    for layer, heads in heads_by_layer(receivers).items():
        for c in channels:
            hooks.append(
                (f"blocks.{layer}.hook_{c}_input", partial(_receiver_hook, values[layer], heads))
            )
    with split_qkv_input(model), model.hooks(fwd_hooks=hooks):
        return run_from_layers(model, starts, initial, batch_rows(group.corrupted, pair_rows))


# ---------------------------------------------------------------------- reference
def _store_hook(store: dict[int, Tensor], layer: int, act: Tensor, hook: Any) -> None:
    store[layer] = act.detach().clone()


def path_patch_reference(
    model: HookedReranker,
    pairs: AlignedPairs,
    receivers: Iterable[HeadLike],
    *,
    channels: Iterable[Channel] = CHANNELS,
    senders: Iterable[HeadLike] | None = None,
    freeze_mlps: bool = False,
) -> PatchingResult:
    """The oracle of :func:`path_patch`: two full forwards per (pair, sender), plain hooks."""
    channels = _check_channels(channels, model)
    recv = select_heads(model, receivers)
    send = _senders(model, recv, senders)
    recv_layers = sorted({layer for layer, _ in recv})
    n = len(pairs)
    patched = torch.empty(n, len(send))
    clean_scores, corrupted_scores = torch.empty(n), torch.empty(n)
    with torch.no_grad():
        for i in range(n):
            pair = pairs[i]
            c_score, clean = model.run_with_cache(pair.clean)
            k_score, corrupted = model.run_with_cache(pair.corrupted)
            clean_scores[i], corrupted_scores[i] = float(c_score[0]), float(k_score[0])
            for j, sender in enumerate(send):
                values: dict[int, Tensor] = {}
                hooks = path_freeze_hooks(model, clean, corrupted, sender, freeze_mlps=freeze_mlps)
                hooks += [
                    (f"blocks.{layer}.hook_resid_pre", partial(_store_hook, values, layer))
                    for layer in recv_layers
                ]
                model.run_with_hooks(pair.corrupted, fwd_hooks=hooks)
                with split_qkv_input(model):
                    recv_hooks = receiver_input_hooks(model, pair.corrupted, values, recv, channels)
                    score = model.run_with_hooks(pair.corrupted, fwd_hooks=recv_hooks)
                patched[i, j] = float(score[0])
    return _result(model, pairs, send, patched, clean_scores, corrupted_scores, recv, channels)


__all__ = [
    "CHANNELS",
    "path_freeze_hooks",
    "path_patch",
    "path_patch_reference",
    "receiver_input_hooks",
    "split_qkv_input",
]
