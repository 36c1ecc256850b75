"""Replication: the same diagnostics and layer profiles for other models side by side."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from analyses.axioms.diagnostics import (
    build_sets,
    compute_diagnostic,
    diagnostic_frame,
    idf_statistics,
    require_cross_encoder,
)
from analyses.axioms.knockouts import compute_components
from mechir.lazy import lazy_import
from mechir.store import decode_array

pd = lazy_import("pandas")
torch = lazy_import("torch")
plots = lazy_import("analyses.plots")


def compute_replicate(
    model_name: str, collection: Any, candidates: Sequence[Any], args: argparse.Namespace
) -> dict[str, Any]:
    """Agreement with every axiom and the TFC1 layer profile (attention / MLP knockouts) of
    another model, built with its own tokenizer and embeddings."""
    from mechir import load_cross_encoder
    from patching.axioms import agreement, axiom_scores

    model = load_cross_encoder(model_name, device=args.device)
    require_cross_encoder(model.family, model_name)
    stats = idf_statistics(args, collection, candidates)
    sets = build_sets(model, collection, candidates, stats, args)
    out: dict[str, Any] = {
        "model": model_name,
        "family": model.family.name,
        "n_layers": model.cfg.n_layers,
        "agreement": {},
        "profile": {},
    }
    for ax, dset in sets.items():
        if dset.pairs:
            out["agreement"][ax] = agreement(axiom_scores(model, dset, batch_size=args.batch_size))
    first = next((d for d in sets.values() if d.pairs and d.axiom == "TFC1"), None)
    if first is not None:
        base = compute_diagnostic(model, _first(first, args.component_pairs), args)
        base_gap = float(diagnostic_frame(base).gap.mean())
        for layer in range(model.cfg.n_layers):
            row = compute_components(model, first, layer, args)
            out["profile"][layer] = {
                k: float(decode_array(row[k]).mean()) - base_gap for k in ("attention", "mlp")
            }
    return out


def _first(dset: Any, n: int) -> Any:
    from patching.axioms import DiagnosticSet

    return DiagnosticSet(dset.axiom, dset.pairs[:n], {})
