"""A patching sweep split across the ranks of a process group (:mod:`mechir.distributed`).

Each rank sweeps its strided share of the pairs; the ``[pair, *grid]`` patched scores and the
clean/corrupted scores are gathered back in pair order, so every rank returns the result a single
process would. A share is padded to its own longest pair, so grids indexed by position are
NaN-padded to the full width (cells past a pair's length are NaN in a single-process sweep too).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from mechir import distributed
from mechir.interface import HookedReranker
from patching.results import PatchingResult


def sharded_patch_sweep(
    sweep: Callable[..., PatchingResult],
    model: HookedReranker,
    pairs: Any,
    target: Any,
    **kwargs: Any,
) -> PatchingResult:
    """``sweep(model, pairs, target, **kwargs)`` with the pairs sharded across ranks."""
    width = pairs.clean.input_ids.shape[1]
    dims, coords = target.grid(model, width)
    grid = tuple(len(coords[d]) for d in dims)
    mine = distributed.shard_indices(len(pairs))
    rows = None
    if mine:
        with distributed.local():
            part = sweep(model, pairs[mine], target, **kwargs)
        patched = torch.full((len(mine), *grid), float("nan"))
        patched[(slice(None), *[slice(0, s) for s in part.patched.shape[1:]])] = part.patched
        rows = torch.cat(
            [patched.reshape(len(mine), -1), part.clean[:, None], part.corrupted[:, None]], 1
        )
    gathered = distributed.gather_in_order(rows, len(pairs))
    return PatchingResult(
        target=target.name,
        dims=dims,
        coords=coords,
        patched=gathered[:, :-2].reshape(len(pairs), *grid),
        clean=gathered[:, -2].contiguous(),
        corrupted=gathered[:, -1].contiguous(),
        pair_ids=list(pairs.pair_ids),
        grades=list(pairs.grades),
        method="exact",
    )
