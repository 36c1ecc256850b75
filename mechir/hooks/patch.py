"""Patching hooks: the intervention whose new values come from activations cached on another run.

A **source** is activations recorded on a batch: ``model.run_with_cache(batch)`` records the
batch on its cache, and :func:`activation_source` keeps only the hooks named. When a patching hook
runs, it finds every example of the running batch in the source:

* by pair id, when both batches carry pair ids (the clean and corrupted inputs of a pair share
  its id: :class:`patching.AlignedPairs`, ``model.encode(..., pair_ids=...)``);
* otherwise by identical token ids (patching from a cache of the same inputs, e.g. a sub-batch).

An example it cannot find, or whose length differs from its source's, is an error in one line,
never a patch from the wrong example. So a hook list built once from a source is right for any
sub-batch or reordering of the inputs it was cached for::

    _, clean = model.run_with_cache(pairs.clean)
    hooks = patch_hooks(model, clean, "z", units=["1/3"], parts="document")
    model.score(pairs.corrupted, hooks=hooks, batch_size=8)

Patched values replace the selected entries, ``a'[b, ...] = source[row(b), ...]`` (real tokens
only), as every other action of :mod:`mechir.hooks.site` does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from jaxtyping import Int

from mechir.hooks.site import Action, PartSelection, Positions, Site, get_site, site_hooks
from mechir.hooks.towers import TowerSelection, in_tower
from mechir.interface import HookedReranker
from mechir.lazy import lazy_import
from mechir.parts import CrossEncoderBatch
from mechir.running import Hooks, per_forward

torch = lazy_import("torch")


@dataclass
class ActivationSource:
    """Activations by hook name, recorded on ``batch`` (``[batch, ...]`` each) by ``model``."""

    batch: CrossEncoderBatch
    #: a dict, or TransformerLens's ``ActivationCache`` (which is not a ``Mapping``)
    activations: Mapping[str, torch.Tensor] | Any
    model: HookedReranker | None = None
    _by_tokens: dict[tuple[int, ...], int] | None = field(default=None, repr=False)

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.activations:
            raise KeyError(
                f"the patching source has no activation {name!r} (it holds "
                f"{sorted(self.activations)[:6]}...): cache it, e.g. "
                "activation_source(model, batch, names)"
            )
        return self.activations[name]

    def rows_for(self, running: CrossEncoderBatch) -> Int[torch.Tensor, " batch"]:
        """The source row of every example of ``running`` (see the module docstring).

        Raises:
            ValueError: an example is not in the source, or its length differs.
        """
        source = self.batch
        for which, batch in (("running", running), ("source", source)):
            if bool((batch.attention_mask[:, 0] == 0).any()):
                raise ValueError(
                    f"the {which} batch is left-padded: patching aligns tokens by position from "
                    "the start, so encode both batches right-padded (padding_side='right', the "
                    "default)"
                )
        if running.pair_ids is not None and source.pair_ids is not None:
            index = {pid: i for i, pid in enumerate(source.pair_ids)}
            missing = [p for p in running.pair_ids if p not in index]
            if missing:
                raise ValueError(
                    f"pair {missing[0]!r} of the running batch is not in the patching source "
                    f"(it holds pairs {', '.join(map(repr, source.pair_ids[:4]))}"
                    f"{', ...' if len(source) > 4 else ''}): build the hooks from a source "
                    "cached on the inputs you run"
                )
            rows = [index[p] for p in running.pair_ids]
        else:
            if self._by_tokens is None:
                self._by_tokens = {}
                for i, (ids, n) in enumerate(zip(source.input_ids.tolist(), source.lengths)):
                    self._by_tokens.setdefault(tuple(ids[: int(n)]), i)
            rows = []
            for b, (ids, n) in enumerate(zip(running.input_ids.tolist(), running.lengths)):
                row = self._by_tokens.get(tuple(ids[: int(n)]))
                if row is None:
                    raise ValueError(
                        f"example {b} of the running batch is not in the patching source (no "
                        "cached example has its token ids, and the batches carry no pair ids): "
                        "cache the source on these inputs, or give both batches the same pair "
                        "ids (model.encode(..., pair_ids=...), patching.AlignedPairs)"
                    )
                rows.append(row)
        rows_t = torch.as_tensor(rows, dtype=torch.long)
        differ = (source.lengths.cpu()[rows_t] != running.lengths.cpu()).nonzero().flatten()
        if len(differ):
            b = int(differ[0])
            name = running.pair_ids[b] if running.pair_ids is not None else b
            raise ValueError(
                f"example {name!r} has {int(running.lengths[b])} tokens but its patching source "
                f"{int(source.lengths[rows_t[b]])}: source and patched inputs must align token "
                "for token"
            )
        return rows_t


def as_source(source: Any) -> ActivationSource:
    """An :class:`ActivationSource` from itself or a cache that knows its batch (the cache of
    ``model.run_with_cache(batch)``)."""
    if isinstance(source, ActivationSource):
        return source
    batch = getattr(source, "batch", None)
    if not isinstance(batch, CrossEncoderBatch):
        raise ValueError(
            "the patching source does not know the batch it was cached on: use the cache of "
            "model.run_with_cache(batch) with a CrossEncoderBatch (model.encode(...)), or "
            "activation_source(model, batch, names)"
        )
    return ActivationSource(batch, source, getattr(source, "model", None))


def activation_source(
    model: HookedReranker, batch: CrossEncoderBatch, names: Sequence[str]
) -> ActivationSource:
    """Run ``batch`` once (no gradients) and keep the activations of the hooks ``names``."""
    acts: dict[str, torch.Tensor] = {}

    def keep(act: torch.Tensor, hook: Any) -> None:
        acts[hook.name] = act.detach()

    with torch.no_grad():
        model.run_with_hooks(batch, fwd_hooks=[(name, keep) for name in names])
    return ActivationSource(batch, acts, model)


class Patch(Action):
    """Replace the selected entries by the source's values for the running examples."""

    label = "patch"

    def __init__(self, source: ActivationSource, site: Site):
        self.source, self.site = source, site
        self.rows = per_forward(self._rows)

    def _rows(self, batch: CrossEncoderBatch) -> tuple[torch.Tensor, torch.Tensor]:
        return self.source.rows_for(batch), batch.attention_mask.bool()

    def apply(self, act, where, hook, layer):
        rows, real = self.rows(hook)
        value = self.source[hook.name][rows.to(self.source[hook.name].device)]
        for axis in self.site.token_axes:  # align the widths: padding beyond is not patched
            dim = 1 + self.site.axes.index(axis)
            width = act.shape[dim]
            if value.shape[dim] >= width:
                value = value.narrow(dim, 0, width)
            else:
                pad = list(value.shape)
                pad[dim] = width - value.shape[dim]
                value = torch.cat([value, value.new_zeros(pad)], dim)
            shape = [1] * act.dim()
            shape[0], shape[dim] = real.shape[0], width
            where = where & real.to(act.device).reshape(shape)
        return torch.where(where, value.to(act), act)


def patch_hooks(
    model: HookedReranker,
    source: ActivationSource | Any,
    site: Site | str,
    *,
    layers: Any = None,
    units: Any = None,
    parts: PartSelection = None,
    positions: Positions = None,
    tower: TowerSelection = None,
) -> Hooks:
    """Hooks patching the selected entries of ``site`` from ``source`` (see the module
    docstring): the intervention :func:`~mechir.hooks.site.site_hooks` with the patch action.

    Args:
        source: an :class:`ActivationSource`, or the cache of ``model.run_with_cache(batch)``.
        site: a :class:`~mechir.hooks.site.Site` or its name (``"z"``, ``"resid_pre"``, ...).
        layers, units, parts, positions: the selection (as every factory of mechir.hooks).
        tower: patch inside one tower of a bi-encoder only (``"query"``, ``"document"``).
    """
    site = get_site(site)
    action = Patch(as_source(source), site)
    hooks = site_hooks(
        model, site, action=action, layers=layers, units=units, parts=parts, positions=positions
    )
    return in_tower(model, hooks, tower)


def tower_source(
    model: HookedReranker, batch: Any, names: Sequence[str], *, tower: str = "document"
) -> Any:
    """Run a two-tower model once on ``batch`` (a ``BiEncoderBatch``; no gradients) and keep
    the activations ``names`` of one tower: a patching source
    (:class:`ActivationSource`) on that tower's batch, for
    :func:`mechir.hooks.patch_hooks` with ``tower=`` (e.g. TFC1 patching inside the document
    tower, the query embedding unchanged)."""
    acts: dict[str, Any] = {}

    def keep(act: Any, hook: Any) -> None:
        acts[hook.name] = act.detach()

    with torch.no_grad():
        model.run_with_hooks(batch, fwd_hooks=in_tower(model, [(n, keep) for n in names], tower))
    return ActivationSource(batch.tower(tower), acts, model)
