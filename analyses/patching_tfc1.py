"""Activation patching of TFC1 (and TDC) pairs: where does a cross-encoder compute the effect of
an extra query term in the document? ("Axiomatic Causal Interventions for Reverse Engineering
Relevance Computation in Neural Retrieval Models"; MechIR's patching experiments.)

Every first-stage candidate becomes a clean/corrupted pair with :class:`patching.PairBuilder`:
TFC1 appends a query term to the document (clean) or as many filler tokens (corrupted); TDC
appends the query term of highest IDF (clean) or of lowest IDF (corrupted). Head outputs
(layer x head) and the residual stream (layer x part, or x position) are patched from the clean
run into the corrupted run with :func:`patching.patch_sweep`; the metric
``(patched - corrupted) / (clean - corrupted)`` is averaged over pairs and per relevance grade
(pairs whose clean and corrupted scores barely differ are excluded and counted). Attribution
patching (:func:`patching.attribution_patch`, the gradient approximation) runs on the same cells
and is compared with exact patching (:func:`patching.attribution_vs_exact`).

Units of work: one chunk of pairs x one target (exact and attribution patching together).
Example::

    python -m analyses.patching_tfc1 --model ../shared/models/minilm-l6-ce-scifact \\
        --dataset ../shared/data/scifact --split quick --depth 20 --max-length 160 \\
        --limit-queries 10 --depth 5
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any, cast

import numpy as np

from analyses.axioms.activation_patching import encode_result
from analyses.base import Study, Unit, UsageError
from analyses.common import candidate_pairs
from analyses.summary import Summary
from mechir import outputs
from mechir.cli_common import nonnegative_float, positive_float
from mechir.interface import HookedReranker, PromptReranker
from mechir.lazy import lazy_import
from mechir.store import decode_array

pd = lazy_import("pandas")
torch = lazy_import("torch")
plots = lazy_import("analyses.plots")

TARGETS = ("heads", "resid_pre", "attn_out", "mlp_out")


# ---------------------------------------------------------------------- pairs and targets
def build_pairs(
    model: HookedReranker, collection: Any, args: argparse.Namespace
) -> tuple[Any, dict]:
    """``(AlignedPairs, skipped)`` of the candidates under the perturbation."""
    from patching import PairBuilder, TermStatistics

    candidates = candidate_pairs(args, collection)
    stats = None
    if args.perturbation == "tdc" or args.term_choice in ("max_idf", "min_idf"):
        docs = (
            collection.docs.values()
            if args.idf_from == "corpus"
            else {p.docid: p.document for p in candidates}.values()
        )
        stats = TermStatistics.from_documents(docs)
    prompt = cast(PromptReranker, model) if model.abilities.prompt else None
    builder = PairBuilder(
        model.tokenizer,
        max_length=args.max_length or model.max_length,
        filler=args.filler,
        stats=stats,
        choose=args.term_choice,
        seed=args.seed,
        n_special=prompt.n_special if prompt else None,  # a prompt-based reranker's template
        tokenize=prompt.field_tokens if prompt else None,  # its prompt's fields
    )
    position: Any = int(args.position) if args.position.lstrip("-").isdigit() else args.position
    built = builder.build(
        candidates, args.perturbation, qrels=collection.qrels, errors="skip", position=position
    )
    if not built.pairs:
        raise UsageError(
            f"no {args.perturbation} pair could be built ({len(built.skipped)} skipped, e.g. "
            f"{next(iter(built.skipped.values()), '')})"
        )
    pairs = built.pairs[: args.max_pairs] if args.max_pairs else built.pairs
    from patching import AlignedPairs

    return AlignedPairs.from_pairs(pairs, model.tokenizer, model=model), built.skipped


def make_target(name: str, args: argparse.Namespace) -> Any:
    from patching import head_target, resid_target

    if name == "heads":
        return head_target(by="all")
    return resid_target(name, by=args.resid_by)


def plan_units(n_pairs: int, args: argparse.Namespace) -> list[Unit]:
    units = []
    for target in args.targets:
        for i, start in enumerate(range(0, n_pairs, args.unit_pairs)):
            stop = min(n_pairs, start + args.unit_pairs)
            units.append(
                Unit(f"{target}:{i}", f"{target} pairs {start}-{stop - 1}", (target, start, stop))
            )
    return units


def compute_unit(
    model: HookedReranker, pairs: Any, args: argparse.Namespace, unit: Unit
) -> dict[str, Any]:
    """Exact and attribution patching of one chunk of pairs on one target."""
    from patching import attribution_patch, patch_sweep

    name, start, stop = unit.spec
    chunk = pairs[start:stop].to(model.cfg.device)
    target = make_target(name, args)
    exact = patch_sweep(model, chunk, target, memory_budget=args.memory_budget)
    approx = attribution_patch(model, chunk, target, batch_size=args.batch_size)
    return {"exact": encode_result(exact), "attribution": encode_result(approx)}


def merge_results(rows: Sequence[dict[str, Any]]) -> Any:
    """One :class:`patching.PatchingResult` from the chunks' results (position grids padded
    with NaN to the widest chunk)."""
    from patching import PatchingResult

    dims = tuple(rows[0]["dims"])
    coords = {k: list(v) for k, v in rows[0]["coords"].items()}
    arrays = [decode_array(r["patched"]) for r in rows]
    if "position" in dims:
        axis = 1 + dims.index("position")
        width = max(a.shape[axis] for a in arrays)
        padded = []
        for a in arrays:
            pad = [(0, 0)] * a.ndim
            pad[axis] = (0, width - a.shape[axis])
            padded.append(np.pad(a, pad, constant_values=np.nan))
        arrays = padded
        coords["position"] = list(range(width))
    return PatchingResult(
        target=rows[0]["target"],
        dims=dims,
        coords=coords,
        patched=torch.from_numpy(np.concatenate(arrays)),
        clean=torch.tensor([x for r in rows for x in r["clean"]]),
        corrupted=torch.tensor([x for r in rows for x in r["corrupted"]]),
        pair_ids=[x for r in rows for x in r["pair_ids"]],
        grades=[x for r in rows for x in r["grades"]],
        method=rows[0]["method"],
    )


# ---------------------------------------------------------------------- the study
class PatchingTFC1(Study):
    name = "patching_tfc1"
    work_options = ("min_delta",)

    @classmethod
    def add_options(cls, p: argparse.ArgumentParser) -> None:
        g = p.add_argument_group("pairs")
        g.add_argument("--perturbation", choices=["tfc1", "tdc"], default="tfc1")
        g.add_argument(
            "--term-choice",
            choices=["random", "first", "max_idf", "min_idf"],
            default="random",
            help="TFC1: which query term is appended (random: seeded per pair)",
        )
        g.add_argument("--position", default="end", help="where the term goes: end, start or index")
        g.add_argument("--filler", default="a", help="TFC1 filler token of the corrupted document")
        g.add_argument(
            "--idf-from",
            choices=["corpus", "candidates"],
            default="corpus",
            help="documents of the IDF statistics (TDC, max_idf/min_idf): the whole corpus or the "
            "candidate documents only",
        )
        g.add_argument("--max-pairs", type=int, default=None, help="at most this many pairs")
        t = p.add_argument_group("patching")
        t.add_argument(
            "--targets",
            nargs="+",
            choices=TARGETS,
            default=["heads", "resid_pre"],
            help="heads: head outputs per layer x head; resid_pre / attn_out / mlp_out per layer x "
            "part (or position, --resid-by)",
        )
        t.add_argument("--resid-by", choices=["part", "position"], default="part")
        t.add_argument("--unit-pairs", type=int, default=16, help="pairs per unit of work")
        t.add_argument(
            "--memory-budget",
            type=positive_float,
            default=2**30,
            help="bytes of one expanded forward pass",
        )
        t.add_argument(
            "--min-delta",
            type=nonnegative_float,
            default=1e-3,
            help="pairs with |clean - corrupted| below this are excluded (summary option)",
        )

    def check(self) -> None:
        args = self.args
        if args.unit_pairs < 1 or (args.max_pairs is not None and args.max_pairs < 1):
            raise UsageError("--unit-pairs and --max-pairs must be >= 1")

    def plan(self) -> list[Unit]:
        # the model's tokenizer builds the pairs, so the model is always loaded
        self.pairs, self.skipped = build_pairs(self.model, self.collection, self.args)
        self.units = plan_units(len(self.pairs), self.args)
        return self.units

    def compute(self, unit: Unit) -> dict[str, Any]:
        return compute_unit(self.model, self.pairs, self.args, unit)

    def summarize(self) -> Summary:
        return summarize(self)


build_parser = PatchingTFC1.parser
main = PatchingTFC1.main


# ---------------------------------------------------------------------- summary
def _grade_table(result: Any, min_delta: float) -> pd.DataFrame:
    delta = (result.clean - result.corrupted).double().numpy()
    grades = np.array([-1 if g is None else g for g in result.grades])
    rows = []
    for g in sorted(set(grades.tolist())):
        sel = grades == g
        d = delta[sel]
        rows.append(
            {
                "grade": "unjudged" if g == -1 else g,
                "pairs": int(sel.sum()),
                "mean clean": float(result.clean.numpy()[sel].mean()),
                "mean corrupted": float(result.corrupted.numpy()[sel].mean()),
                "mean Δ (clean - corrupted)": float(d.mean()),
                "share Δ > 0": float((d > 0).mean()),
                "excluded (|Δ| < min)": int((np.abs(d) < min_delta).sum()),
            }
        )
    return pd.DataFrame(rows)


def summarize(study: PatchingTFC1) -> Summary:
    """Write the patching tables and heatmaps of a finished run; its summary."""
    from patching import attribution_vs_exact, plot_patching

    run, units, n_pairs, skipped = study.run, study.units, len(study.pairs), study.skipped
    args, out = run.args, run.output
    s = Summary(
        f"Activation patching of {args.perturbation.upper()} pairs",
        "Clean = document with the added query term, corrupted = "
        + (
            "with as many filler tokens"
            if args.perturbation == "tfc1"
            else "with the lowest-IDF query term"
        )
        + "; metric = (patched - corrupted) / (clean - corrupted): 1 means the patched "
        "component alone restores the clean score.",
    )
    s.heading("Setting")
    s.facts(
        study.setting()
        | {
            "pairs": n_pairs,
            "candidates skipped (could not be aligned)": len(skipped),
            "perturbation": f"{args.perturbation}, term choice {args.term_choice}, position "
            f"{args.position}",
            "max length": args.max_length or "model maximum",
            "excluded pairs": f"|clean - corrupted| < {args.min_delta}",
        }
    )
    if skipped:
        outputs.write_csv(
            pd.DataFrame(sorted(skipped.items()), columns=["pair", "reason"]), out / "skipped.csv"
        )
    comparisons = []
    first = True
    for target in args.targets:
        rows = [run.store.get(u.id) for u in units if u.spec[0] == target]
        exact = merge_results([r["exact"] for r in rows])
        approx = merge_results([r["attribution"] for r in rows])
        if first:
            s.heading("Score change per relevance grade")
            s.table(_grade_table(exact, args.min_delta), None, ".4f")
            first = False
        frame = pd.concat(
            [exact.to_frame(args.min_delta), approx.to_frame(args.min_delta)], ignore_index=True
        )
        outputs.write_csv(frame, out / f"{target}.csv.gz")
        s.heading(f"{target}: {exact.target}")
        for result, kind in ((exact, "exact"), (approx, "attribution")):
            fig = plot_patching(result, min_delta=args.min_delta)
            path = out / f"heatmap_{target}_{kind}.png"
            outputs.save_figure(fig, path, dpi=plots.DPI, bbox_inches="tight")
            s.image(path.name, f"{target}, {kind} patching: mean metric, all pairs and per grade")
        mean = exact.mean(args.min_delta).numpy()
        if mean.ndim == 2:
            rows_, cols_ = (exact.coords[d] for d in exact.dims)
            label = "/".join(exact.dims)
            flat = pd.DataFrame(
                [
                    {label: f"{rows_[i]}/{cols_[j]}", "mean metric": float(mean[i, j])}
                    for i in range(mean.shape[0])
                    for j in range(mean.shape[1])
                    if np.isfinite(mean[i, j])
                ]
            )
            if flat.empty:  # every pair excluded: no mean to rank (say why, not a KeyError)
                s.paragraph(
                    f"No cell to rank: no pair changes the score by --min-delta {args.min_delta:g}"
                    " or more between the clean and the corrupted input."
                )
            else:
                top = flat.reindex(flat["mean metric"].abs().sort_values(ascending=False).index)
                s.table(top.head(10), f"top cells ({label}) by |mean metric|", "+.4f")
        comparison = {
            "target": target,
            **attribution_vs_exact(approx, exact, min_delta=args.min_delta),
        }
        comparisons.append(comparison)
    s.heading("Attribution patching vs exact patching")
    s.paragraph(
        "Correlation of the per-(pair, cell) effects (patched - corrupted) and of the mean metric "
        "per cell between the gradient approximation and exact patching."
    )
    table = pd.DataFrame(comparisons)
    outputs.write_csv(table, out / "attribution_vs_exact.csv")
    s.table(table, None, {"n_pairs": "d", "n_values": "d"} | {c: ".4f" for c in table.columns[3:]})
    s.paragraph(
        "Files: `<target>.csv.gz` (tidy: pair, grade, method, cell, metric, scores), "
        "`attribution_vs_exact.csv`, `results.jsonl`" + (", `skipped.csv`" if skipped else "") + "."
    )
    return s


if __name__ == "__main__":
    raise SystemExit(main())
