"""Attention direction ablation between the input parts CLS | Query | SEP1 | Document | SEP2.

Direction convention: ``attending -> attended`` removes the attention **of** tokens of the
attending part (rows, query positions of attention) **to** tokens of the attended part (columns,
key positions), so information no longer flows from the attended part into the attending part.

Example: ``direction_ablation(batch, attending="query", attended="document", layers=[0])`` stops
query tokens from reading document tokens in layer 0 ("Q->D removed"); document tokens can still
read the query.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from mechir.parts import PARTS, CrossEncoderBatch, Part, PartLike, parse_parts
from mechir.selection import check_heads, check_layers, heads_by_layer

AblationMode = Literal["zero", "renormalize"]
#: One direction: (attending part(s), attended part(s)).
Direction = tuple[PartLike | Iterable[PartLike], PartLike | Iterable[PartLike]]
HeadSelection = Iterable[int] | Iterable[tuple[int, int] | str] | Mapping[int, Iterable[int]] | None

#: All 25 single part -> part directions, in (attending, attended) order.
ALL_DIRECTIONS: tuple[tuple[Part, Part], ...] = tuple((a, b) for a in PARTS for b in PARTS)

#: Named groups of directions used by the papers' studies.
DIRECTION_GROUPS: dict[str, tuple[tuple[tuple[Part, ...], tuple[Part, ...]], ...]] = {
    # every query token reads no document token (all Q->D)
    "query_to_document": (((Part.QUERY,), (Part.DOCUMENT,)),),
    # every document token reads no query token (all D->Q)
    "document_to_query": (((Part.DOCUMENT,), (Part.QUERY,)),),
    # no attention between query and document in either direction
    "no_interaction": (((Part.QUERY,), (Part.DOCUMENT,)), ((Part.DOCUMENT,), (Part.QUERY,))),
    # [CLS] attends to nothing
    "cls_reads_nothing": (((Part.CLS,), PARTS),),
    # [CLS] reads neither query nor document
    "cls_reads_query_document": (((Part.CLS,), (Part.QUERY, Part.DOCUMENT)),),
    # document tokens read no document token
    "document_to_document": (((Part.DOCUMENT,), (Part.DOCUMENT,)),),
}


def direction_label(attending: PartLike | Iterable[PartLike], attended: Any) -> str:
    """Human label, e.g. ``"QUERY->DOCUMENT"`` or ``"CLS->CLS+QUERY"``."""
    fmt = lambda ps: "+".join(p.name for p in parse_parts(ps))  # noqa: E731
    return f"{fmt(attending)}->{fmt(attended)}"


def direction_group(name: str) -> list[Direction]:
    """The directions of a named group (see :data:`DIRECTION_GROUPS`)."""
    if name not in DIRECTION_GROUPS:
        raise ValueError(
            f"unknown direction group {name!r}: choose from {sorted(DIRECTION_GROUPS)}"
        )
    return list(DIRECTION_GROUPS[name])


def cumulative_layer_ranges(n_layers: int) -> list[list[int]]:
    """``[[0], [0, 1], ..., [0, ..., n_layers - 1]]``: the layer ranges ``0..k``."""
    return [list(range(k + 1)) for k in range(n_layers)]


def sliding_layer_windows(n_layers: int, width: int, stride: int = 1) -> list[list[int]]:
    """Windows of ``width`` consecutive layers, every ``stride`` layers."""
    if not 1 <= width <= n_layers or stride < 1:
        raise ValueError(f"need 1 <= width <= {n_layers} and stride >= 1, got {width}, {stride}")
    return [list(range(s, s + width)) for s in range(0, n_layers - width + 1, stride)]


def direction_mask(
    batch: CrossEncoderBatch, directions: Sequence[Direction]
) -> Bool[Tensor, "batch query_pos key_pos"]:
    """``True`` where attention is removed: row token in an attending part and column token in
    the matching attended part, for any of ``directions`` (padding is never selected)."""
    removed = torch.zeros(
        len(batch),
        batch.parts.shape[1],
        batch.parts.shape[1],
        dtype=torch.bool,
        device=batch.device,
    )
    for attending, attended in directions:
        rows = batch.mask(attending)
        cols = batch.mask(attended)
        removed |= rows[:, :, None] & cols[:, None, :]
    return removed


def _heads_per_layer(
    layers: list[int], heads: HeadSelection, model: Any
) -> dict[int, list[int] | None]:
    """Map each layer to its selected heads (None = all heads)."""
    if heads is None:
        return {layer: None for layer in layers}
    if isinstance(heads, Mapping):
        per = {int(k): sorted({int(h) for h in v}) for k, v in heads.items()}
        if model is not None:
            check_heads(model, [(k, h) for k, hs in per.items() for h in hs])
        return {layer: per[layer] for layer in layers if layer in per and per[layer]}
    heads = list(heads)
    if heads and all(isinstance(h, int) and not isinstance(h, bool) for h in heads):
        if model is not None:
            check_heads(model, [(layers[0], h) for h in heads])
        return {layer: sorted(set(heads)) for layer in layers}
    pairs = check_heads(model, heads) if model is not None else [tuple(h) for h in heads]
    return {layer: hs for layer, hs in heads_by_layer(pairs).items() if layer in layers}


def direction_ablation(
    batch: CrossEncoderBatch,
    *,
    attending: PartLike | Iterable[PartLike] | None = None,
    attended: PartLike | Iterable[PartLike] | None = None,
    directions: Sequence[Direction] | str | None = None,
    layers: int | Iterable[int] | None = None,
    heads: HeadSelection = None,
    mode: AblationMode = "zero",
    model: Any = None,
) -> list[tuple[str, Any]]:
    """Hooks removing attention from ``attending`` parts to ``attended`` parts.

    Give either ``attending`` + ``attended`` or ``directions`` (a list of (attending, attended)
    pairs, or the name of a :data:`DIRECTION_GROUPS` entry). ``heads``: None (all heads), head
    indices applied in every selected layer, ``(layer, head)`` pairs / ``"l/h"`` labels, or
    ``{layer: heads}``. ``layers=None`` means all layers and needs ``model``; passing ``model``
    also validates layers and heads against it.

    Modes, with ``A`` the post-softmax pattern and ``M`` the 0/1 keep-mask of the row:
        - ``"zero"`` (the papers' ablation): ``A'_ij = A_ij M_ij`` (rows no longer sum to 1).
        - ``"renormalize"``: ``A'_ij = A_ij M_ij / sum_k A_ik M_ik``, which equals setting removed
          scores to ``-inf`` before the softmax. A row whose every key is removed becomes all
          zeros (the token then receives only the attention output bias), never NaN.

    Example (query tokens stop reading the document in layers 0-2, all heads)::

        hooks = direction_ablation(batch, attending="query", attended="document", layers=[0, 1, 2])
        with model.hooks(fwd_hooks=hooks):
            scores = model.score(batch)
    """
    if mode not in ("zero", "renormalize"):
        raise ValueError(f"unknown mode {mode!r}: use 'zero' or 'renormalize'")
    if isinstance(directions, str):
        directions = direction_group(directions)
    if directions is None:
        if attending is None or attended is None:
            raise ValueError("give attending= and attended=, or directions=")
        directions = [(attending, attended)]
    elif attending is not None or attended is not None:
        raise ValueError("give either attending=/attended= or directions=, not both")
    directions = [(parse_parts(a), parse_parts(b)) for a, b in directions]
    if model is not None:
        layer_list = check_layers(model, layers)
    elif layers is None:
        raise ValueError("layers=None (all layers) needs model=... to know the number of layers")
    else:
        layer_list = sorted({int(x) for x in ([layers] if isinstance(layers, int) else layers)})
        if not layer_list or layer_list[0] < 0:
            raise ValueError(f"invalid layer selection {layers!r}")
    removed = direction_mask(batch, directions)
    keep = (~removed).float()
    affected_rows = removed.any(-1)  # [batch, query_pos]
    expected = tuple(removed.shape)

    def make_hook(head_idx: list[int] | None):
        def hook(pattern: Float[Tensor, "batch head q k"], hook: Any) -> Tensor:
            if (pattern.shape[0], pattern.shape[2], pattern.shape[3]) != expected:
                raise ValueError(
                    f"{hook.name}: direction-ablation hooks were built for a batch of shape "
                    f"{expected[:2]} but the model ran on {tuple(pattern.shape[::2])}; build the "
                    "hooks for each batch (pass `lambda b: direction_ablation(b, ...)` to "
                    "score/rerank)"
                )
            k = keep.to(pattern.device, pattern.dtype)[:, None]
            if mode == "zero":
                new = pattern * k
            else:
                kept = pattern * k
                denom = kept.sum(-1, keepdim=True)
                renorm = torch.where(
                    denom > 0, kept / denom.clamp_min(1e-30), torch.zeros_like(kept)
                )
                new = torch.where(
                    affected_rows.to(pattern.device)[:, None, :, None], renorm, pattern
                )
            if head_idx is None:
                return new
            if max(head_idx) >= pattern.shape[1]:
                raise ValueError(
                    f"{hook.name}: head {max(head_idx)} out of range, the layer has "
                    f"{pattern.shape[1]} heads"
                )
            sel = torch.zeros(pattern.shape[1], dtype=torch.bool, device=pattern.device)
            sel[head_idx] = True
            return torch.where(sel[None, :, None, None], new, pattern)

        return hook

    return [
        (f"blocks.{layer}.attn.hook_pattern", make_hook(hs))
        for layer, hs in _heads_per_layer(layer_list, heads, model).items()
    ]
