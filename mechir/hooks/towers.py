"""Restrict hooks to one tower of a two-tower model (bi-encoders, late interaction).

A two-tower model (:class:`mechir.interface.HookedTwoTower`) runs its query tower and its
document tower as two forward passes on two batches, under the same hook names; every hook of a
list fires in both. :func:`in_tower` keeps a hook list's effect to the forward passes of one
tower, read from the batch each pass runs on (:meth:`~mechir.interface.HookedTwoTower.tower_of`),
so a list is still built once. The factories of :mod:`mechir.hooks` take ``tower=`` and call it;
on a cross-encoder (one input, no towers) ``tower=None`` or ``"both"`` leave the hooks as they
are and a single tower is refused in one line.
"""

from __future__ import annotations

from typing import Any, Literal

from jaxtyping import Bool

from mechir.interface import HookedReranker, HookedTwoTower
from mechir.lazy import lazy_import
from mechir.running import Hooks, per_forward, running_batch

torch = lazy_import("torch")

TowerSelection = Literal["query", "document", "both"] | None
TOWER_CHOICES = ("query", "document", "both")


def in_tower(model: HookedReranker, hooks: Hooks, tower: TowerSelection) -> Hooks:
    """``hooks``, firing only in the forward passes of ``tower`` (``"query"`` or
    ``"document"``); ``None`` or ``"both"``: unchanged.

    Raises:
        ValueError: an unknown tower, or a single tower on a model without towers.
    """
    if tower not in (*TOWER_CHOICES, None):
        raise ValueError(f"unknown tower {tower!r}: choose one of {TOWER_CHOICES} (or None)")
    if tower is None or tower == "both":
        return hooks
    if not isinstance(model, HookedTwoTower):
        raise ValueError(
            f"tower={tower!r}: {type(model).__name__} reads query and document in one input "
            "(no towers): drop tower=, or select tokens with parts=..."
        )
    here = per_forward(lambda batch: model.tower_of(batch) == tower)

    def restrict(fn: Any) -> Any:
        def hook(act: Any, hook: Any) -> Any:
            return fn(act, hook=hook) if here(hook) else None

        hook.__name__ = getattr(fn, "__name__", "hook")
        return hook

    return [(name, restrict(fn)) for name, fn in hooks]


def refuse_two_towers(model: HookedReranker, what: str) -> None:
    """One line for an analysis that needs query and document in one input (cross-attention).

    Raises:
        ValueError: ``model`` is a two-tower model (bi-encoder, late interaction).
    """
    if isinstance(model, HookedTwoTower):
        raise ValueError(
            f"{what} needs query and document tokens attending to each other, but "
            f"{type(model).__name__} embeds them in separate towers (no cross-attention): use "
            "tower= hooks, QK circuits or patching inside one tower instead"
        )


def output_patch_hooks(
    model: HookedReranker,
    source: Any,
    *,
    tower: str = "document",
    positions: Bool[torch.Tensor, "source_batch pos"] | None = None,
) -> Hooks:
    """Embedding-level patching: the tower's output (``model.output_hook_name``: a
    bi-encoder's pooled embedding ``head.hook_embedding``, a late-interaction model's token
    embeddings ``head.hook_token_embeddings``) replaced by the source's, example by example
    (matched by pair id or token ids, as :func:`mechir.hooks.patch_hooks` matches).

    ``positions`` (in the source batch's rows; token embeddings only) patches only those
    tokens, e.g. the MaxSim winners of a late-interaction model (``MaxSimMatch.winners``).
    """
    name = model.output_hook_name

    def rows_for(batch: Any) -> Any:
        known = source.batch.pair_ids
        if positions is not None or batch.pair_ids is None or known is None:
            return source.rows_for(batch)  # token for token: the lengths must agree
        index = {pid: i for i, pid in enumerate(known)}
        missing = [p for p in batch.pair_ids if p not in index]
        if missing:  # a pooled embedding needs no token alignment: pair ids suffice
            raise ValueError(f"pair {missing[0]!r} is not in the patching source")
        return torch.as_tensor([index[p] for p in batch.pair_ids], dtype=torch.long)

    def hook(act: Any, hook: Any) -> Any:
        rows = rows_for(running_batch(hook))
        value = source[name][rows.to(source[name].device)].to(act)
        if positions is None:
            return value
        where = positions[rows.to(positions.device)].to(act.device)[..., None]
        return torch.where(where[:, : act.shape[1]], value[:, : act.shape[1]], act)

    return in_tower(model, [(name, hook)], tower)


__all__ = [
    "TOWER_CHOICES",
    "refuse_two_towers",
    "TowerSelection",
    "in_tower",
    "output_patch_hooks",
]
