"""NIG neuron sets of one half of the queries, ablated on the other half."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from mechir.interface import HookedReranker
from mechir.lazy import lazy_import
from mechir.store import decode_array, encode_array

pd = lazy_import("pandas")
torch = lazy_import("torch")
plots = lazy_import("analyses.plots")


def nig_split(candidates: Sequence[Any]) -> tuple[list[Any], list[Any]]:
    """Candidates of every other query (attribution split A) and of the rest (split B)."""
    qids = list(dict.fromkeys(p.qid for p in candidates))
    a = set(qids[0::2])
    return [p for p in candidates if p.qid in a], [p for p in candidates if p.qid not in a]


def compute_nig(
    model: HookedReranker, pairs: Sequence[Any], qrels: Any, args: argparse.Namespace
) -> dict:
    """Mean NIG attributions (score target) of split A's relevant candidates (all, if none)."""
    from mechir.attribution import mean_neuron_attributions, pair_batches

    relevant = [p for p in pairs if qrels.get(p.qid, {}).get(p.docid, 0) >= 1] or list(pairs)
    chosen = relevant[: args.nig_pairs]
    means = mean_neuron_attributions(
        model,
        pair_batches(model, chosen, batch_size=args.batch_size or 4, max_length=args.max_length),
        n_steps=args.nig_steps,
    )
    return {
        "pairs": len(chosen),
        "layers": means.layers,
        "mean": encode_array(means.means["all"].mean.float().numpy()),
    }


def nig_selection(row: dict[str, Any], n_layers: int, args: argparse.Namespace) -> tuple:
    from mechir.attribution import random_control, top_neurons

    scores = torch.from_numpy(decode_array(row["mean"])).float()
    sel = top_neurons(
        scores, args.nig_percent, sign="positive", layers=row["layers"], n_layers=n_layers,
        label=f"NIG top {args.nig_percent:g}% (split A)",
    )  # fmt: skip
    return sel, random_control(sel, args.seed)
