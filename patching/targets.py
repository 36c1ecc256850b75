"""Patch targets: what is patched, described as data.

A target is a site (:mod:`mechir.hooks.site`: the hook name ``blocks.{layer}.attn.hook_z`` and the
axes of its activation after the batch axis, e.g. ``("position", "head", "d_head")``), and the
cell dimensions: which of
those axes is indexed one entry per cell (``"head"``), or ``"part"`` (the tokens of one part of
the input, CLS | query | SEP | document | SEP, read from the batch the hook runs on). Axes that no
cell dimension names are patched whole. Cell ``c = (layer, i_1, ..., i_m)`` patches::

    a[b, ...] <- a_clean[b, ...]   where   AND_j  (index on axis of dim j == i_j)

Every consumer (the batched sweep, the per-cell reference, attribution patching, guided top-k
patching) derives its masks and reductions from this description; adding a target is one call
of :class:`PatchTarget` (see :func:`head_target` ... :func:`qk_target`).

This module also keeps plain hook factories (:func:`resid_patch_hooks`, :func:`head_patch_hooks`,
...) for patching one cell by hand from a clean cache: each is the patch intervention of
:func:`mechir.hooks.patch_hooks` on one site, which checks that the cache holds the examples it
runs on.
"""

from __future__ import annotations

import string
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import numpy as np
import torch
from jaxtyping import Bool, Int
from torch import Tensor
from transformer_lens import ActivationCache

from mechir.hooks.patch import ActivationSource, as_source, patch_hooks
from mechir.hooks.site import KV_SITES, SITES, PartSelection, Positions, Site
from mechir.interface import HookedReranker
from mechir.parts import PARTS, PartLike, parse_parts
from mechir.running import Hooks
from mechir.selection import HeadSelection, select_heads, select_layers, select_neurons

Component = Literal["resid_pre", "attn_out", "mlp_out"]
COMPONENTS: tuple[str, ...] = ("resid_pre", "attn_out", "mlp_out")
#: Part labels used as coordinates of ``part`` dimensions.
PART_LABELS: list[str] = [p.name.lower() for p in PARTS]
_PART_IDS: list[int] = [int(p) for p in PARTS]

#: Activations by hook name: a dict or TransformerLens's ``ActivationCache`` (not a ``Mapping``).
CleanCache = Mapping[str, Tensor] | ActivationCache


# ====================================================================== plain hook factories
def _model_of(source: CleanCache | ActivationSource) -> HookedReranker:
    model = as_source(source).model
    if model is None:
        raise ValueError("the patching source does not know its model: use activation_source(...)")
    return model


def resid_patch_hooks(
    source: CleanCache | ActivationSource,
    component: Component,
    layer: int,
    positions: Positions = None,
    *,
    parts: PartSelection = None,
) -> Hooks:
    """Patch ``blocks.{layer}.hook_{component}`` ``[batch, pos, d_model]`` at ``positions`` (or the
    tokens of ``parts``) from ``source`` (the cache of ``model.run_with_cache(batch)``): the
    patch intervention of :func:`mechir.hooks.patch_hooks` on that site."""
    if component not in COMPONENTS:
        raise ValueError(f"unknown component {component!r}: choose one of {COMPONENTS}")
    return patch_hooks(
        _model_of(source), source, component, layers=layer, parts=parts, positions=positions
    )


def head_patch_hooks(
    source: CleanCache | ActivationSource,
    layer: int,
    head: int,
    positions: Positions = None,
    *,
    parts: PartSelection = None,
) -> Hooks:
    """Patch head ``layer/head``'s output ``hook_z`` ``[batch, pos, head, d_head]`` at positions."""
    model = _model_of(source)
    return patch_hooks(model, source, "z", units=[(layer, head)], parts=parts, positions=positions)


def pattern_patch_hooks(
    source: CleanCache | ActivationSource,
    layer: int,
    head: int,
    query_positions: Positions = None,
    *,
    parts: PartSelection = None,
) -> Hooks:
    """Patch rows of head ``layer/head``'s attention pattern ``[batch, head, query, key]``."""
    model = _model_of(source)
    return patch_hooks(
        model, source, "pattern", units=[(layer, head)], parts=parts, positions=query_positions
    )


def neuron_patch_hooks(
    source: CleanCache | ActivationSource,
    layer: int,
    neurons: Sequence[int] | int,
    positions: Positions = None,
    *,
    parts: PartSelection = None,
) -> Hooks:
    """Patch FFN neurons (``mlp.hook_post`` ``[batch, pos, d_mlp]``) of a layer at positions."""
    which = [neurons] if isinstance(neurons, int) else list(neurons)
    return patch_hooks(
        _model_of(source), source, "neuron", units={layer: which}, parts=parts,
        positions=positions,
    )  # fmt: skip


def pooled_patch_hooks(
    source: CleanCache | ActivationSource, dims: Sequence[int] | int | None = None
) -> Hooks:
    """Patch the pooled output ``pooler.hook_pooler_out`` ``[batch, d_model]`` (dims or all)."""
    return patch_hooks(_model_of(source), source, "pooled", units=dims)


def _where_hook(clean: Tensor, mask: Tensor, act: Tensor, hook: Any) -> Tensor:
    return torch.where(mask, clean.to(act.device, act.dtype), act)


# ====================================================================== the target description
def _axis_size(model: HookedReranker, axis: str, width: int) -> int:
    cfg = model.cfg
    sizes = {
        "position": width,
        "key": width,
        "head": cfg.n_heads,
        "d_head": cfg.d_head,
        "d_model": cfg.d_model,
        "dimension": cfg.d_model,
        "neuron": cfg.d_mlp,
        "part": len(PARTS),
    }
    return sizes[axis]


@dataclass(frozen=True)
class PatchTarget:
    """What to patch, as data (see the module docstring).

    Attributes:
        name: label of the target in results, e.g. ``"z/part"``.
        site: where it patches (:data:`mechir.hooks.SITES`): its ``hook`` (with ``{layer}`` for
            per-layer hooks) and ``axes`` (after the batch axis; ``"position"`` is the token
            axis).
        cells: the cell dimensions: names from ``axes`` (one cell per index) or ``"part"``.
        layers: the layers patched (None = all); ignored for hooks without ``{layer}``.
        select: optional ``model -> Bool[layer, n]`` mask over (layer, first cell dimension),
            e.g. the selected heads or neurons.
        only_parts: part ids; with it, cells patch only the tokens of these parts.
    """

    name: str
    site: Site
    cells: tuple[str, ...] = ()
    layers: tuple[int, ...] | None = None
    select: Callable[[HookedReranker], Tensor] | None = None
    only_parts: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        for dim in self.cells:
            if dim != "part" and dim not in self.axes:
                raise ValueError(f"cell dimension {dim!r} is not an axis of {self.axes} or 'part'")
        if ("part" in self.cells or self.only_parts) and "position" not in self.axes:
            raise ValueError(f"target {self.name!r}: parts need a 'position' axis")

    @property
    def hook(self) -> str:
        return self.site.hook

    @property
    def axes(self) -> tuple[str, ...]:
        return self.site.axes

    # ------------------------------------------------------------ the grid
    @property
    def has_layer_dim(self) -> bool:
        return "{layer}" in self.hook

    def hook_name(self, layer: int) -> str:
        """The hook patched at ``layer``."""
        return self.hook.format(layer=layer)

    def target_layers(self, model: HookedReranker) -> list[int]:
        """Layers with selected cells (``[n_layers]`` for a hook after the last block)."""
        if not self.has_layer_dim:
            return [model.cfg.n_layers]
        layers = select_layers(model, self.layers)
        if self.select is not None:
            keep = self.select(model).reshape(model.cfg.n_layers, -1).any(-1)
            layers = [lay for lay in layers if keep[lay]]
        return layers

    def hook_names(self, model: HookedReranker) -> list[str]:
        names = [self.hook_name(layer) for layer in self.target_layers(model)]
        missing = [n for n in names if n not in model.hook_dict]
        if missing:  # e.g. the pooled [CLS] vector of a model that has none (MonoT5)
            raise ValueError(
                f"patch target {self.name!r} patches {missing[0]!r}, which {model.family.name} "
                "does not have: choose a target on one of its hook points"
            )
        return names

    def sub_sizes(self, model: HookedReranker, width: int) -> list[int]:
        self._refuse_shared_heads(model)
        return [_axis_size(model, dim, width) for dim in self.cells]

    def _refuse_shared_heads(self, model: HookedReranker) -> None:
        """Grouped-query attention: ``hook_k``/``hook_v`` have fewer heads than the query heads
        the grid counts, each shared by a group, so one query head's keys cannot be patched."""
        if self.site.name not in KV_SITES or "head" not in self.cells:
            return
        if model.abilities.grouped_kv:
            n_kv = model.cfg.n_key_value_heads
            raise ValueError(
                f"target {self.name!r}: hook_{self.site.name} has {n_kv} key/value heads shared "
                f"by {model.cfg.n_heads} query heads (grouped-query attention), so one query "
                "head's keys/values cannot be patched alone; patch queries (qk_target('q')), "
                "head outputs (head_target) or patterns (pattern_target)"
            )

    def grid(self, model: HookedReranker, width: int) -> tuple[tuple[str, ...], dict]:
        """The result grid: dimension names and the labels of each."""
        self.hook_names(model)  # the model has the target's hook points
        dims = (("layer",) if self.has_layer_dim else ()) + self.cells
        coords: dict[str, list[Any]] = {}
        if self.has_layer_dim:
            coords["layer"] = list(range(model.cfg.n_layers))
        for dim, size in zip(self.cells, self.sub_sizes(model, width)):
            coords[dim] = PART_LABELS if dim == "part" else list(range(size))
        return dims, coords

    def cell_rows(self, model: HookedReranker, width: int) -> Int[Tensor, "cells cols"]:
        """Selected cells as rows ``(layer, *sub)`` (layer ``n_layers`` for the pooled output)."""
        sizes = self.sub_sizes(model, width)
        mesh = np.meshgrid(*[np.arange(s) for s in sizes], indexing="ij")
        sub = np.stack(mesh, -1).reshape(-1, len(sizes)) if sizes else np.zeros((1, 0), np.int64)
        keep = None if self.select is None else self.select(model).numpy()
        out = []
        for layer in self.target_layers(model):
            rows = sub if keep is None else sub[keep[layer][sub[:, 0]]]
            out.append(np.concatenate([np.full((len(rows), 1), layer), rows], 1))
        return torch.as_tensor(np.concatenate(out).astype(np.int64))

    def flat_index(self, model: HookedReranker, cells: Tensor, width: int) -> Tensor:
        """Index of each cell row in the flattened result grid."""
        dims, coords = self.grid(model, width)
        shape = tuple(len(coords[d]) for d in dims)
        idx = cells.numpy() if self.has_layer_dim else cells[:, 1:].numpy()
        if not shape:
            return torch.zeros(len(cells), dtype=torch.long)
        return torch.as_tensor(np.ravel_multi_index(tuple(idx.T), shape))

    def valid(self, cells: Tensor, lengths: Tensor) -> Bool[Tensor, "pair cells"]:
        """Cells that exist for each pair (no position past the pair's length)."""
        if "position" not in self.cells:
            return torch.ones(len(lengths), len(cells), dtype=torch.bool)
        col = 1 + self.cells.index("position")
        return cells[None, :, col] < lengths.cpu()[:, None]

    # ------------------------------------------------------------ masks and reductions
    def _token_mask(self, parts: Int[Tensor, "rows pos"]) -> Bool[Tensor, "rows pos"] | None:
        if self.only_parts is None:
            return None
        return torch.isin(parts, torch.tensor(self.only_parts, device=parts.device))

    def row_mask(
        self, sub: Int[Tensor, "rows n_sub"], parts: Int[Tensor, "rows pos"], act: Tensor
    ) -> Bool[Tensor, "rows ..."]:
        """For rows each patching one cell: the mask of patched values (broadcasts to ``act``)."""
        rows = len(sub)
        mask = torch.ones((rows,) + (1,) * len(self.axes), dtype=torch.bool, device=act.device)

        def along(axis: str, ind: Tensor) -> Tensor:  # [rows, n] placed on ``axis``
            shape = [rows] + [1] * len(self.axes)
            shape[1 + self.axes.index(axis)] = ind.shape[1]
            return ind.reshape(shape)

        for j, dim in enumerate(self.cells):
            if dim == "part":
                ids = torch.tensor(_PART_IDS, device=act.device)[sub[:, j]]
                mask = mask & along("position", parts.to(act.device) == ids[:, None])
            else:
                size = act.shape[1 + self.axes.index(dim)]
                ind = torch.arange(size, device=act.device)[None] == sub[:, j : j + 1]
                mask = mask & along(dim, ind)
        tokens = self._token_mask(parts.to(act.device))
        if tokens is not None:
            mask = mask & along("position", tokens)
        return mask

    def reduce(self, prod: Tensor, parts: Int[Tensor, "batch pos"]) -> Tensor:
        """Sum an elementwise ``[batch, *axes]`` tensor over each cell: ``[batch, *sub_sizes]``.

        ``out[b, i] = sum_e prod[b, e] [e in cell i]`` (one einsum; parts as a one-hot).
        """
        letters = iter(string.ascii_lowercase[1:])
        ax = {axis: next(letters) for axis in self.axes}
        operands, specs = [prod], ["a" + "".join(ax[a] for a in self.axes)]
        tokens = self._token_mask(parts.to(prod.device))
        if tokens is not None:
            operands.append(tokens.to(prod.dtype))
            specs.append("a" + ax["position"])
        out = "a"
        for dim in self.cells:
            if dim == "part":
                ids = torch.tensor(_PART_IDS, device=prod.device)[None, :, None]
                operands.append((parts.to(prod.device)[:, None, :] == ids).to(prod.dtype))
                specs.append("aP" + ax["position"])
                out += "P"
            else:
                out += ax[dim]
        return torch.einsum(",".join(specs) + "->" + out, *operands)

    def cell_mask(
        self, sub: Sequence[int], parts: Int[Tensor, " pos"], shape: Sequence[int]
    ) -> Bool[Tensor, "..."]:
        """The mask of one cell on an activation of ``shape`` (no batch axis), by plain indexing:
        the reference's independent construction of :meth:`row_mask`."""
        mask = torch.zeros(tuple(shape), dtype=torch.bool)
        index: list[Any] = [slice(None)] * len(self.axes)
        for dim, i in zip(self.cells, sub):
            if dim != "part":
                index[self.axes.index(dim)] = int(i)
        mask[tuple(index)] = True
        pos = self.axes.index("position") if "position" in self.axes else None
        for dim, i in zip(self.cells, sub):
            if dim == "part":
                keep = torch.zeros(shape[pos], dtype=torch.bool)
                keep[(parts.cpu() == _PART_IDS[int(i)]).nonzero()[:, 0]] = True
                mask &= keep.reshape([-1 if a == pos else 1 for a in range(len(shape))])
        if self.only_parts is not None:
            keep = torch.tensor([int(p) in self.only_parts for p in parts.cpu().tolist()])
            mask &= keep.reshape([-1 if a == pos else 1 for a in range(len(shape))])
        return mask

    def reference_hooks(
        self, layer: int, sub: Sequence[int], clean_cache: CleanCache, parts: Int[Tensor, " pos"]
    ) -> Hooks:
        """Hooks patching one cell of one pair (batch of one) from its clean cache."""
        name = self.hook_name(layer)
        clean = clean_cache[name]
        mask = self.cell_mask(sub, parts, clean.shape[1:])[None].to(clean.device)
        return [(name, partial(_where_hook, clean, mask))]


# ====================================================================== constructors
def _check_by(by: str, allowed: tuple[str, ...]) -> None:
    if by not in allowed:
        raise ValueError(f"unknown granularity by={by!r}: choose one of {allowed}")


_BY = {"all": (), "position": ("position",), "part": ("part",)}


def _head_mask(heads: HeadSelection, model: HookedReranker) -> Tensor:
    mask = torch.zeros(model.cfg.n_layers, model.cfg.n_heads, dtype=torch.bool)
    for layer, head in select_heads(model, heads):
        mask[layer, head] = True
    return mask


def _neuron_mask(neurons: Any, model: HookedReranker) -> Tensor:
    return select_neurons(model, neurons)


def _heads_select(heads: HeadSelection) -> Callable | None:
    if heads is None:
        return None
    frozen = heads if isinstance(heads, (str, tuple, Mapping)) else tuple(heads)
    return partial(_head_mask, frozen)


def resid_target(
    component: Component = "resid_pre",
    *,
    by: Literal["all", "position", "part"] = "position",
    layers: int | Iterable[int] | None = None,
) -> PatchTarget:
    """Residual stream / attention output / MLP output per layer x position (or part, or all)."""
    if component not in COMPONENTS:
        raise ValueError(f"unknown component {component!r}: choose one of {COMPONENTS}")
    _check_by(by, tuple(_BY))
    sel = None if layers is None else tuple([layers] if isinstance(layers, int) else layers)
    return PatchTarget(f"{component}/{by}", SITES[component], _BY[by], layers=sel)


def head_target(
    *, by: Literal["all", "position", "part"] = "all", heads: HeadSelection = None
) -> PatchTarget:
    """Head outputs ``hook_z`` (before ``W_O``) per layer x head (all positions), x position, or
    x part; ``heads`` restricts the heads (any head selection form; default all)."""
    _check_by(by, tuple(_BY))
    return PatchTarget(f"z/{by}", SITES["z"], ("head", *_BY[by]), select=_heads_select(heads))


def qk_target(
    which: Literal["q", "k"],
    *,
    by: Literal["all", "position", "part"] = "all",
    heads: HeadSelection = None,
) -> PatchTarget:
    """Head queries or keys (``hook_q`` / ``hook_k``) per layer x head (x position or x part):
    the targets where attribution patching recomputes the attention softmax (AtP*)."""
    if which not in ("q", "k"):
        raise ValueError(f"unknown input {which!r}: choose 'q' or 'k'")
    _check_by(by, tuple(_BY))
    return PatchTarget(
        f"{which}/{by}", SITES[which], ("head", *_BY[by]), select=_heads_select(heads)
    )


def pattern_target(*, heads: HeadSelection = None) -> PatchTarget:
    """Attention patterns of heads, one cell per (layer, head, query position): the whole row of
    attention weights of that query position is patched."""
    return PatchTarget(
        "pattern/query_position",
        SITES["pattern"],
        ("head", "position"),
        select=_heads_select(heads),
    )


def neuron_target(
    neurons: Mapping[int, Iterable[int]] | Tensor | None = None,
    *,
    parts: PartLike | Iterable[PartLike] | None = None,
) -> PatchTarget:
    """FFN neurons (``mlp.hook_post``), one cell per (layer, neuron) (all, ``{layer: indices}``
    or a ``[n_layers, d_mlp]`` bool mask), patched at every position or the tokens of ``parts``."""
    select = None
    if neurons is not None:
        frozen = neurons
        if not isinstance(neurons, Tensor):
            frozen = {layer: tuple(which) for layer, which in neurons.items()}
        select = partial(_neuron_mask, frozen)
    only = None if parts is None else tuple(int(p) for p in parse_parts(parts))
    return PatchTarget("neuron", SITES["neuron"], ("neuron",), select=select, only_parts=only)


def pooled_target(*, by: Literal["all", "dimension"] = "all") -> PatchTarget:
    """The pooled [CLS] output ``pooler.hook_pooler_out``, whole or per dimension."""
    _check_by(by, ("all", "dimension"))
    cells = () if by == "all" else ("dimension",)
    return PatchTarget(f"pooled/{by}", SITES["pooled"], cells)


__all__ = [
    "COMPONENTS",
    "PART_LABELS",
    "PatchTarget",
    "head_patch_hooks",
    "head_target",
    "neuron_patch_hooks",
    "neuron_target",
    "pattern_patch_hooks",
    "pattern_target",
    "pooled_patch_hooks",
    "pooled_target",
    "qk_target",
    "resid_patch_hooks",
    "resid_target",
]
