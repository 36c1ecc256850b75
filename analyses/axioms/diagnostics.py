"""Diagnostic sets of the IR axioms (:mod:`patching.axioms`): building them, and the model's
agreement with each."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from analyses.common import require_family
from mechir.interface import HookedReranker
from mechir.lazy import lazy_import
from mechir.store import decode_array, encode_array

pd = lazy_import("pandas")
torch = lazy_import("torch")
plots = lazy_import("analyses.plots")


AXIOM_NAMES = ("TFC1", "TFC2", "STMC1", "LNC1", "LNC2")
ALIGNED = ("TFC1", "TFC2", "STMC1")
BLOCKS = ("resid_pre", "attn_out", "mlp_out")
BASELINE = "rerank:baseline"
#: The study's name and what it needs of a model (:attr:`analyses.base.Study.needs`).
STUDY = "axioms"
NEEDS = ("cross_encoder",)


def idf_statistics(args: argparse.Namespace, collection: Any, candidates: Sequence[Any]) -> Any:
    from patching import TermStatistics

    if args.idf_from == "corpus":
        return TermStatistics.from_documents(collection.docs.values())
    return TermStatistics.from_documents({p.docid: p.document for p in candidates}.values())


def require_cross_encoder(family: Any, name: str) -> None:
    """The study reads a cross-encoder's [CLS] token, its pair layout and its embedding
    matrix: prompt-based rerankers (MonoT5, LLM rerankers) are refused in one line
    (:func:`analyses.common.require_family`; ``family`` None: checked again once loaded)."""
    require_family(family, name, STUDY, NEEDS)


def build_sets(
    model: HookedReranker,
    collection: Any,
    candidates: Sequence[Any],
    stats: Any,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """``{axiom: DiagnosticSet}`` for ``args.axioms`` (deterministic: seeded choices)."""
    from patching import PairBuilder
    from patching.axioms import AxiomBuilder, EmbeddingNeighbours

    tok = model.tokenizer
    max_length = min(args.max_length or model.max_length, model.max_length)
    builder = PairBuilder(
        tok,
        max_length=max_length,
        filler=args.filler,
        stats=stats,
        choose=args.term_choice,
        seed=args.seed,
    )
    neighbours = None
    if "STMC1" in args.axioms:
        neighbours = EmbeddingNeighbours(
            model.embed.embed.W_E, tok, vocabulary=sorted(stats.idf), stats=stats
        )
    axioms = AxiomBuilder(builder, neighbours=neighbours, copies=args.lnc2_copies)
    return {
        ax: axioms.build(candidates, ax, qrels=collection.qrels, limit=args.max_pairs)
        for ax in args.axioms
    }


def compute_diagnostic(
    model: HookedReranker, dset: Any, args: argparse.Namespace
) -> dict[str, Any]:
    from patching.axioms import axiom_scores

    if not dset.pairs:
        return {"axiom": dset.axiom, "skipped": len(dset.skipped), "scores": None}
    frame = axiom_scores(model, dset, batch_size=args.batch_size)
    return {
        "axiom": dset.axiom,
        "skipped": len(dset.skipped),
        "scores": {
            "pair_id": frame.pair_id.tolist(),
            "grade": [p.grade for p in dset.pairs],
            **{c: encode_array(frame[c].to_numpy()) for c in ("higher", "lower", "base", "gap")},
        },
    }


def diagnostic_frame(row: dict[str, Any]) -> pd.DataFrame:
    """The stored scores of one axiom as :func:`patching.axioms.axiom_scores`' table."""
    s = row["scores"]
    if s is None:
        return pd.DataFrame(columns=["pair_id", "grade", "higher", "lower", "base", "gap"])
    frame = pd.DataFrame({"pair_id": s["pair_id"], "grade": s["grade"]})
    for c in ("higher", "lower", "base", "gap"):
        frame[c] = decode_array(s[c])
    strict = row["axiom"] in ALIGNED
    frame["agrees"] = frame.gap > 0 if strict else frame.gap >= 0
    return frame
