"""The one selection grammar of mechir: layers, heads and neurons, validated against a model.

Every hook factory, patch target, circuit, matching statistic, attribution and study option
goes through these functions, so every form below is accepted everywhere (or rejected
everywhere with the same message), and an empty selection is always an error.

Layers (:func:`select_layers`): ``None`` or ``"all"`` (every layer), an ``int``, or an iterable
of ints (a ``range``, a list, ...). Floats and bools are rejected (``2.7`` is not a layer).

Heads (:func:`select_heads`), 0-indexed as the papers write them:

- ``"l/h"`` (``"15/13"``), TransformerLens's ``"LlHh"`` (``"L15H13"``, as
  ``model.all_head_labels()`` returns), or a ``(layer, head)`` tuple of two ints: one head;
- ``{layer: [head, ...]}`` (or ``{layer: head}``);
- a list of any of the above, and plain ints, which are head indices **in every layer of**
  ``layers`` (``heads=[0, 3], layers=[1, 2]`` is 1/0, 1/3, 2/0, 2/3);
- ``None``: every head of ``layers`` (every layer when ``layers`` is None too).

A head named with its layer must lie in ``layers`` when ``layers`` is given (otherwise the
selection would silently be empty).

Neurons (:func:`select_neurons`): ``{layer: [index, ...]}`` or a ``[n_layers, d_mlp]`` bool mask.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Iterable, Mapping
from typing import Any

from jaxtyping import Bool

from mechir.lazy import lazy_import

torch = lazy_import("torch")

Head = tuple[int, int]
HeadLike = Head | str
LayerSelection = int | Iterable[int] | str | None
HeadSelection = HeadLike | Iterable[HeadLike | int] | Mapping[int, Any] | None

_TL_HEAD = re.compile(r"^L(\d+)H(\d+)$")
_PAPER_HEAD = re.compile(r"^(\d+)/(\d+)$")


def _cfg(model_or_cfg: Any) -> Any:
    return getattr(model_or_cfg, "cfg", model_or_cfg)


def _index(value: Any, what: str) -> int:
    """``value`` as an int, rejecting bools, floats and strings with a message naming it."""
    if isinstance(value, bool):
        raise ValueError(f"{what} must be an int, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError(f"{what} must be an int, got {value!r}") from None


def check_layer(model_or_cfg: Any, layer: Any) -> int:
    """``layer`` as an int if the model has it, else a ``ValueError`` that gives the range."""
    n = _cfg(model_or_cfg).n_layers
    layer = _index(layer, "layer")
    if not 0 <= layer < n:
        raise ValueError(f"layer {layer} out of range: model has {n} layers (0-{n - 1})")
    return layer


def select_layers(
    model_or_cfg: Any, layers: LayerSelection, *, allow_empty: bool = False
) -> list[int]:
    """Sorted unique layers; ``None`` or ``"all"`` is every layer.

    Raises:
        ValueError: a non-int, an out-of-range layer, or an empty selection.
    """
    n = _cfg(model_or_cfg).n_layers
    if layers is None or (isinstance(layers, str) and layers.strip().lower() == "all"):
        return list(range(n))
    if isinstance(layers, str):
        raise ValueError(f"layer selection {layers!r}: use 'all', an int or a list of ints")
    if not isinstance(layers, Iterable):
        layers = [layers]
    out = sorted({check_layer(model_or_cfg, layer) for layer in layers})
    if not out and not allow_empty:
        raise ValueError("empty layer selection: name at least one layer (or pass None for all)")
    return out


def parse_head(head: Any) -> Head:
    """``(layer, head)`` from ``"15/13"``, ``"L15H13"`` or ``(15, 13)`` (no range check)."""
    if isinstance(head, str):
        text = head.strip()
        match = _PAPER_HEAD.match(text) or _TL_HEAD.match(text)
        if match is None:
            raise ValueError(
                f"head label {head!r} is not of the form 'layer/head' (e.g. '15/13') or "
                "'LlayerHhead' (e.g. 'L15H13')"
            )
        return int(match.group(1)), int(match.group(2))
    if isinstance(head, (tuple, list)) and len(head) == 2:
        return _index(head[0], f"layer in head {head!r}"), _index(head[1], f"head in {head!r}")
    raise ValueError(
        f"cannot read {head!r} as a head: use 'l/h', 'LlHh', (layer, head) or {{layer: [heads]}}"
    )


def _is_head_pair(value: Any) -> bool:
    """A ``(layer, head)`` tuple of two ints (a tuple of labels is a list of heads)."""
    return (
        isinstance(value, tuple)
        and len(value) == 2
        and all(not isinstance(v, (str, bool)) and hasattr(v, "__index__") for v in value)
    )


def head_label(layer: int, head: int) -> str:
    """The papers' label of a head: ``head_label(15, 13) == "15/13"``."""
    return f"{layer}/{head}"


def _check_head(cfg: Any, layer: int, head: int, item: Any) -> Head:
    check_layer(cfg, layer)
    if not 0 <= head < cfg.n_heads:
        raise ValueError(
            f"head {head} out of range in {item!r}: model has {cfg.n_heads} heads per layer "
            f"(0-{cfg.n_heads - 1})"
        )
    return layer, head


def select_heads(
    model_or_cfg: Any,
    heads: HeadSelection,
    *,
    layers: LayerSelection = None,
    allow_empty: bool = False,
) -> list[Head]:
    """Sorted unique ``(layer, head)`` pairs of a head selection (see the module doc).

    Raises:
        ValueError: an unreadable form, a head or layer out of range, a head outside ``layers``,
            a bare head index without ``layers``, or an empty selection.
    """
    cfg = _cfg(model_or_cfg)
    layer_list = None if layers is None else select_layers(cfg, layers)
    out: set[Head] = set()
    if heads is None:
        for layer in layer_list if layer_list is not None else range(cfg.n_layers):
            out.update((layer, h) for h in range(cfg.n_heads))
        return sorted(out)
    if isinstance(heads, str) or _is_head_pair(heads):
        items: list[Any] = [heads]
    elif isinstance(heads, Mapping):
        items = []
        for layer, hs in heads.items():
            hs = [hs] if not isinstance(hs, Iterable) or isinstance(hs, str) else list(hs)
            items.extend((layer, h) for h in hs)
    elif isinstance(heads, Iterable):
        items = list(heads)
    else:
        items = [heads]
    for item in items:
        if isinstance(item, bool) or (not isinstance(item, (str, tuple, list))):
            h = _index(item, "head index")
            if layer_list is None:
                raise ValueError(
                    f"head index {h} alone does not say its layer: pass layers=..., or name the "
                    "head as 'l/h', 'LlHh', (layer, head) or {layer: [heads]}"
                )
            out.update(_check_head(cfg, layer, h, item) for layer in layer_list)
            continue
        layer, h = parse_head(item)
        _check_head(cfg, layer, h, item)
        if layer_list is not None and layer not in layer_list:
            raise ValueError(
                f"head {head_label(layer, h)} is in layer {layer}, which is not among the "
                f"selected layers {layer_list}: add the layer or drop layers=..."
            )
        out.add((layer, h))
    if not out and not allow_empty:
        raise ValueError("empty head selection: name at least one head")
    return sorted(out)


def heads_by_layer(heads: Iterable[Head]) -> dict[int, list[int]]:
    """Group ``(layer, head)`` pairs by layer."""
    grouped: dict[int, list[int]] = {}
    for layer, h in heads:
        grouped.setdefault(layer, []).append(h)
    return {layer: sorted(set(hs)) for layer, hs in sorted(grouped.items())}


def select_neurons(
    model_or_cfg: Any,
    neurons: Mapping[int, Iterable[int]] | Bool[torch.Tensor, "n_layers d_mlp"],
    *,
    allow_empty: bool = False,
) -> Bool[torch.Tensor, "n_layers d_mlp"]:
    """A boolean ``[n_layers, d_mlp]`` mask from ``{layer: indices}`` or a mask (validated)."""
    cfg = _cfg(model_or_cfg)
    shape = (cfg.n_layers, cfg.d_mlp)
    if isinstance(neurons, torch.Tensor):
        if tuple(neurons.shape) != shape or neurons.dtype != torch.bool:
            raise ValueError(
                f"neuron mask must be a bool tensor of shape {shape}, got "
                f"{neurons.dtype} {tuple(neurons.shape)}"
            )
        mask = neurons.cpu().clone()
    elif isinstance(neurons, Mapping):
        mask = torch.zeros(shape, dtype=torch.bool)
        for layer, idx in neurons.items():
            layer = check_layer(cfg, layer)
            if isinstance(idx, torch.Tensor):
                idx = idx.flatten().tolist()
            idx = [_index(i, f"neuron index in layer {layer}") for i in idx]
            bad = [i for i in idx if not 0 <= i < cfg.d_mlp]
            if bad:
                raise ValueError(
                    f"neuron index out of range in layer {layer}: {bad[0]} (d_mlp is "
                    f"{cfg.d_mlp}: 0-{cfg.d_mlp - 1})"
                )
            mask[layer, idx] = True
    else:
        raise ValueError(
            f"cannot read {type(neurons).__name__} as a neuron selection: use {{layer: [indices]}} "
            f"or a bool mask of shape {shape}"
        )
    if not mask.any() and not allow_empty:
        raise ValueError("empty neuron selection: name at least one neuron")
    return mask


def __getattr__(name: str) -> Any:
    # ``NeuronSelection`` names torch.Tensor, so it is built on first use (torch loads lazily)
    if name == "NeuronSelection":
        return Mapping[int, Iterable[int]] | Bool[torch.Tensor, "n_layers d_mlp"]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
