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

from mechir.interface import HookedReranker, HookedTwoTower
from mechir.running import Hooks, per_forward

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


__all__ = ["TOWER_CHOICES", "TowerSelection", "in_tower"]
