"""Activation patching: copy one cell of the clean run into the corrupted run, re-score.

A **target** names what is patched and its grid of cells: the residual stream / attention output /
MLP output per layer x position or x part, head outputs (``hook_z``) per layer x head (all
positions, per position, per part), a head's attention pattern per query position, FFN neurons,
the pooled output. For pair ``i`` and cell ``c`` the patched score is::

    s_patch[i, c] = f(corrupted_i | a_c <- a_c(clean_i))

Two implementations compute it:

* :func:`patch_sweep` (fast): pairs are grouped; per group one cached forward of the clean inputs
  and one of the corrupted inputs; then the batch is *expanded*, one row per (pair, cell), and
  chunked to a memory budget. A cell at layer ``l`` cannot change anything before layer ``l``,
  so its row starts from the cached corrupted ``resid_pre`` of layer ``l`` and only runs layers
  ``l..L-1`` (rows join the batch at their layer); rows patched before the last layer compute
  only its [CLS] position, the one the pooler reads. The patches themselves are hooks.
* :func:`patch_sweep_reference` (oracle): one full forward per (pair, cell) with the plain hook
  factories below (:func:`resid_patch_hooks`, :func:`head_patch_hooks`, ...).

Both agree to float32 rounding (tests check 1e-5).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from mechir.model import HookedCrossEncoder, Hooks
from mechir.parts import PARTS, PartLike, parse_parts
from mechir.selection import HeadLike, check_heads, check_layers, neuron_mask
from patching.perturbations import AlignedPairs
from patching.results import DEFAULT_MIN_DELTA, PatchingResult, patching_metric

Component = Literal["resid_pre", "attn_out", "mlp_out"]
COMPONENTS: tuple[str, ...] = ("resid_pre", "attn_out", "mlp_out")
#: Part labels used as coordinates of ``part`` dimensions.
PART_LABELS: list[str] = [p.name.lower() for p in PARTS]
#: Default memory budget of one expanded chunk (bytes, rough estimate; see :func:`rows_per_chunk`).
DEFAULT_MEMORY_BUDGET = 2**30

Positions = int | Sequence[int] | Bool[Tensor, " pos"] | None
CleanCache = Mapping[str, Tensor]


# ====================================================================== hook factories (reference)
def _positions_mask(positions: Positions, width: int, device: torch.device) -> Bool[Tensor, " pos"]:
    if positions is None:
        return torch.ones(width, dtype=torch.bool, device=device)
    if isinstance(positions, Tensor) and positions.dtype == torch.bool:
        return positions.reshape(-1).to(device)
    idx = torch.as_tensor([positions] if isinstance(positions, int) else list(positions))
    if idx.numel() and (idx.min() < 0 or idx.max() >= width):
        raise ValueError(f"position out of range: the input has {width} positions (0-{width - 1})")
    mask = torch.zeros(width, dtype=torch.bool, device=device)
    mask[idx.to(device)] = True
    return mask


def _where_hook(clean: Tensor, mask: Tensor, act: Tensor, hook: Any) -> Tensor:
    return torch.where(mask, clean.to(act.device, act.dtype), act)


def resid_patch_hooks(
    clean_cache: CleanCache, component: Component, layer: int, positions: Positions = None
) -> Hooks:
    """Patch ``blocks.{layer}.hook_{component}`` ``[batch, pos, d_model]`` at ``positions``."""
    if component not in COMPONENTS:
        raise ValueError(f"unknown component {component!r}: choose one of {COMPONENTS}")
    name = f"blocks.{layer}.hook_{component}"
    clean = clean_cache[name]
    mask = _positions_mask(positions, clean.shape[1], clean.device)[None, :, None]
    return [(name, partial(_where_hook, clean, mask))]


def head_patch_hooks(
    clean_cache: CleanCache, layer: int, head: int, positions: Positions = None
) -> Hooks:
    """Patch head ``layer/head``'s output ``hook_z`` ``[batch, pos, head, d_head]`` at positions."""
    name = f"blocks.{layer}.attn.hook_z"
    clean = clean_cache[name]
    pos = _positions_mask(positions, clean.shape[1], clean.device)
    heads = torch.arange(clean.shape[2], device=clean.device) == head
    mask = (pos[:, None] & heads[None, :])[None, :, :, None]
    return [(name, partial(_where_hook, clean, mask))]


def pattern_patch_hooks(
    clean_cache: CleanCache, layer: int, head: int, query_positions: Positions = None
) -> Hooks:
    """Patch rows of head ``layer/head``'s attention pattern ``[batch, head, query, key]``."""
    name = f"blocks.{layer}.attn.hook_pattern"
    clean = clean_cache[name]
    rows = _positions_mask(query_positions, clean.shape[2], clean.device)
    heads = torch.arange(clean.shape[1], device=clean.device) == head
    mask = (heads[:, None] & rows[None, :])[None, :, :, None]
    return [(name, partial(_where_hook, clean, mask))]


def neuron_patch_hooks(
    clean_cache: CleanCache, layer: int, neurons: Sequence[int] | int, positions: Positions = None
) -> Hooks:
    """Patch FFN neurons (``mlp.hook_post`` ``[batch, pos, d_mlp]``) of a layer at positions."""
    name = f"blocks.{layer}.mlp.hook_post"
    clean = clean_cache[name]
    pos = _positions_mask(positions, clean.shape[1], clean.device)
    which = _positions_mask(neurons, clean.shape[2], clean.device)
    mask = (pos[:, None] & which[None, :])[None]
    return [(name, partial(_where_hook, clean, mask))]


def pooled_patch_hooks(clean_cache: CleanCache, dims: Sequence[int] | int | None = None) -> Hooks:
    """Patch the pooled output ``pooler.hook_pooler_out`` ``[batch, d_model]`` (dims or all)."""
    name = "pooler.hook_pooler_out"
    clean = clean_cache[name]
    mask = _positions_mask(dims, clean.shape[1], clean.device)[None]
    return [(name, partial(_where_hook, clean, mask))]


# ====================================================================== targets
class PatchTarget(ABC):
    """What to patch. One hook per layer, and per layer a grid of cells (``sub_dims``).

    The full result grid is ``("layer", *sub_dims)`` over all model layers (unselected cells are
    NaN), or just ``sub_dims`` for the pooled output.
    """

    name: str
    has_layer_dim: ClassVar[bool] = True

    @abstractmethod
    def hook_name(self, layer: int) -> str:
        """The hook patched at ``layer``."""

    @abstractmethod
    def layers(self, model: HookedCrossEncoder) -> list[int]:
        """Layers with selected cells (``n_layers`` for the pooled output)."""

    @abstractmethod
    def sub_grid(self, model: HookedCrossEncoder, width: int) -> list[tuple[str, list[Any]]]:
        """Per-layer dimensions and their labels."""

    def selected(self, model: HookedCrossEncoder, layer: int, sub: np.ndarray) -> np.ndarray:
        """Which per-layer cells (rows of ``sub``) are selected; all by default."""
        return np.ones(len(sub), dtype=bool)

    @property
    def position_column(self) -> int | None:
        """Sub-grid index of a position dimension (cells past a pair's length are skipped)."""
        return None

    @abstractmethod
    def row_mask(
        self, sub: Int[Tensor, "rows n_sub"], parts: Int[Tensor, "rows pos"], act: Tensor
    ) -> Bool[Tensor, "rows ..."]:
        """For rows each patching one cell: the mask of patched values (broadcasts to ``act``)."""

    @abstractmethod
    def reduce(self, prod: Tensor, parts: Int[Tensor, "batch pos"]) -> Tensor:
        """Sum an elementwise ``[batch, *act]`` tensor over each cell: ``[batch, *sub_sizes]``."""

    @abstractmethod
    def reference_hooks(
        self, layer: int, sub: tuple[int, ...], clean_cache: CleanCache, parts: Int[Tensor, " pos"]
    ) -> Hooks:
        """Hooks patching one cell of one pair, from the plain factories (the oracle)."""

    # ------------------------------------------------------------ derived
    def grid(self, model: HookedCrossEncoder, width: int) -> tuple[tuple[str, ...], dict]:
        sub = self.sub_grid(model, width)
        dims = (("layer",) if self.has_layer_dim else ()) + tuple(d for d, _ in sub)
        coords = {"layer": list(range(model.cfg.n_layers))} if self.has_layer_dim else {}
        coords.update({d: list(labels) for d, labels in sub})
        return dims, coords

    def cells(self, model: HookedCrossEncoder, width: int) -> Int[Tensor, "cells 1+n_sub"]:
        """Selected cells as rows ``(layer, *sub)``."""
        sizes = [len(labels) for _, labels in self.sub_grid(model, width)]
        if sizes:
            mesh = np.meshgrid(*[np.arange(s) for s in sizes], indexing="ij")
            sub = np.stack(mesh, -1).reshape(-1, len(sizes))
        else:
            sub = np.zeros((1, 0), dtype=np.int64)
        out = []
        for layer in self.layers(model):
            keep = sub[self.selected(model, layer, sub)]
            out.append(np.concatenate([np.full((len(keep), 1), layer), keep], 1))
        return torch.as_tensor(np.concatenate(out).astype(np.int64))

    def flat_index(self, model: HookedCrossEncoder, cells: Tensor, width: int) -> Tensor:
        dims, coords = self.grid(model, width)
        shape = tuple(len(coords[d]) for d in dims)
        idx = cells.numpy() if self.has_layer_dim else cells[:, 1:].numpy()
        if not shape:
            return torch.zeros(len(cells), dtype=torch.long)
        return torch.as_tensor(np.ravel_multi_index(tuple(idx.T), shape))

    def valid(self, cells: Tensor, lengths: Tensor) -> Bool[Tensor, "pair cells"]:
        col = self.position_column
        if col is None:
            return torch.ones(len(lengths), len(cells), dtype=torch.bool)
        return cells[None, :, 1 + col] < lengths.cpu()[:, None]

    def hook_names(self, model: HookedCrossEncoder) -> list[str]:
        return [self.hook_name(layer) for layer in self.layers(model)]


def _check_by(by: str, allowed: tuple[str, ...]) -> None:
    if by not in allowed:
        raise ValueError(f"unknown granularity by={by!r}: choose one of {allowed}")


def _part_onehot(parts: Int[Tensor, "batch pos"], dtype: torch.dtype) -> Tensor:
    """``[batch, 5, pos]`` one-hot of the five real parts."""
    ids = torch.tensor([int(p) for p in PARTS], device=parts.device)
    return (parts[:, None, :] == ids[None, :, None]).to(dtype)


@dataclass(frozen=True)
class ResidTarget(PatchTarget):
    """Residual stream (``resid_pre``), attention output or MLP output of layers.

    ``by="position"``: one cell per (layer, position); ``"part"``: per (layer, part), all tokens of
    the part at once; ``"all"``: per layer, every position.
    """

    component: Component = "resid_pre"
    by: Literal["all", "position", "part"] = "position"
    layer_selection: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.component not in COMPONENTS:
            raise ValueError(f"unknown component {self.component!r}: choose one of {COMPONENTS}")
        _check_by(self.by, ("all", "position", "part"))

    @property
    def name(self) -> str:  # type: ignore[override]
        return f"{self.component}/{self.by}"

    def hook_name(self, layer: int) -> str:
        return f"blocks.{layer}.hook_{self.component}"

    def layers(self, model: HookedCrossEncoder) -> list[int]:
        return check_layers(model, self.layer_selection)

    def sub_grid(self, model: HookedCrossEncoder, width: int) -> list[tuple[str, list[Any]]]:
        return {
            "all": [],
            "position": [("position", list(range(width)))],
            "part": [("part", PART_LABELS)],
        }[self.by]

    @property
    def position_column(self) -> int | None:
        return 0 if self.by == "position" else None

    def _pos_mask(self, sub: Tensor, parts: Tensor) -> Tensor:
        if self.by == "all":
            return torch.ones_like(parts, dtype=torch.bool)
        if self.by == "position":
            return torch.arange(parts.shape[1], device=parts.device)[None] == sub[:, :1]
        part_ids = torch.tensor([int(p) for p in PARTS], device=parts.device)[sub[:, 0]]
        return parts == part_ids[:, None]

    def row_mask(self, sub: Tensor, parts: Tensor, act: Tensor) -> Tensor:
        return self._pos_mask(sub, parts)[:, :, None]

    def reduce(self, prod: Tensor, parts: Tensor) -> Tensor:
        per_pos = prod.sum(-1)
        if self.by == "all":
            return per_pos.sum(-1)
        if self.by == "position":
            return per_pos
        return torch.einsum("bw,bpw->bp", per_pos, _part_onehot(parts, per_pos.dtype))

    def reference_hooks(
        self, layer: int, sub: tuple[int, ...], clean_cache: CleanCache, parts: Tensor
    ) -> Hooks:
        positions: Positions = None
        if self.by == "position":
            positions = sub[0]
        elif self.by == "part":
            positions = parts == int(PARTS[sub[0]])
        return resid_patch_hooks(clean_cache, self.component, layer, positions)


def _heads_tuple(heads: Iterable[HeadLike] | None) -> tuple[HeadLike, ...] | None:
    return None if heads is None else tuple(heads)


class _HeadSelection:
    """Cells of the selected heads only (``heads``: labels or pairs; None = every head)."""

    heads: tuple[HeadLike, ...] | None

    def _heads(self, model: HookedCrossEncoder) -> list[tuple[int, int]]:
        if self.heads is None:
            return [(lay, h) for lay in range(model.cfg.n_layers) for h in range(model.cfg.n_heads)]
        return check_heads(model, self.heads)

    def layers(self, model: HookedCrossEncoder) -> list[int]:
        return sorted({lay for lay, _ in self._heads(model)})

    def selected(self, model: HookedCrossEncoder, layer: int, sub: np.ndarray) -> np.ndarray:
        chosen = [h for lay, h in self._heads(model) if lay == layer]
        return np.isin(sub[:, 0], chosen)


@dataclass(frozen=True)
class HeadTarget(_HeadSelection, PatchTarget):
    """Head outputs ``hook_z`` (before ``W_O``).

    ``by="all"``: one cell per (layer, head), every position; ``"position"``: per (layer, head,
    position); ``"part"``: per (layer, head, part). ``heads`` restricts the heads (``"l/h"`` labels
    or ``(l, h)`` pairs; default all).
    """

    by: Literal["all", "position", "part"] = "all"
    heads: tuple[HeadLike, ...] | None = None

    def __post_init__(self) -> None:
        _check_by(self.by, ("all", "position", "part"))
        object.__setattr__(self, "heads", _heads_tuple(self.heads))

    @property
    def name(self) -> str:  # type: ignore[override]
        return f"z/{self.by}"

    def hook_name(self, layer: int) -> str:
        return f"blocks.{layer}.attn.hook_z"

    def sub_grid(self, model: HookedCrossEncoder, width: int) -> list[tuple[str, list[Any]]]:
        grid: list[tuple[str, list[Any]]] = [("head", list(range(model.cfg.n_heads)))]
        if self.by == "position":
            grid.append(("position", list(range(width))))
        elif self.by == "part":
            grid.append(("part", PART_LABELS))
        return grid

    @property
    def position_column(self) -> int | None:
        return 1 if self.by == "position" else None

    def row_mask(self, sub: Tensor, parts: Tensor, act: Tensor) -> Tensor:
        heads = torch.arange(act.shape[2], device=act.device)[None] == sub[:, :1]  # [rows, H]
        if self.by == "all":
            return heads[:, None, :, None]
        pos = ResidTarget(by=self.by)._pos_mask(sub[:, 1:], parts)  # [rows, pos]
        return (pos[:, :, None] & heads[:, None, :])[..., None]

    def reduce(self, prod: Tensor, parts: Tensor) -> Tensor:
        per = prod.sum(-1)  # [b, pos, H]
        if self.by == "all":
            return per.sum(1)
        if self.by == "position":
            return per.transpose(1, 2)
        return torch.einsum("bwh,bpw->bhp", per, _part_onehot(parts, per.dtype))

    def reference_hooks(
        self, layer: int, sub: tuple[int, ...], clean_cache: CleanCache, parts: Tensor
    ) -> Hooks:
        positions: Positions = None
        if self.by == "position":
            positions = sub[1]
        elif self.by == "part":
            positions = parts == int(PARTS[sub[1]])
        return head_patch_hooks(clean_cache, layer, sub[0], positions)


@dataclass(frozen=True)
class PatternTarget(_HeadSelection, PatchTarget):
    """A head's attention pattern, one cell per (layer, head, query position): the whole row of
    attention weights of that query position is patched."""

    heads: tuple[HeadLike, ...] | None = None
    name: ClassVar[str] = "pattern/query_position"

    def __post_init__(self) -> None:
        object.__setattr__(self, "heads", _heads_tuple(self.heads))

    def hook_name(self, layer: int) -> str:
        return f"blocks.{layer}.attn.hook_pattern"

    def sub_grid(self, model: HookedCrossEncoder, width: int) -> list[tuple[str, list[Any]]]:
        return [("head", list(range(model.cfg.n_heads))), ("position", list(range(width)))]

    @property
    def position_column(self) -> int | None:
        return 1

    def row_mask(self, sub: Tensor, parts: Tensor, act: Tensor) -> Tensor:
        heads = torch.arange(act.shape[1], device=act.device)[None] == sub[:, :1]
        rows = torch.arange(act.shape[2], device=act.device)[None] == sub[:, 1:2]
        return (heads[:, :, None] & rows[:, None, :])[..., None]

    def reduce(self, prod: Tensor, parts: Tensor) -> Tensor:
        return prod.sum(-1)  # [b, H, query]

    def reference_hooks(
        self, layer: int, sub: tuple[int, ...], clean_cache: CleanCache, parts: Tensor
    ) -> Hooks:
        return pattern_patch_hooks(clean_cache, layer, sub[0], sub[1])


@dataclass(frozen=True)
class NeuronTarget(PatchTarget):
    """FFN neurons (``mlp.hook_post``), one cell per (layer, neuron), patched at every position
    or only at the tokens of ``parts``. ``neurons``: ``{layer: indices}`` or a ``[n_layers, d_mlp]``
    bool mask (default: all neurons)."""

    neurons: Any = None
    parts: tuple[PartLike, ...] | None = None
    name: ClassVar[str] = "neuron"

    def _mask(self, model: HookedCrossEncoder) -> Tensor:
        if self.neurons is None:
            return torch.ones(model.cfg.n_layers, model.cfg.d_mlp, dtype=torch.bool)
        return neuron_mask(model, self.neurons)

    def hook_name(self, layer: int) -> str:
        return f"blocks.{layer}.mlp.hook_post"

    def layers(self, model: HookedCrossEncoder) -> list[int]:
        return self._mask(model).any(-1).nonzero()[:, 0].tolist()

    def sub_grid(self, model: HookedCrossEncoder, width: int) -> list[tuple[str, list[Any]]]:
        return [("neuron", list(range(model.cfg.d_mlp)))]

    def selected(self, model: HookedCrossEncoder, layer: int, sub: np.ndarray) -> np.ndarray:
        return self._mask(model)[layer].numpy()[sub[:, 0]]

    def _pos(self, parts: Tensor) -> Tensor:
        if self.parts is None:
            return torch.ones_like(parts, dtype=torch.bool)
        ids = torch.tensor([int(p) for p in parse_parts(self.parts)], device=parts.device)
        return torch.isin(parts, ids)

    def row_mask(self, sub: Tensor, parts: Tensor, act: Tensor) -> Tensor:
        which = torch.arange(act.shape[2], device=act.device)[None] == sub[:, :1]
        return self._pos(parts)[:, :, None] & which[:, None, :]

    def reduce(self, prod: Tensor, parts: Tensor) -> Tensor:
        return (prod * self._pos(parts)[:, :, None]).sum(1)

    def reference_hooks(
        self, layer: int, sub: tuple[int, ...], clean_cache: CleanCache, parts: Tensor
    ) -> Hooks:
        positions = None if self.parts is None else self._pos(parts[None])[0]
        return neuron_patch_hooks(clean_cache, layer, sub[0], positions)


@dataclass(frozen=True)
class PooledTarget(PatchTarget):
    """The pooled output ``pooler.hook_pooler_out``: one cell (``by="all"``) or one per
    dimension (``"dimension"``)."""

    by: Literal["all", "dimension"] = "all"
    has_layer_dim: ClassVar[bool] = False

    def __post_init__(self) -> None:
        _check_by(self.by, ("all", "dimension"))

    @property
    def name(self) -> str:  # type: ignore[override]
        return f"pooled/{self.by}"

    def hook_name(self, layer: int) -> str:
        return "pooler.hook_pooler_out"

    def layers(self, model: HookedCrossEncoder) -> list[int]:
        return [model.cfg.n_layers]

    def sub_grid(self, model: HookedCrossEncoder, width: int) -> list[tuple[str, list[Any]]]:
        return [] if self.by == "all" else [("dimension", list(range(model.cfg.d_model)))]

    def row_mask(self, sub: Tensor, parts: Tensor, act: Tensor) -> Tensor:
        if self.by == "all":
            return torch.ones(len(sub), 1, dtype=torch.bool, device=act.device)
        return torch.arange(act.shape[1], device=act.device)[None] == sub[:, :1]

    def reduce(self, prod: Tensor, parts: Tensor) -> Tensor:
        return prod.sum(-1) if self.by == "all" else prod

    def reference_hooks(
        self, layer: int, sub: tuple[int, ...], clean_cache: CleanCache, parts: Tensor
    ) -> Hooks:
        return pooled_patch_hooks(clean_cache, None if self.by == "all" else sub[0])


# ---------------------------------------------------------------------- constructors
def resid_target(
    component: Component = "resid_pre",
    *,
    by: Literal["all", "position", "part"] = "position",
    layers: int | Iterable[int] | None = None,
) -> ResidTarget:
    """Residual stream / attention output / MLP output per layer x position (or part, or all)."""
    sel = None if layers is None else tuple([layers] if isinstance(layers, int) else layers)
    return ResidTarget(component, by, sel)


def head_target(
    *, by: Literal["all", "position", "part"] = "all", heads: Iterable[HeadLike] | None = None
) -> HeadTarget:
    """Head outputs per layer x head (all positions), x position, or x part."""
    return HeadTarget(by, _heads_tuple(heads))


def pattern_target(*, heads: Iterable[HeadLike] | None = None) -> PatternTarget:
    """Attention patterns of heads, per query position."""
    return PatternTarget(_heads_tuple(heads))


def neuron_target(
    neurons: Mapping[int, Iterable[int]] | Tensor | None = None,
    *,
    parts: PartLike | Iterable[PartLike] | None = None,
) -> NeuronTarget:
    """Individual FFN neurons (all, or ``{layer: indices}``), at all positions or some parts."""
    return NeuronTarget(neurons, None if parts is None else parse_parts(parts))


def pooled_target(*, by: Literal["all", "dimension"] = "all") -> PooledTarget:
    """The pooled [CLS] output, whole or per dimension."""
    return PooledTarget(by)


# ====================================================================== batched sweep
def rows_per_chunk(
    model: HookedCrossEncoder, width: int, memory_budget: float = DEFAULT_MEMORY_BUDGET
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


@dataclass
class _Group:
    """Cached clean and corrupted activations of a few pairs."""

    pairs: AlignedPairs
    index: Tensor  # positions of these pairs in the full set
    clean_scores: Tensor
    corrupted_scores: Tensor
    clean: dict[str, Tensor]
    corrupted: dict[str, Tensor]


def _groups(
    model: HookedCrossEncoder,
    pairs: AlignedPairs,
    rows_per_pair: Tensor,
    budget_rows: int,
    clean_names: list[str],
    corrupted_names: list[str],
) -> Iterator[_Group]:
    """Consecutive pairs whose rows fit ``budget_rows`` (at least one pair), with their caches."""
    start, n = 0, len(pairs)
    while start < n:
        stop, total = start + 1, int(rows_per_pair[start])
        while stop < n and total + int(rows_per_pair[stop]) <= budget_rows:
            total += int(rows_per_pair[stop])
            stop += 1
        group = pairs[start:stop]
        with torch.no_grad():
            clean_scores, clean = model.run_with_cache(
                group.clean, names_filter=lambda name: name in clean_names
            )
            corrupted_scores, corrupted = model.run_with_cache(
                group.corrupted, names_filter=lambda name: name in corrupted_names
            )
        yield _Group(
            group,
            torch.arange(start, stop),
            clean_scores.float().cpu(),
            corrupted_scores.float().cpu(),
            dict(clean.cache_dict),
            dict(corrupted.cache_dict),
        )
        start = stop


def _row_patch_hook(first: int, mask: Tensor, source: Tensor, act: Tensor, hook: Any) -> Tensor:
    """Patch rows ``first:first+len(mask)`` of an activation where ``mask``, from ``source``."""
    last = first + len(mask)
    patched = torch.where(mask, source.to(act.dtype), act[first:last])
    return torch.cat([act[:first], patched, act[last:]])


def run_from_layers(
    model: HookedCrossEncoder,
    starts: Int[Tensor, " rows"],
    initial: Callable[[int, Tensor], Float[Tensor, "k pos d_model"]],
    attention_mask: Int[Tensor, "rows pos"],
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
    every block run.

    With ``cls_only_last_layer``, the last block computes only the [CLS] position, the only one the
    pooler reads (keys and values still come from every position): about a layer less per row.
    The caller must not have hooks on the last block that expect every position; hooks that
    anyone else registered there make it fall back to the full block.

    Returns:
        ``[rows]`` scores, or with ``stop_layer`` the ``[rows, pos, d_model]`` input of block
        ``stop_layer`` (blocks from it on are not run; rows must start at or before it).
    """
    n_layers = model.cfg.n_layers
    stop = n_layers if stop_layer is None else stop_layer
    device = model.cfg.device
    starts = starts.cpu()
    if len(starts) > 1 and (starts[1:] < starts[:-1]).any():
        raise ValueError("rows must be sorted by start layer")
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


def _final_name(model: HookedCrossEncoder) -> str:
    return f"blocks.{model.cfg.n_layers - 1}.hook_normalized_resid_post"


def _initial_from_cache(
    model: HookedCrossEncoder, corrupted: Mapping[str, Tensor], pair_rows: Tensor
) -> Callable[[int, Tensor], Tensor]:
    def initial(layer: int, rows: Tensor) -> Tensor:
        name = (
            _final_name(model) if layer == model.cfg.n_layers else f"blocks.{layer}.hook_resid_pre"
        )
        return corrupted[name][pair_rows[rows].to(corrupted[name].device)]

    return initial


def _start_names(model: HookedCrossEncoder, layers: Iterable[int]) -> list[str]:
    n = model.cfg.n_layers
    return [_final_name(model) if lay == n else f"blocks.{lay}.hook_resid_pre" for lay in layers]


def patch_sweep(
    model: HookedCrossEncoder,
    pairs: AlignedPairs,
    target: PatchTarget,
    *,
    batch_size: int | None = None,
    memory_budget: float = DEFAULT_MEMORY_BUDGET,
    progress: bool = False,
) -> PatchingResult:
    """Patched scores of every (pair, cell) of ``target``, many cells per forward pass.

    Args:
        pairs: aligned clean/corrupted inputs (see :mod:`patching.perturbations`).
        target: what to patch (:func:`resid_target`, :func:`head_target`, ...).
        batch_size: rows (one per patched cell) per forward pass; default from ``memory_budget``.
        memory_budget: bytes for one expanded forward pass (rough; see :func:`rows_per_chunk`).

    Returns:
        A :class:`PatchingResult` (``method="exact"``); its :meth:`~PatchingResult.metric` is
        ``(patched - corrupted) / (clean - corrupted)``.
    """
    width = pairs.clean.input_ids.shape[1]
    dims, coords = target.grid(model, width)
    cells = target.cells(model, width)
    flat = target.flat_index(model, cells, width)
    valid = target.valid(cells, pairs.lengths)
    if batch_size is not None and batch_size < 1:
        raise ValueError(
            f"batch_size must be >= 1 (or None for the memory budget), got {batch_size}"
        )
    rows_budget = batch_size or rows_per_chunk(model, width, memory_budget)
    grid_size = int(np.prod([len(coords[d]) for d in dims])) if dims else 1
    patched = torch.full((len(pairs), grid_size), float("nan"))
    clean_scores = torch.empty(len(pairs))
    corrupted_scores = torch.empty(len(pairs))
    target_layers = sorted({int(x) for x in cells[:, 0]})
    clean_names = [target.hook_name(lay) for lay in target_layers]
    groups = _groups(
        model, pairs, valid.sum(1), rows_budget, clean_names, _start_names(model, target_layers)
    )
    if progress:
        from tqdm.auto import tqdm

        groups = tqdm(groups, desc=f"patching {target.name}", unit="group")
    for group in groups:
        clean_scores[group.index] = group.clean_scores
        corrupted_scores[group.index] = group.corrupted_scores
        g_valid = valid[group.index]
        pair_of_row, cell_of_row = g_valid.nonzero(as_tuple=True)
        order = torch.argsort(cells[cell_of_row, 0], stable=True)  # by start layer
        pair_of_row, cell_of_row = pair_of_row[order], cell_of_row[order]
        for lo in range(0, len(pair_of_row), rows_budget):
            p_rows = pair_of_row[lo : lo + rows_budget]
            c_rows = cell_of_row[lo : lo + rows_budget]
            # rows patched before the last layer need only its [CLS] position
            early = cells[c_rows, 0] < model.cfg.n_layers - 1
            for part, cls_only in ((early, True), (~early, False)):
                if not part.any():
                    continue
                with torch.no_grad():
                    scores = _score_rows(
                        model, group, target, cells, p_rows[part], c_rows[part], cls_only
                    )
                patched[group.index[p_rows[part]], flat[c_rows[part]]] = scores.float().cpu()
    return PatchingResult(
        target=target.name,
        dims=dims,
        coords=coords,
        patched=patched.reshape(len(pairs), *[len(coords[d]) for d in dims]),
        clean=clean_scores,
        corrupted=corrupted_scores,
        pair_ids=list(pairs.pair_ids),
        grades=list(pairs.grades),
        method="exact",
    )


def _score_rows(
    model: HookedCrossEncoder,
    group: _Group,
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
    initial = _initial_from_cache(model, group.corrupted, pair_rows)
    attention_mask = group.pairs.corrupted.attention_mask[pair_rows]
    with model.hooks(fwd_hooks=hooks):
        return run_from_layers(
            model, layer_of_row, initial, attention_mask, cls_only_last_layer=cls_only
        )


# ====================================================================== reference
def patch_sweep_reference(
    model: HookedCrossEncoder, pairs: AlignedPairs, target: PatchTarget
) -> PatchingResult:
    """The oracle of :func:`patch_sweep`: one full forward per (pair, cell), plain hooks."""
    width = pairs.clean.input_ids.shape[1]
    dims, coords = target.grid(model, width)
    cells = target.cells(model, width)
    flat = target.flat_index(model, cells, width)
    valid = target.valid(cells, pairs.lengths)
    grid_size = int(np.prod([len(coords[d]) for d in dims])) if dims else 1
    patched = torch.full((len(pairs), grid_size), float("nan"))
    clean_scores = torch.empty(len(pairs))
    corrupted_scores = torch.empty(len(pairs))
    names = target.hook_names(model)
    with torch.no_grad():
        for i in range(len(pairs)):
            pair = pairs[i]
            clean_score, cache = model.run_with_cache(
                pair.clean, names_filter=lambda name: name in names
            )
            clean_scores[i] = clean_score.float().cpu()[0]
            corrupted_scores[i] = model(pair.corrupted).float().cpu()[0]
            for c in valid[i].nonzero()[:, 0].tolist():
                layer, *sub = cells[c].tolist()
                hooks = target.reference_hooks(layer, tuple(sub), cache, pair.clean.parts[0])
                score = model.run_with_hooks(pair.corrupted, fwd_hooks=hooks)
                patched[i, flat[c]] = score.float().cpu()[0]
    return PatchingResult(
        target=target.name,
        dims=dims,
        coords=coords,
        patched=patched.reshape(len(pairs), *[len(coords[d]) for d in dims]),
        clean=clean_scores,
        corrupted=corrupted_scores,
        pair_ids=list(pairs.pair_ids),
        grades=list(pairs.grades),
        method="exact",
    )


__all__ = [
    "COMPONENTS",
    "DEFAULT_MEMORY_BUDGET",
    "DEFAULT_MIN_DELTA",
    "PART_LABELS",
    "HeadTarget",
    "NeuronTarget",
    "PatchTarget",
    "PatternTarget",
    "PooledTarget",
    "ResidTarget",
    "head_patch_hooks",
    "head_target",
    "neuron_patch_hooks",
    "neuron_target",
    "patch_sweep",
    "patch_sweep_reference",
    "patching_metric",
    "pattern_patch_hooks",
    "pattern_target",
    "pooled_patch_hooks",
    "pooled_target",
    "resid_patch_hooks",
    "resid_target",
    "rows_per_chunk",
    "run_from_layers",
]
