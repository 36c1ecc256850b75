"""Seed checks: matching heads (the top ones, random controls) and their QK directions."""

from __future__ import annotations

import argparse
import random
from collections.abc import Sequence
from typing import Any

from mechir.interface import HookedReranker
from mechir.lazy import lazy_import

pd = lazy_import("pandas")
torch = lazy_import("torch")
plots = lazy_import("analyses.plots")


def matching_head_list(
    model: HookedReranker, collection: Any, args: argparse.Namespace
) -> dict[str, Any]:
    """The top ``--top-heads`` matching heads (``|Delta|`` of max Q->D attention, relevant vs
    negatives: :func:`mechir.matching.matching_heads`), or ``--matching-heads``."""
    if args.matching_heads:
        return {"heads": list(args.matching_heads), "source": "--matching-heads"}
    from mechir.data import matching_pairs
    from mechir.matching import matching_head_labels, matching_heads

    pairs = matching_pairs(
        collection,
        query_ids=collection.query_ids(args.limit_queries),
        max_relevant=5,
        max_hard=5,
        seed=args.seed,
    )
    deltas, _ = matching_heads(
        model, pairs, max_length=args.max_length, batch_size=args.batch_size, threshold=0.0
    )
    negative = "easy_negative" if "easy_negative" in set(deltas.negative) else "hard_negative"
    labels = matching_head_labels(deltas, statistic="qd_max", negative=negative, threshold=0.0)
    return {"heads": labels[: args.top_heads], "source": f"qd_max Delta vs {negative}"}


def random_heads(heads: Sequence[str], shape: dict[str, int], seed: int) -> list[str]:
    others = [
        f"{layer}/{h}"
        for layer in range(shape["n_layers"])
        for h in range(shape["n_heads"])
        if f"{layer}/{h}" not in heads
    ]
    rng = random.Random(f"{seed}:axioms:random-heads")
    picked = rng.sample(others, min(len(heads), len(others)))
    return sorted(picked, key=lambda s: tuple(int(x) for x in s.split("/")))


def qk_directions(spec: str, model: HookedReranker, heads: Sequence[str]) -> Any:
    """``"all"`` or ``"top:K"`` (the K largest singular directions) for every head."""
    if spec == "all":
        return "all"
    k = int(spec.split(":", 1)[1])
    return list(range(min(k, model.cfg.d_head)))
