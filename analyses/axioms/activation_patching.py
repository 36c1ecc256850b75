"""Activation patching of the aligned axioms: blocks, heads, positions, patterns, head -> [CLS]
paths."""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np

from mechir.interface import HookedReranker
from mechir.lazy import lazy_import
from mechir.store import decode_array, encode_array

pd = lazy_import("pandas")
torch = lazy_import("torch")
plots = lazy_import("analyses.plots")


def encode_result(result: Any) -> dict[str, Any]:
    return {
        "target": result.target,
        "dims": list(result.dims),
        "coords": {k: list(v) for k, v in result.coords.items()},
        "patched": encode_array(result.patched.float().numpy()),
        "clean": result.clean.tolist(),
        "corrupted": result.corrupted.tolist(),
        "pair_ids": list(result.pair_ids),
        "grades": list(result.grades),
        "method": result.method,
    }


def decode_result(row: dict[str, Any]) -> Any:
    from patching import PatchingResult

    return PatchingResult(
        target=row["target"],
        dims=tuple(row["dims"]),
        coords={k: list(v) for k, v in row["coords"].items()},
        patched=torch.from_numpy(decode_array(row["patched"])),
        clean=torch.tensor(row["clean"]),
        corrupted=torch.tensor(row["corrupted"]),
        pair_ids=list(row["pair_ids"]),
        grades=list(row["grades"]),
        method=row["method"],
    )


def patch_pairs(model: HookedReranker, dset: Any, n: int | None) -> Any:
    from patching.axioms import DiagnosticSet

    return DiagnosticSet(dset.axiom, dset.pairs[:n], {}).aligned(model.tokenizer)


def compute_patching(
    model: HookedReranker, pairs: Any, analysis: str, args: argparse.Namespace
) -> dict:
    """One patching analysis of one axiom's aligned pairs (see the module docstring)."""
    from patching import head_target, patch_sweep, patch_top_cells, resid_target
    from patching.semantic_bm25 import cls_path_patch

    budget = dict(batch_size=None, memory_budget=args.memory_budget)
    quiet = budget | {"progress": False}
    if analysis == "heads" and args.guided_k:
        try:
            top = patch_top_cells(
                model, pairs, head_target(), k=args.guided_k, average=True,
                min_delta=args.min_delta, memory_budget=args.memory_budget, progress=False,
            )  # fmt: skip
        except ValueError:  # no pair with |clean - corrupted| >= min_delta: nothing to rank
            top = None
        if top is not None:
            heads = [f"{layer}/{head}" for layer, head in top.top_labels(0)]
            exact = patch_sweep(model, pairs, head_target(heads=heads), **quiet)
            return {"guided": heads, "n_rows": int(top.n_rows), "result": encode_result(exact)}
    if analysis == "heads":  # every head (also when guided patching found nothing to rank)
        result = patch_sweep(model, pairs, head_target(), **quiet)
    elif analysis.startswith("block:"):
        component = analysis.split(":", 1)[1]
        result = patch_sweep(model, pairs, resid_target(component, by="part"), **quiet)
    elif analysis.startswith("ffn:"):
        component = analysis.split(":", 1)[1]
        result = patch_sweep(model, pairs, resid_target(component, by="all"), **quiet)
    elif analysis == "position":
        sub = pairs[: args.position_pairs]
        result = patch_sweep(model, sub, resid_target("resid_pre", by="position"), **quiet)
    elif analysis == "cls_path":
        result = cls_path_patch(model, pairs, freeze_mlps=args.freeze_mlps, **budget)
    else:
        raise ValueError(f"unknown patching analysis {analysis!r}")
    return {"result": encode_result(result)}


def compute_pattern(
    model: HookedReranker, pairs: Any, heads: list[str], args: argparse.Namespace
) -> dict:
    from patching import patch_sweep, pattern_target

    sub = pairs[: args.position_pairs]
    result = patch_sweep(
        model, sub, pattern_target(heads=heads), memory_budget=args.memory_budget, progress=False
    )
    return {"heads": heads, "result": encode_result(result)}


def top_heads(result: Any, n: int, min_delta: float) -> list[str]:
    """The ``n`` heads of a (layer, head) result with the largest ``|mean metric|``."""
    mean = result.mean(min_delta).numpy()
    flat = [
        (abs(float(mean[i, j])), i, j)
        for i in range(mean.shape[0])
        for j in range(mean.shape[1])
        if np.isfinite(mean[i, j])
    ]
    flat.sort(key=lambda t: (-t[0], t[1], t[2]))
    return [f"{i}/{j}" for _, i, j in flat[:n]]
