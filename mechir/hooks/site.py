"""Interventions on sites: the one vocabulary of every hook factory.

A **site** is a place where an activation can be changed: a hook name template
(``blocks.{layer}.attn.hook_z``), the axes of the activation after the batch axis
(``("position", "head", "d_head")``), the axis its *units* run along (``"head"``, ``"neuron"``, or
none for the residual stream) and its token axes: ``"position"``, the token the activation
belongs to; attention has a second one, ``"key"``: row ``position`` attends to column ``key``.
:data:`SITES` names the sites every family has, and the decoder sites of encoder-decoder
rerankers (MonoT5: ``decoder_z``, ``cross_z``, ``cross_attn_scores``, ``cross_pattern``,
``decoder_neuron``, whose ``"step"`` axis runs over decoder steps).

An **intervention** selects entries of a site's activation and applies one **action** to them::

    a'[b, ...] = action(a)[b, ...]   where   layer in L,  unit in U(layer),  token axes in parts

with the one selection grammar of mechir: ``layers`` as in :func:`mechir.selection.select_layers`,
``units`` the heads (``"l/h"``, ``(l, h)``, ``{l: [h]}``, ``"LlHh"``) or neurons
(``{layer: [i]}``, a bool mask) of the site, ``parts`` the tokens by part, read from the batch the
model runs on (so a hook list is built once and is right for every batch), and ``positions``
absolute token positions. Actions (:func:`action_for` maps the ``mode=`` of the factories):

=================  ===========================================  ===========================
mode / action      new value of a selected entry                 sites
=================  ===========================================  ===========================
``"zero"``         ``0``                                         all
``"mean"``         its reference mean (``means``)                activations (not attention)
``factor=f``       ``f * a`` (1 is the identity, 0 is ``zero``)   all
``"renormalize"``  ``-inf`` on attention scores, so the softmax   ``attn_scores``
                   renormalizes over the keys left
``patch``          the value in a cached source of the running   all
                   batch (:mod:`mechir.hooks.patch`)
=================  ===========================================  ===========================

Every factory of :mod:`mechir.hooks` (and the patching hooks of :mod:`patching`) is
:func:`site_hooks` with a site, a selection and an action.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Union

from jaxtyping import Bool, Float

from mechir.interface import HookedReranker
from mechir.lazy import lazy_import
from mechir.parts import PartLike, parse_parts
from mechir.running import HookFn, Hooks, per_forward
from mechir.selection import (
    HeadSelection,
    LayerSelection,
    heads_by_layer,
    select_heads,
    select_layers,
    select_neurons,
)

torch = lazy_import("torch")

#: The modes of the ablation factories (one spelling everywhere).
Mode = Literal["zero", "mean", "renormalize"]
MODES: tuple[str, ...] = ("zero", "mean", "renormalize")
#: Tokens by part: one selection for the site's ``"position"`` axis, a mapping ``{axis: parts}``
#: (for attention: ``{"position": attending, "key": attended}``), or a list of mappings (their
#: union).
PartSelection = (
    PartLike
    | Iterable[PartLike]
    | Mapping[str, PartLike | Iterable[PartLike]]
    | Sequence[Mapping[str, PartLike | Iterable[PartLike]]]
    | None
)
#: Absolute token positions: one, several, or a ``[pos]`` bool mask (a forward reference, so
#: that importing this module does not import torch).
Positions = Union[int, Sequence[int], "Bool[torch.Tensor, ' pos']", None]  # noqa: UP007


@dataclass(frozen=True)
class Site:
    """Where an intervention acts (see the module docstring).

    Attributes:
        name: the site's name in :data:`SITES` (``"z"``, ``"pattern"``, ...).
        hook: hook name, with ``{layer}`` for per-layer hooks.
        axes: the activation's axes after the batch axis.
        unit: the axis selected by units (``"head"``: the head grammar; ``"neuron"``: the
            neuron grammar; any other axis: plain indices) or None.
        kind: ``"activation"`` (any mode), ``"pattern"`` (attention probabilities: no mean),
            ``"scores"`` (attention scores: ``renormalize`` fills ``-inf``) or ``"term"`` (one
            additive term of the attention scores, DeBERTa's ``c2c``/``c2p``/``p2c``: ``zero``
            drops it, ``factor`` scales it).
    """

    name: str
    hook: str
    axes: tuple[str, ...]
    unit: str | None = None
    kind: Literal["activation", "pattern", "scores", "term"] = "activation"

    @property
    def per_layer(self) -> bool:
        return "{layer}" in self.hook

    @property
    def token_axes(self) -> tuple[str, ...]:
        return tuple(a for a in self.axes if a in ("position", "key"))

    def hook_name(self, layer: int | None = None) -> str:
        """The hook of ``layer`` (ignored for a site after the last block)."""
        return self.hook.format(layer=layer) if self.per_layer else self.hook

    def modes(self) -> tuple[str, ...]:
        """The ``mode=`` values defined on this site."""
        return {
            "activation": ("zero", "mean"),
            "pattern": ("zero",),
            "scores": ("renormalize",),
            "term": ("zero",),
        }[self.kind]


_TOKENS, _HEADS = ("position", "d_model"), ("position", "head", "d_head")
_ATTENTION, _HEAD_INPUT = ("head", "position", "key"), ("position", "head", "d_model")
_STEPS, _CROSS = ("step", "head", "d_head"), ("head", "step", "key")

#: The sites of every family (TransformerLens hook names; see ``model.block_output_name``).
SITES: dict[str, Site] = {
    site.name: site
    for site in (
        Site("resid_pre", "blocks.{layer}.hook_resid_pre", _TOKENS),
        Site("attn_out", "blocks.{layer}.hook_attn_out", _TOKENS),
        Site("resid_mid", "blocks.{layer}.hook_resid_mid", _TOKENS),
        Site("mlp_out", "blocks.{layer}.hook_mlp_out", _TOKENS),
        Site("resid_post", "blocks.{layer}.hook_resid_post", _TOKENS),
        Site("q", "blocks.{layer}.attn.hook_q", _HEADS, "head"),
        Site("k", "blocks.{layer}.attn.hook_k", _HEADS, "head"),
        Site("v", "blocks.{layer}.attn.hook_v", _HEADS, "head"),
        Site("z", "blocks.{layer}.attn.hook_z", _HEADS, "head"),
        Site("attn_scores", "blocks.{layer}.attn.hook_attn_scores", _ATTENTION, "head", "scores"),
        Site("pattern", "blocks.{layer}.attn.hook_pattern", _ATTENTION, "head", "pattern"),
        Site("q_input", "blocks.{layer}.hook_q_input", _HEAD_INPUT, "head"),
        Site("k_input", "blocks.{layer}.hook_k_input", _HEAD_INPUT, "head"),
        Site("v_input", "blocks.{layer}.hook_v_input", _HEAD_INPUT, "head"),
        Site("neuron", "blocks.{layer}.mlp.hook_post", ("position", "neuron"), "neuron"),
        Site("neuron_pre", "blocks.{layer}.mlp.hook_pre", ("position", "neuron"), "neuron"),
        Site("pooled", "pooler.hook_pooler_out", ("dimension",), "dimension"),
        # DeBERTa's disentangled attention: the three terms of attn_scores (its family only)
        Site("c2c_scores", "blocks.{layer}.attn.hook_c2c_scores", _ATTENTION, "head", "term"),
        Site("c2p_scores", "blocks.{layer}.attn.hook_c2p_scores", _ATTENTION, "head", "term"),
        Site("p2c_scores", "blocks.{layer}.attn.hook_p2c_scores", _ATTENTION, "head", "term"),
        # encoder-decoder rerankers (MonoT5): the decoder's steps are the "step" axis; cross-
        # attention rows are steps, its columns ("key") the encoder input's tokens
        Site("decoder_z", "decoder.{layer}.attn.hook_z", _STEPS, "head"),
        Site("cross_z", "decoder.{layer}.cross_attn.hook_z", _STEPS, "head"),
        Site(
            "cross_attn_scores", "decoder.{layer}.cross_attn.hook_attn_scores", _CROSS, "head",
            "scores",
        ),
        Site("cross_pattern", "decoder.{layer}.cross_attn.hook_pattern", _CROSS, "head", "pattern"),
        Site("decoder_neuron", "decoder.{layer}.mlp.hook_post", ("step", "neuron"), "neuron"),
    )
}  # fmt: skip


def get_site(site: Site | str) -> Site:
    """A :class:`Site` from itself or its name in :data:`SITES`."""
    if isinstance(site, Site):
        return site
    if site not in SITES:
        raise ValueError(f"unknown site {site!r}: choose one of {sorted(SITES)}")
    return SITES[site]


# ---------------------------------------------------------------------- actions
class Action:
    """What an intervention does to the entries it selects: ``apply(act, where, hook, layer)``
    returns the new activation (out of place, so gradients flow)."""

    label = "action"

    def apply(self, act: torch.Tensor, where: torch.Tensor, hook: Any, layer: int | None) -> Any:
        raise NotImplementedError


class Zero(Action):
    label = "zero"

    def apply(self, act, where, hook, layer):
        return act.masked_fill(where.to(act.device), 0.0)


class Fill(Action):
    """A constant (``-inf`` on attention scores: the softmax renormalizes over the rest)."""

    label = "fill"

    def __init__(self, value: float):
        self.value = value

    def apply(self, act, where, hook, layer):
        return act.masked_fill(where.to(act.device), self.value)


class Scale(Action):
    label = "scale"

    def __init__(self, factor: float):
        self.factor = float(factor)

    def apply(self, act, where, hook, layer):
        return torch.where(where.to(act.device), act * self.factor, act)


class Replace(Action):
    """A value per layer broadcast over batch and token axes (reference means)."""

    label = "mean"

    def __init__(self, values: Callable[[int | None, str], torch.Tensor]):
        self.values = values

    def apply(self, act, where, hook, layer):
        value = self.values(layer, hook.name).to(act)
        lead = act.dim() - value.dim()
        value = value.reshape((1,) * lead + tuple(value.shape)).expand_as(act)
        return torch.where(where.to(act.device), value, act)


def action_for(
    site: Site,
    mode: str,
    *,
    means: Float[torch.Tensor, "n_layers ..."] | Mapping[str, torch.Tensor] | None = None,
    factor: float | None = None,
    what: str = "",
) -> Action:
    """The action of ``mode`` (or of scaling by ``factor``) on ``site``, checked: one message
    for every factory when a mode does not exist on a site or lacks its means."""
    label = what or site.name
    if factor is not None:
        if mode != "zero":
            raise ValueError(f"{label}: give factor= or mode={mode!r}, not both")
        return Scale(factor)
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}: use one of {site.modes()} for {label}")
    if mode not in site.modes():
        raise ValueError(
            f"mode {mode!r} is not defined for {label} ({site.kind} site {site.name!r}): use "
            f"one of {site.modes()}"
        )
    if mode == "zero":
        return Zero()
    if mode == "renormalize":
        return Fill(-float("inf"))
    if means is None:
        raise ValueError(f"mode='mean' needs means=... for {label} (see activation_means)")
    if isinstance(means, Mapping):
        return Replace(lambda layer, name: means[name])
    return Replace(lambda layer, name: means[0 if layer is None else layer])


# ---------------------------------------------------------------------- selection
def _boxes(site: Site, parts: PartSelection) -> list[dict[str, tuple[Any, ...]]] | None:
    """``parts`` as a union of boxes ``{token axis: parts}`` (None: every token)."""
    if parts is None:
        return None
    axes = site.token_axes
    if not axes:
        raise ValueError(f"site {site.name!r} has no token axis: parts cannot select on it")
    if isinstance(parts, Mapping):
        boxes = [parts]
    elif isinstance(parts, Sequence) and parts and all(isinstance(p, Mapping) for p in parts):
        boxes = list(parts)
    else:
        boxes = [{"position": parts}]
    out = []
    for box in boxes:
        unknown = [a for a in box if a not in axes]
        if unknown:
            raise ValueError(f"site {site.name!r} has no token axis {unknown[0]!r}: use {axes}")
        out.append({axis: tuple(parse_parts(p)) for axis, p in box.items()})
    return out


def _on_axis(mask: torch.Tensor, site: Site, axis: str, batch_axis: bool) -> torch.Tensor:
    """``mask`` (``[batch, n]`` or ``[n]``) shaped to broadcast on ``axis`` of the activation."""
    shape = [1] * (len(site.axes) + 1)
    shape[1 + site.axes.index(axis)] = mask.shape[-1]
    if batch_axis:
        shape[0] = mask.shape[0]
    return mask.reshape(shape)


def _positions_mask(positions: Positions, width: int, device: Any) -> torch.Tensor:
    if isinstance(positions, torch.Tensor) and positions.dtype == torch.bool:
        mask = positions.reshape(-1).to(device)
        if len(mask) < width:
            mask = torch.cat([mask, mask.new_zeros(width - len(mask))])
        return mask[:width]
    idx = torch.as_tensor([positions] if isinstance(positions, int) else list(positions))
    if idx.numel() and (idx.min() < 0 or idx.max() >= width):
        raise ValueError(f"position out of range: the input has {width} positions (0-{width - 1})")
    mask = torch.zeros(width, dtype=torch.bool, device=device)
    mask[idx.to(device)] = True
    return mask


def _axis_size(model: HookedReranker, axis: str) -> int:
    cfg = model.cfg
    return {"head": cfg.n_heads, "neuron": cfg.d_mlp, "dimension": cfg.d_model}[axis]


def _index_mask(units: Any, size: int, axis: str) -> torch.Tensor:
    idx = [units] if isinstance(units, int) else list(units)
    bad = [i for i in idx if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < size]
    if bad or not idx:
        raise ValueError(f"{axis} indices must be ints in 0-{size - 1}, got {units!r}")
    mask = torch.zeros(size, dtype=torch.bool)
    mask[idx] = True
    return mask


def select_units(
    model: HookedReranker, site: Site, layers: LayerSelection, units: Any
) -> dict[int | None, Bool[torch.Tensor, " n_units"] | None]:
    """Layer -> unit mask (None: every unit) of a selection on ``site``, validated.

    Raises:
        ValueError: units on a site without units, an empty selection, out-of-range entries.
    """
    if not site.per_layer:
        if layers is not None:
            raise ValueError(f"site {site.name!r} is not per layer: it takes no layers")
        if units is None:
            return {None: None}
        return {None: _index_mask(units, _axis_size(model, site.unit), site.unit)}
    cfg = model.cfg
    if site.unit is None:
        if units is not None:
            raise ValueError(f"site {site.name!r} has no units: select layers and parts only")
        return dict.fromkeys(select_layers(model, layers))
    if site.unit == "head":
        if units is None:
            return dict.fromkeys(select_layers(model, layers))
        out = {}
        for layer, hs in heads_by_layer(select_heads(model, units, layers=layers)).items():
            mask = torch.zeros(cfg.n_heads, dtype=torch.bool)
            mask[hs] = True
            out[layer] = mask
        return out
    if units is None:
        return dict.fromkeys(select_layers(model, layers))
    mask = select_neurons(model, units)
    allowed = set(select_layers(model, layers))
    chosen = [lay for lay in mask.any(-1).nonzero().flatten().tolist() if lay in allowed]
    if not chosen:
        raise ValueError("empty neuron selection in the selected layers")
    return {layer: mask[layer] for layer in chosen}


#: Sites whose heads are the key/value heads (grouped-query attention: fewer than query heads).
KV_SITES = ("k", "v", "k_input", "v_input")


def refuse_shared_heads(model: HookedReranker, site: Site, units: Any) -> None:
    """With grouped-query attention ``hook_k``/``hook_v`` (and their split inputs) have
    ``n_key_value_heads`` heads, each shared by a group of query heads: a query head's key or
    value cannot be changed alone, so selecting heads there is refused (every head is fine)."""
    if units is None or site.name not in KV_SITES or not model.abilities.grouped_kv:
        return
    n_kv = model.cfg.n_key_value_heads
    raise ValueError(
        f"site {site.name!r} has {n_kv} key/value heads shared by {model.cfg.n_heads} query heads "
        "(grouped-query attention): a query head's keys and values cannot be changed alone; "
        "select heads on 'q', 'z' or 'pattern', or act on every head (units=None)"
    )


def site_hooks(
    model: HookedReranker,
    site: Site | str,
    *,
    action: Action,
    layers: LayerSelection = None,
    units: HeadSelection | Any = None,
    parts: PartSelection = None,
    positions: Positions = None,
) -> Hooks:
    """Hooks applying ``action`` to the selected entries of ``site`` (see the module docstring):
    one hook per selected layer, built once, reading the parts of each batch it runs on.
    ``positions`` select on the ``"position"`` axis (attention: the attending rows)."""
    site = get_site(site)
    refuse_shared_heads(model, site, units)
    per_layer = select_units(model, site, layers, units)
    boxes = _boxes(site, parts)
    if positions is not None and "position" not in site.axes:
        raise ValueError(f"site {site.name!r} has no position axis: positions cannot select on it")

    def box_mask(batch: Any) -> torch.Tensor:
        union = None
        for box in boxes:
            mask = None
            for axis, selected in box.items():
                on_axis = _on_axis(batch.mask(selected), site, axis, batch_axis=True)
                mask = on_axis if mask is None else mask & on_axis
            union = mask if union is None else union | mask
        return union

    tokens = None if boxes is None else per_forward(box_mask)

    def make(layer: int | None, unit_mask: torch.Tensor | None) -> HookFn:
        unit_where = None if unit_mask is None else _on_axis(unit_mask, site, site.unit, False)

        def hook(act: torch.Tensor, hook: Any) -> torch.Tensor:
            where = torch.ones((1,) * act.dim(), dtype=torch.bool, device=act.device)
            if unit_where is not None:
                if unit_where.numel() != act.shape[1 + site.axes.index(site.unit)]:
                    raise ValueError(
                        f"{hook.name}: the selection has {unit_where.numel()} {site.unit}s, the "
                        f"activation {act.shape[1 + site.axes.index(site.unit)]}"
                    )
                where = where & unit_where.to(act.device)
            if tokens is not None:
                where = where & tokens(hook).to(act.device)
            if positions is not None:
                width = act.shape[1 + site.axes.index("position")]
                mask = _positions_mask(positions, width, act.device)
                where = where & _on_axis(mask, site, "position", False)
            return action.apply(act, where, hook, layer)

        return hook

    return [(site.hook_name(layer), make(layer, mask)) for layer, mask in per_layer.items()]
