"""Attention direction ablation between the input parts CLS | Query | SEP1 | Document | SEP2.

Direction convention: ``attending -> attended`` removes the attention **of** tokens of the
attending part (rows, query positions of attention) **to** tokens of the attended part (columns,
key positions), so information no longer flows from the attended part into the attending part.

Example: ``direction_ablation_hooks(model, attending="query", attended="document", layers=[0])``
stops query tokens from reading document tokens in layer 0 ("Q->D removed"); document tokens can
still read the query. The hooks read the parts of whatever batch the model runs on.

Encoder-decoder rerankers (MonoT5): the attending side may be the pseudo-part ``"decoder"``,
the decoder's steps, which read the encoder input through cross-attention:
``attending="decoder", attended="document"`` removes the cross-attention of the decoder to the
document tokens in the selected (decoder) layers (sites ``cross_pattern`` /
``cross_attn_scores``); directions between parts act on the encoder's self-attention as for
every family, and both kinds mix in one ``directions=`` list.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from jaxtyping import Bool

from mechir.hooks.site import SITES, Mode, action_for, site_hooks
from mechir.hooks.towers import TowerSelection, in_tower
from mechir.interface import HookedReranker
from mechir.lazy import lazy_import
from mechir.parts import PARTS, CrossEncoderBatch, Part, PartLike, parse_parts
from mechir.running import Hooks
from mechir.selection import HeadSelection, LayerSelection

torch = lazy_import("torch")

#: One direction: (attending part(s), attended part(s)).
Direction = tuple[PartLike | Iterable[PartLike], PartLike | Iterable[PartLike]]

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
    """Human label, e.g. ``"QUERY->DOCUMENT"``, ``"CLS->CLS+QUERY"`` or ``"DECODER->QUERY"``."""
    fmt = lambda ps: (  # noqa: E731
        "DECODER" if _is_decoder(ps) else "+".join(p.name for p in parse_parts(ps))
    )
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
) -> Bool[torch.Tensor, "batch query_pos key_pos"]:
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


#: The pseudo-part of the decoder's steps (encoder-decoder rerankers): ``attending="decoder"``.
DECODER = "decoder"


def _is_decoder(parts: Any) -> bool:
    return isinstance(parts, str) and parts.strip().lower() == DECODER


def _parse_directions(
    attending: Any, attended: Any, directions: Sequence[Direction] | str | None
) -> list[tuple[tuple[Part, ...] | str, tuple[Part, ...]]]:
    """(attending, attended) part tuples; the attending side may be :data:`DECODER`."""
    if isinstance(directions, str):
        directions = direction_group(directions)
    if directions is None:
        if attending is None or attended is None:
            raise ValueError("give attending= and attended=, or directions=")
        directions = [(attending, attended)]
    elif attending is not None or attended is not None:
        raise ValueError("give either attending=/attended= or directions=, not both")
    out: list[tuple[tuple[Part, ...] | str, tuple[Part, ...]]] = []
    for a, b in directions:
        if _is_decoder(b):
            raise ValueError(
                "attended='decoder': the encoder never reads the decoder (the decoder reads the "
                "encoder input through cross-attention): use attending='decoder'"
            )
        out.append((DECODER if _is_decoder(a) else tuple(parse_parts(a)), tuple(parse_parts(b))))
    return out


def _check_cross_attention(model: HookedReranker) -> None:
    if not model.abilities.cross_attention:
        raise ValueError(
            f"attending='decoder': {model.family.name} has no decoder reading its input through "
            "cross-attention (only encoder-decoder rerankers such as MonoT5 do)"
        )


def _refuse_impossible(
    model: HookedReranker, pairs: Sequence[tuple[tuple[Part, ...], tuple[Part, ...]]]
) -> None:
    """A model refuses a direction whose attention cannot exist (``model.impossible_direction``:
    in a causal LLM reranker earlier parts never attend to later ones), so that asking for it is
    an error, not a silent no-op."""
    for attending, attended in pairs:
        why = model.impossible_direction(attending, attended)
        if why is not None:
            raise ValueError(why)


def direction_ablation_hooks(
    model: HookedReranker,
    *,
    attending: PartLike | Iterable[PartLike] | None = None,
    attended: PartLike | Iterable[PartLike] | None = None,
    directions: Sequence[Direction] | str | None = None,
    layers: LayerSelection = None,
    heads: HeadSelection = None,
    mode: Mode = "zero",
    tower: TowerSelection = None,
) -> Hooks:
    """Hooks removing attention from ``attending`` parts to ``attended`` parts, built once and
    correct for every batch: each hook reads the parts of the batch the model runs on.

    Give either ``attending`` + ``attended`` or ``directions`` (a list of (attending, attended)
    pairs, or the name of a :data:`DIRECTION_GROUPS` entry). On an encoder-decoder reranker
    (MonoT5) ``attending="decoder"`` removes the decoder's cross-attention to ``attended``
    (see the module docstring); elsewhere it is an error. ``layers`` (None = all) and
    ``heads`` (None = all heads of those layers) follow :mod:`mechir.selection`. This is the
    intervention on the attention site with rows (``"position"``) in ``attending`` and columns
    (``"key"``) in ``attended`` (:mod:`mechir.hooks.site`).

    Modes, with ``S`` the attention scores of a row, ``A = softmax(S)`` and ``M`` its 0/1
    keep-mask:

    - ``"zero"`` (the papers' ablation): ``A'_ij = A_ij M_ij`` (rows no longer sum to 1), on
      ``hook_pattern``.
    - ``"renormalize"``: ``A' = softmax(S + log M)``, i.e. removed scores set to ``-inf`` before
      the softmax, on ``hook_attn_scores``; exact in any precision (no rescaling of underflowed
      probabilities). A row whose every key is removed becomes all zeros (the token then
      receives only the attention output bias), never NaN.

    ``tower`` (``"query"``, ``"document"``) keeps the ablation inside one tower of a
    bi-encoder (:mod:`mechir.hooks.towers`); a direction between query and document does not
    exist there and is refused in one line.

    In a causal model (LLM rerankers) a token reads only the tokens before it: a direction
    none of whose attention exists (``attending="query", attended="document"`` when the prompt
    puts the query first) is a ``ValueError`` saying so.

    Example (query tokens stop reading the document in layers 0-2, all heads)::

        hooks = direction_ablation_hooks(model, attending="query", attended="document",
                                         layers=[0, 1, 2])
        scores = model.score(batch, hooks=hooks)        # any batch, any batch_size
    """
    if mode not in ("zero", "renormalize"):
        raise ValueError(
            f"unknown mode {mode!r}: use 'zero' or 'renormalize' for direction ablation"
        )
    pairs = _parse_directions(attending, attended, directions)
    _refuse_impossible(model, [p for p in pairs if p[0] != DECODER])
    hooks: Hooks = []
    boxes = [{"position": rows, "key": cols} for rows, cols in pairs if rows != DECODER]
    if boxes:
        site = SITES["pattern" if mode == "zero" else "attn_scores"]
        action = action_for(site, mode, what="direction ablation")
        hooks += site_hooks(model, site, action=action, layers=layers, units=heads, parts=boxes)
    cross = [{"key": cols} for rows, cols in pairs if rows == DECODER]
    if cross:  # the decoder's steps (every one) reading encoder tokens of the attended parts
        _check_cross_attention(model)
        site = SITES["cross_pattern" if mode == "zero" else "cross_attn_scores"]
        action = action_for(site, mode, what="direction ablation")
        hooks += site_hooks(model, site, action=action, layers=layers, units=heads, parts=cross)
    return in_tower(model, hooks, tower)
