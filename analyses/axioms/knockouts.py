"""Per-layer knockouts: every layer's attention (all heads) or MLP zeroed, per axiom."""

from __future__ import annotations

import argparse
from typing import Any

from mechir.interface import HookedReranker
from mechir.lazy import lazy_import
from mechir.store import encode_array

pd = lazy_import("pandas")
torch = lazy_import("torch")
plots = lazy_import("analyses.plots")


def knockout_hooks(model: HookedReranker, layer: int, kind: str) -> Any:
    """Zero every head of ``layer`` (``hook_z``) or its MLP output (``hook_mlp_out``)."""
    from mechir.hooks import SITES, site_hooks
    from mechir.hooks.site import Zero

    site = "z" if kind == "attention" else "mlp_out"
    return site_hooks(model, SITES[site], action=Zero(), layers=[layer])


def compute_components(
    model: HookedReranker, dset: Any, layer: int, args: argparse.Namespace
) -> dict[str, Any]:
    """The axiom's per-pair gap with layer ``layer``'s attention or MLP knocked out."""
    from patching.axioms import DiagnosticSet, axiom_scores

    sub = DiagnosticSet(dset.axiom, dset.pairs[: args.component_pairs], {})
    out: dict[str, Any] = {"axiom": dset.axiom, "layer": layer}
    if not sub.pairs:
        return out | {"attention": None, "mlp": None}
    for kind in ("attention", "mlp"):
        hooks = knockout_hooks(model, layer, kind)
        frame = axiom_scores(model, sub, batch_size=args.batch_size, hooks=hooks)
        out[kind] = encode_array(frame.gap.to_numpy())
    return out
