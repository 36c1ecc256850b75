"""The batched patching engine: many (pair, cell) patches per forward pass.

For pair ``i`` and cell ``c`` of a target (:mod:`patching.targets`) the patched score is::

    s_patch[i, c] = f(corrupted_i | a_c <- a_c(clean_i))

Pairs are grouped; per group one cached forward of the clean inputs and one of the corrupted
inputs; then the batch is *expanded*, one row per (pair, cell), and chunked to a memory budget. A
cell at layer ``l`` cannot change anything before layer ``l``, so its row starts from the cached
corrupted ``resid_pre`` of layer ``l`` and only runs layers ``l..L-1`` (rows join the batch at their
layer); rows patched before the last layer compute only its [CLS] position, the one the pooler
reads. The patches themselves are hooks. :func:`patching.reference.patch_sweep_reference` is the
oracle (one full forward per cell); both agree to float32 rounding (tests check 1e-5).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from mechir import distributed
from mechir.interface import HookedReranker
from mechir.parts import CrossEncoderBatch
from mechir.running import Hooks
from patching.perturbations import AlignedPairs
from patching.results import PatchingResult
from patching.targets import PatchTarget

#: Default memory budget of one expanded chunk (bytes, rough estimate; see :func:`rows_per_chunk`).
DEFAULT_MEMORY_BUDGET = 2**30
#: ``progress=None`` shows a progress bar when a sweep patches at least this many (pair, cell)s.
PROGRESS_MIN_CELLS = 2000


def rows_per_chunk(
    model: HookedReranker, width: int, memory_budget: float = DEFAULT_MEMORY_BUDGET
) -> int:
    """Rows of an expanded batch that fit ``memory_budget`` bytes (a rough, conservative estimate).

    Per row, a forward pass without gradients peaks at about ``24 d_model + 6 d_mlp`` values per
    position (residuals, q/k/v/z, LayerNorm temporaries, MLP, the growing batch and the patch's
    clean source) plus ``4 n_heads pos`` per position for attention scores and patterns. (Peak
    resident memory measured on CPU: ~45 d_model values per row and position for BERT-large at
    24 tokens, ~20 for the 6-layer MiniLM at 160 tokens.)
    """
    cfg = model.cfg
    per_row = width * (24 * cfg.d_model + 6 * cfg.d_mlp + 4 * cfg.n_heads * width)
    per_row *= torch.finfo(cfg.dtype).bits // 8
    return max(1, int(memory_budget // per_row))


def check_batch_size(batch_size: int | None) -> None:
    if batch_size is not None and batch_size < 1:
        raise ValueError(
            f"batch_size must be >= 1 (or None for the memory budget), got {batch_size}"
        )


# ====================================================================== running blocks
def run_from_layers(
    model: HookedReranker,
    starts: Int[Tensor, " rows"],
    initial: Callable[[int, Tensor], Float[Tensor, "k pos d_model"]],
    rows: CrossEncoderBatch | Int[Tensor, "rows pos"],
    *,
    stop_layer: int | None = None,
    on_layer: Callable[[int, Tensor], None] | None = None,
    cls_only_last_layer: bool = False,
) -> Tensor:
    """Score rows that each start at a layer, with the hooks active on ``model``.

    ``starts`` must be sorted (ascending). Rows starting at layer ``l`` join the batch there, their
    residual stream given by ``initial(l, row_indices)`` (the input of block ``l``; for ``l ==
    n_layers``, the final hidden states). Because rows only join at the end, row ``r`` is
    batch index ``r`` in every block it runs through. ``on_layer(l, resid)`` sees the input of
    every block run. ``rows`` is the batch of the rows (full width, see :func:`batch_rows`): it is
    the model's running batch meanwhile, so part-dependent hooks active on the model (e.g.
    ``direction_ablation_hooks``) read the rows' parts; a bare attention mask is still accepted
    for hooks that need no parts.

    With ``cls_only_last_layer``, the last block computes only the [CLS] position, the only one the
    pooler reads (keys and values still come from every position): about a layer less per row.
    The caller must not have hooks on the last block that expect every position; hooks that
    anyone else registered there make it fall back to the full block.

    Returns:
        ``[rows]`` scores, or with ``stop_layer`` the ``[rows, pos, d_model]`` input of block
        ``stop_layer`` (blocks from it on are not run; rows must start at or before it).
    """
    stop = model.cfg.n_layers if stop_layer is None else stop_layer
    starts = starts.cpu()
    if len(starts) > 1 and (starts[1:] < starts[:-1]).any():
        raise ValueError("rows must be sorted by start layer")
    if isinstance(rows, CrossEncoderBatch):
        attention_mask, running = rows.attention_mask, model.running_on(rows)
    else:
        attention_mask, running = rows, contextlib.nullcontext()
    with running:
        return _run_rows(
            model, starts, initial, attention_mask, stop, on_layer, cls_only_last_layer, stop_layer
        )


def batch_rows(batch: CrossEncoderBatch, rows: Int[Tensor, " rows"]) -> CrossEncoderBatch:
    """Rows of ``batch`` at its full width (indexing a batch trims padding; cached activations
    keep the group's width)."""
    return CrossEncoderBatch(
        *(
            t[rows]
            for t in (batch.input_ids, batch.token_type_ids, batch.attention_mask, batch.parts)
        )
    )


def _run_rows(
    model: HookedReranker,
    starts: Tensor,
    initial: Callable[[int, Tensor], Tensor],
    attention_mask: Tensor,
    stop: int,
    on_layer: Callable[[int, Tensor], None] | None,
    cls_only_last_layer: bool,
    stop_layer: int | None,
) -> Tensor:
    n_layers = model.cfg.n_layers
    device = model.cfg.device
    additive = model.additive_attention_mask(attention_mask.to(device))
    resid: Tensor | None = None
    first = int(starts[0])
    for layer in range(first, stop + 1):
        new = (starts == layer).nonzero()[:, 0]
        if len(new):
            block_input = initial(layer, new)
            resid = block_input if resid is None else torch.cat([resid, block_input])
        if layer == stop:
            break
        assert resid is not None
        if on_layer is not None:
            on_layer(layer, resid)
        cls_only = cls_only_last_layer and layer == n_layers - 1
        resid = model.run_block(layer, resid, additive[: len(resid)], cls_only=cls_only)
    assert resid is not None and len(resid) == len(starts)
    if stop_layer is not None:
        return resid
    return model.score_from_resid(resid)


def final_name(model: HookedReranker) -> str:
    """The cached input of the score head (the start of rows patched after the last block)."""
    return model.final_hidden_name


def start_names(model: HookedReranker, target: PatchTarget) -> list[str]:
    """The corrupted activations rows of ``target`` start from: each target layer's input."""
    n = model.cfg.n_layers
    layers = target.target_layers(model)
    return [final_name(model) if lay == n else f"blocks.{lay}.hook_resid_pre" for lay in layers]


# ====================================================================== cached groups
@dataclass
class CachedGroup:
    """Cached clean and corrupted activations of a few consecutive pairs."""

    pairs: AlignedPairs
    index: Tensor  # positions of these pairs in the full set
    clean_scores: Tensor
    corrupted_scores: Tensor
    clean: dict[str, Tensor]
    corrupted: dict[str, Tensor]


def _watch(act: Tensor, hook: Any) -> None:
    """A hook that changes nothing (it makes its hook point watched)."""


def cached_groups(
    model: HookedReranker,
    pairs: AlignedPairs,
    target: PatchTarget,
    rows_per_pair: Tensor,
    budget_rows: int,
    *,
    extra_corrupted: Iterable[str] = (),
) -> Iterator[CachedGroup]:
    """Consecutive pairs whose rows fit ``budget_rows`` (at least one pair), with the caches the
    engine needs: the target's hooks (clean) and the start of each target layer (corrupted)."""
    clean_names = set(target.hook_names(model))
    corrupted_names = set(start_names(model, target)) | set(extra_corrupted)
    # both runs watch the same hook points, so both take the same attention path (fused or
    # explicit: mechir.models.attention) in every layer and equal inputs give equal scores
    same_path = [(name, _watch) for name in sorted(clean_names | corrupted_names)]
    for start, stop in group_slices(rows_per_pair, budget_rows):
        group = pairs[start:stop]
        with torch.no_grad(), model.hooks(fwd_hooks=same_path):
            clean_scores, clean = model.run_with_cache(
                group.clean, names_filter=lambda name: name in clean_names
            )
            corrupted_scores, corrupted = model.run_with_cache(
                group.corrupted, names_filter=lambda name: name in corrupted_names
            )
        yield CachedGroup(
            group,
            torch.arange(start, stop),
            clean_scores.float().cpu(),
            corrupted_scores.float().cpu(),
            dict(clean.cache_dict),
            dict(corrupted.cache_dict),
        )


def group_slices(rows_per_pair: Int[Tensor, " pair"], budget_rows: int) -> list[tuple[int, int]]:
    """``(start, stop)`` of consecutive pairs whose rows fit ``budget_rows`` (at least one pair)."""
    out, start, n = [], 0, len(rows_per_pair)
    while start < n:
        stop, total = start + 1, int(rows_per_pair[start])
        while stop < n and total + int(rows_per_pair[stop]) <= budget_rows:
            total += int(rows_per_pair[stop])
            stop += 1
        out.append((start, stop))
        start = stop
    return out


# ====================================================================== scoring rows
def _row_patch_hook(first: int, mask: Tensor, source: Tensor, act: Tensor, hook: Any) -> Tensor:
    """Patch rows ``first:first+len(mask)`` of an activation where ``mask``, from ``source``."""
    last = first + len(mask)
    patched = torch.where(mask, source.to(act.dtype), act[first:last])
    return torch.cat([act[:first], patched, act[last:]])


def _score_chunk(
    model: HookedReranker,
    group: CachedGroup,
    target: PatchTarget,
    cells: Tensor,
    pair_rows: Tensor,
    cell_rows: Tensor,
    cls_only: bool,
) -> Tensor:
    """One expanded forward: row ``r`` = group pair ``pair_rows[r]`` with one cell patched."""
    device = model.cfg.device
    layer_of_row = cells[cell_rows, 0]
    parts = group.pairs.corrupted.parts.to(device)
    hooks: Hooks = []
    for layer in layer_of_row.unique().tolist():
        rows = (layer_of_row == layer).nonzero()[:, 0]
        first = int(rows[0])
        name = target.hook_name(layer)
        source = group.clean[name][pair_rows[rows].to(device)]
        sub = cells[cell_rows[rows], 1:].to(device)
        mask = target.row_mask(sub, parts[pair_rows[rows].to(device)], source)
        hooks.append((name, partial(_row_patch_hook, first, mask, source)))
    idx = pair_rows.to(device)
    n_layers = model.cfg.n_layers

    def initial(layer: int, rows: Tensor) -> Tensor:
        name = final_name(model) if layer == n_layers else f"blocks.{layer}.hook_resid_pre"
        return group.corrupted[name][idx[rows.to(device)]]

    rows_batch = batch_rows(group.pairs.corrupted, pair_rows)
    with torch.no_grad(), model.hooks(fwd_hooks=hooks):
        return run_from_layers(
            model, layer_of_row, initial, rows_batch, cls_only_last_layer=cls_only
        )


def score_cells(
    model: HookedReranker,
    group: CachedGroup,
    target: PatchTarget,
    cells: Int[Tensor, "cells cols"],
    pair_rows: Int[Tensor, " rows"],
    cell_rows: Int[Tensor, " rows"],
    rows_budget: int,
    on_chunk: Callable[[int], None] | None = None,
) -> Float[Tensor, " rows"]:
    """Patched scores of rows ``(group pair pair_rows[r], cell cells[cell_rows[r]])`` (float32,
    CPU, in the order given), ``rows_budget`` rows per forward pass."""
    out = torch.empty(len(pair_rows))
    order = torch.argsort(cells[cell_rows, 0], stable=True)  # by start layer
    for lo in range(0, len(order), rows_budget):
        chunk = order[lo : lo + rows_budget]
        # rows patched before the last layer need only its [CLS] position
        early = cells[cell_rows[chunk], 0] < model.cfg.n_layers - 1
        for part, cls_only in ((early, True), (~early, False)):
            if part.any():
                rows = chunk[part]
                scores = _score_chunk(
                    model, group, target, cells, pair_rows[rows], cell_rows[rows], cls_only
                )
                out[rows] = scores.float().cpu()
        if on_chunk is not None:
            on_chunk(len(chunk))
    return out


# ====================================================================== the sweep
def empty_result(
    model: HookedReranker, pairs: AlignedPairs, target: PatchTarget, method: str
) -> tuple[PatchingResult, Tensor, Tensor, Tensor]:
    """A NaN-filled result on the target's grid, and the cells, their flat index and validity."""
    width = pairs.clean.input_ids.shape[1]
    dims, coords = target.grid(model, width)
    cells = target.cell_rows(model, width)
    shape = tuple(len(coords[d]) for d in dims)
    result = PatchingResult(
        target=target.name,
        dims=dims,
        coords=coords,
        patched=torch.full((len(pairs), *shape), float("nan")),
        clean=torch.empty(len(pairs)),
        corrupted=torch.empty(len(pairs)),
        pair_ids=list(pairs.pair_ids),
        grades=list(pairs.grades),
        method=method,
    )
    return result, cells, target.flat_index(model, cells, width), target.valid(cells, pairs.lengths)


def progress_bar(total: int, progress: bool | None, desc: str, unit: str) -> Any:
    """A tqdm bar over ``total`` units; ``progress=None`` shows it for long calls only."""
    from tqdm.auto import tqdm

    show = total >= PROGRESS_MIN_CELLS if progress is None else progress
    return tqdm(total=total, desc=desc, unit=unit, disable=not show, dynamic_ncols=True)


def patch_sweep(
    model: HookedReranker,
    pairs: AlignedPairs,
    target: PatchTarget,
    *,
    batch_size: int | None = None,
    memory_budget: float = DEFAULT_MEMORY_BUDGET,
    progress: bool | None = None,
) -> PatchingResult:
    """Patched scores of every (pair, cell) of ``target``, many cells per forward pass.

    Args:
        pairs: aligned clean/corrupted inputs (see :mod:`patching.perturbations`).
        target: what to patch (:func:`~patching.targets.resid_target`, ``head_target``, ...).
        batch_size: rows (one per patched cell) per forward pass; default from ``memory_budget``.
        memory_budget: bytes for one expanded forward pass (rough; see :func:`rows_per_chunk`).
        progress: a progress bar counting patched cells (pair x cell), with total and ETA;
            default (None): shown when there are at least ``PROGRESS_MIN_CELLS`` of them.

    Returns:
        A :class:`PatchingResult` (``method="exact"``); its :meth:`~PatchingResult.metric` is
        ``(patched - corrupted) / (clean - corrupted)``. Under a process group of several
        ranks the pairs are sharded and the result gathered in pair order
        (:mod:`patching.sharded`).
    """
    check_batch_size(batch_size)
    if distributed.sharding():
        from patching.sharded import sharded_patch_sweep

        kwargs = dict(batch_size=batch_size, memory_budget=memory_budget, progress=progress)
        return sharded_patch_sweep(patch_sweep, model, pairs, target, **kwargs)
    width = pairs.clean.input_ids.shape[1]
    result, cells, flat, valid = empty_result(model, pairs, target, "exact")
    rows_budget = batch_size or rows_per_chunk(model, width, memory_budget)
    patched = result.patched.view(len(pairs), -1)
    rows_per_pair = valid.sum(1)
    desc = f"patching {target.name} ({len(pairs)} pairs)"
    with progress_bar(int(rows_per_pair.sum()), progress, desc, "cell") as bar:
        for group in cached_groups(model, pairs, target, rows_per_pair, rows_budget):
            result.clean[group.index] = group.clean_scores
            result.corrupted[group.index] = group.corrupted_scores
            pair_rows, cell_rows = valid[group.index].nonzero(as_tuple=True)
            scores = score_cells(
                model, group, target, cells, pair_rows, cell_rows, rows_budget, bar.update
            )
            patched[group.index[pair_rows], flat[cell_rows]] = scores
    return result


__all__ = [
    "DEFAULT_MEMORY_BUDGET",
    "PROGRESS_MIN_CELLS",
    "CachedGroup",
    "cached_groups",
    "group_slices",
    "start_names",
    "patch_sweep",
    "rows_per_chunk",
    "batch_rows",
    "run_from_layers",
    "score_cells",
]
