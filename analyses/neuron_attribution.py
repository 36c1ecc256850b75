"""Neuron attribution: which FFN neurons carry a cross-encoder's relevance and non-relevance
decisions, are they shared across datasets, and does removing them hurt ranking more than
removing random neurons? ("Which Neurons Matter in IR?")

Neuron integrated gradients (:func:`mechir.attribution.neuron_integrated_gradients`, input path
by default) are averaged over relevant pairs (explaining the relevant class) and over
non-relevant pairs (explaining the non-relevant class) of one or more datasets. The top ``p`` %
neurons of all layers are selected per dataset and class
(:func:`mechir.attribution.top_neurons`), intersected and fused across datasets
(:func:`~mechir.attribution.intersect`, :func:`~mechir.attribution.fuse_scores`), and validated
by pruning (:func:`mechir.attribution.pruning_evaluation`): nDCG@10 of the candidates with the
selected neurons zeroed, against the unpruned model and random neurons with the same per-layer
counts, for every ``p`` (the pruning curve).

Units of work: one chunk of pairs of one dataset and class (their attribution sums), then one
pruned selection (with its random controls). Example::

    python -m analyses.neuron_attribution --model ../shared/models/minilm-l6-ce-scifact \\
        --dataset ../shared/data/scifact --split quick --depth 20 --max-length 160 \\
        --pairs-per-class 20 --n-steps 20
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from analyses.base import Stage, Study, Unit, UsageError
from analyses.common import slug
from analyses.summary import Summary
from mechir import outputs
from mechir.cli_common import percent, positive_float, steps_or_auto
from mechir.data import Pair, load_collection
from mechir.interface import HookedReranker
from mechir.lazy import lazy_import
from mechir.store import decode_array, encode_array

pd = lazy_import("pandas")
torch = lazy_import("torch")
plots = lazy_import("analyses.plots")

CLASSES = ("relevant", "non_relevant")
PRUNE_KINDS = ("relevant", "non_relevant", "fused", "intersection")


# ---------------------------------------------------------------------- pairs
def attribution_sources(args: argparse.Namespace) -> list[tuple[str, str | None]]:
    """``[(source, split)]`` of the attribution datasets."""
    if not args.attribution_datasets:
        return [(args.dataset, args.split)]
    out = []
    for item in args.attribution_datasets:
        source, _, split = item.partition("@")
        out.append((source, split or None))
    return out


def attribution_pairs(collection: Any, args: argparse.Namespace) -> dict[str, list[Pair]]:
    """Per class, the pairs to attribute: for each query in order, up to ``--per-query``
    documents judged >= ``--min-rel`` (relevant) and as many non-relevant ones (judged below,
    or unjudged first-stage documents), until ``--pairs-per-class`` pairs per class."""
    out: dict[str, list[Pair]] = {c: [] for c in CLASSES}
    for qid in collection.query_ids(args.attribution_queries):
        docs = {
            "relevant": collection.relevant(qid, args.min_rel)[: args.per_query],
            "non_relevant": collection.hard_negatives(qid, args.min_rel)[: args.per_query],
        }
        for cls in CLASSES:
            room = args.pairs_per_class - len(out[cls])
            out[cls] += [collection.pair(qid, d) for d in docs[cls][: max(0, room)]]
        if all(len(v) >= args.pairs_per_class for v in out.values()):
            break
    return out


def attribution_units(args: argparse.Namespace) -> tuple[list[Unit], dict[str, dict]]:
    """One unit per (dataset, class, chunk of ``--unit-pairs`` pairs)."""
    units, counts = [], {}
    for d, (source, split) in enumerate(attribution_sources(args)):
        name = _dataset_name(source, split)
        collection = load_collection(source, split=split)
        pairs = attribution_pairs(collection, args)
        counts[name] = {c: len(v) for c, v in pairs.items()}
        for cls in CLASSES:
            ps = pairs[cls]
            for i in range(0, len(ps), args.unit_pairs):
                chunk = ps[i : i + args.unit_pairs]
                units.append(
                    Unit(
                        f"nig:{d}:{cls}:{i // args.unit_pairs}",
                        f"{name} {cls} {i}",
                        (name, cls, chunk),
                    )
                )
    return units, counts


def _dataset_name(source: str, split: str | None) -> str:
    return slug(source) + (f"-{split}" if split else "")


def compute_attributions(
    model: HookedReranker, args: argparse.Namespace, unit: Unit
) -> dict[str, Any]:
    """Attribution sums of one chunk of pairs (exactly mergeable into dataset-class means)."""
    from mechir.attribution import mean_neuron_attributions, pair_batches

    name, cls, chunk = unit.spec
    target = args.relevant_target if cls == "relevant" else args.non_relevant_target
    means = mean_neuron_attributions(
        model,
        pair_batches(model, chunk, batch_size=args.batch_size, max_length=args.max_length),
        path=args.path,
        target=target,
        baseline=args.baseline,
        method=None if args.n_steps == "auto" else args.method,
        n_steps=args.n_steps,
        rtol=args.rtol,
        max_batch=args.max_batch,
        overlap_percent=min(args.percents),
    )
    acc = means.means["all"]
    return {
        "dataset": name,
        "class": cls,
        "pairs": [[p.qid, p.docid] for p in chunk],
        "layers": means.layers,
        "count": acc.count,
        "sum": encode_array(acc.sum.numpy()),
        "completeness_count": means.completeness.count,
        "completeness_abs_sum": encode_array(means.completeness.sum.numpy()),
        # per-example estimated relative error, top-p% overlap (n vs n/2 steps), path points
        "error_count": means.error.count,
        "error_sum": float(means.error.sum) if means.error.count else 0.0,
        "overlap_sum": float(means.overlap.sum) if means.overlap.count else 0.0,
        "points_sum": float(means.points.sum),
    }


def mean_scores(run: Any, units: list[Unit]) -> tuple[dict, dict, list[int]]:
    """``({(dataset, class): mean [layer, d_mlp]}, {(dataset, class): (count, mean |err|, mean
    estimated relative error, mean top-p% overlap, mean path points)}, layers)`` from the stored
    chunk sums (NaN where no unit estimated its error)."""
    sums: dict[tuple[str, str], np.ndarray] = {}
    counts: dict[tuple[str, str], int] = {}
    err: dict[tuple[str, str], list[float]] = {}
    estimates: dict[tuple[str, str], list[float]] = {}
    layers: list[int] = []
    for u in units:
        row = run.store.get(u.id)
        key = (row["dataset"], row["class"])
        s = decode_array(row["sum"]).astype(np.float64)
        sums[key] = sums[key] + s if key in sums else s
        counts[key] = counts.get(key, 0) + row["count"]
        c = decode_array(row["completeness_abs_sum"]).astype(np.float64)
        prev = err.get(key, [0.0, 0])
        err[key] = [prev[0] + float(c.mean()), prev[1] + row["completeness_count"]]
        acc = estimates.setdefault(key, [0, 0.0, 0.0, 0.0])
        for j, name in enumerate(("error_count", "error_sum", "overlap_sum", "points_sum")):
            acc[j] += row.get(name, 0)
        layers = row["layers"]
    means = {k: sums[k] / counts[k] for k in sums}
    quality = {
        k: (
            counts[k],
            err[k][0] / max(err[k][1], 1),
            estimates[k][1] / estimates[k][0] if estimates[k][0] else float("nan"),
            estimates[k][2] / estimates[k][0] if estimates[k][0] else float("nan"),
            estimates[k][3] / counts[k],
        )
        for k in sums
    }
    return means, quality, layers


# ---------------------------------------------------------------------- selections
def selections(
    means: dict, layers: list[int], n_layers: int, args: argparse.Namespace
) -> dict[tuple[str, float], Any]:
    """Every selection of the study: per (dataset, class) and per class fused / intersected
    across datasets, for every ``p``; keyed ``(name, p)``."""
    from mechir.attribution import fuse_scores, intersect, top_neurons

    out: dict[tuple[str, float], Any] = {}
    datasets = list(dict.fromkeys(d for d, _ in means))
    for p in args.percents:
        for (dataset, cls), scores in means.items():
            out[(f"{dataset}:{cls}", p)] = top_neurons(
                torch.from_numpy(scores).float(),
                p,
                sign=args.sign,
                layers=layers,
                n_layers=n_layers,
                label=f"{dataset} {cls} top {p:g}%",
            )
        if len(datasets) > 1:
            for cls in CLASSES:
                per = [out[(f"{d}:{cls}", p)] for d in datasets if (d, cls) in means]
                out[(f"intersection:{cls}", p)] = intersect(per, label=f"{cls} ∩ datasets {p:g}%")
                fused = fuse_scores(
                    [torch.from_numpy(means[(d, cls)]).float() for d in datasets], normalize=True
                )
                out[(f"fused:{cls}", p)] = top_neurons(
                    fused,
                    p,
                    sign=args.sign,
                    layers=layers,
                    n_layers=n_layers,
                    label=f"{cls} fused top {p:g}%",
                )
    return out


def prune_targets(
    sels: dict[tuple[str, float], Any], datasets: list[str], args: argparse.Namespace
) -> list[tuple[str, float]]:
    """The selection keys to prune, from ``--prune``."""
    keys = []
    for kind in args.prune:
        if kind in CLASSES:
            name = f"{datasets[0]}:{kind}"
        elif len(datasets) < 2:
            raise UsageError(f"--prune {kind} needs two or more --attribution-datasets")
        else:
            name = f"{kind}:relevant"
        keys += [(name, p) for p in args.percents]
    return keys


def compute_pruning(
    model: HookedReranker,
    pairs: Sequence[Pair],
    qrels: Any,
    selection: Any,
    args: argparse.Namespace,
) -> dict[str, Any]:
    from mechir.attribution import pruning_evaluation

    result = pruning_evaluation(
        model,
        pairs,
        qrels,
        {selection.label: selection},
        seeds=[args.seed + i for i in range(args.prune_seeds)],
        measure=args.measure,
        batch_size=args.batch_size,
        max_length=args.max_length,
    )
    return {
        "selection": selection.label,
        "n_neurons": len(selection),
        "summary": result.summary.to_dict("list"),
        "conditions": result.conditions.to_dict("list"),
        "per_query": result.per_query,
    }


# ---------------------------------------------------------------------- the study
class NeuronAttribution(Study):
    name = "neuron_attribution"
    work_options = ("percents", "prune", "prune_seeds", "sign", "measure", "top")

    @classmethod
    def add_options(cls, p: argparse.ArgumentParser) -> None:
        g = p.add_argument_group("attribution")
        g.add_argument(
            "--attribution-datasets",
            nargs="+",
            default=None,
            metavar="DATASET[@SPLIT]",
            help="datasets whose pairs are attributed (default: --dataset with --split)",
        )
        g.add_argument("--attribution-queries", type=int, default=None, help="first N queries each")
        g.add_argument(
            "--pairs-per-class", type=int, default=200, help="pairs per dataset and class"
        )
        g.add_argument("--per-query", type=int, default=5, help="pairs per query and class (max)")
        g.add_argument("--min-rel", type=int, default=1, help="relevant = judged at least this")
        g.add_argument("--relevant-target", default="prob:relevant", help="F for relevant pairs")
        g.add_argument(
            "--non-relevant-target", default="prob:non_relevant", help="F for non-relevant pairs"
        )
        g.add_argument("--path", choices=["input", "activation"], default="input")
        g.add_argument(
            "--baseline", default="pad", help="baseline input (pad, pad_query, mask, ...)"
        )
        g.add_argument("--method", default="riemann_right", help="integration rule")
        g.add_argument(
            "--n-steps",
            type=steps_or_auto,
            default=50,
            help="path steps, or 'auto' (refine until the estimated error is below --rtol)",
        )
        g.add_argument(
            "--rtol", type=positive_float, default=0.01, help="target error of --n-steps auto"
        )
        g.add_argument("--unit-pairs", type=int, default=16, help="pairs per unit of work")
        g.add_argument("--max-batch", type=int, default=None, help="rows per NIG forward/backward")
        s = p.add_argument_group("selection and pruning")
        s.add_argument(
            "--percents",
            type=percent,
            nargs="+",
            default=[0.005, 0.05, 0.5],
            help="top p %% of all neurons",
        )
        s.add_argument("--sign", choices=["positive", "negative", "absolute"], default="positive")
        s.add_argument(
            "--prune",
            nargs="*",
            choices=PRUNE_KINDS,
            default=["relevant"],
            help="selections to prune: a class of the first dataset, or fused / intersected "
            "relevant-class selections across datasets",
        )
        s.add_argument("--prune-seeds", type=int, default=5, help="random controls per selection")
        s.add_argument("--measure", default="nDCG@10")
        s.add_argument("--top", type=int, default=15, help="neurons listed per selection")

    def check(self) -> None:
        self.shape  # noqa: B018 -- the model's config is readable
        args = self.args
        if args.prune_seeds < 1 or args.unit_pairs < 1 or args.pairs_per_class < 1:
            raise UsageError("--prune-seeds, --unit-pairs and --pairs-per-class must be >= 1")

    def stages(self) -> Iterator[Stage]:
        """The attribution sums of every chunk of pairs, then the pruning of the selections
        those sums give."""
        args = self.args
        units, self.pair_counts = attribution_units(args)
        if not units:
            raise UsageError("no pairs to attribute (no judged relevant or non-relevant pairs)")
        yield Stage("attribution", units, lambda u: compute_attributions(self.model, args, u))
        self.means, self.quality, self.layers = mean_scores(self.run, units)
        self.sels = selections(self.means, self.layers, self.shape["n_layers"], args)
        self.keys = prune_targets(self.sels, list(self.pair_counts), args)
        self.prune_units = [
            Unit(f"prune:{name}:{p:g}", f"prune {name} {p:g}%", self.sels[(name, p)])
            for name, p in self.keys
        ]
        yield Stage(
            "pruning",
            self.prune_units,
            lambda u: compute_pruning(
                self.model, self.candidates, self.collection.qrels, u.spec, args
            ),
        )

    def summarize(self) -> Summary:
        return summarize(self)


build_parser = NeuronAttribution.parser
main = NeuronAttribution.main


# ---------------------------------------------------------------------- summary
def summarize(study: NeuronAttribution) -> Summary:
    """Write the mean attributions, selections and pruning tables and plots; the summary."""
    run, means, quality, layers = study.run, study.means, study.quality, study.layers
    sels, pair_counts, keys = study.sels, study.pair_counts, study.keys
    prune_units, candidates = study.prune_units, study.candidates
    args, out, measure = run.args, run.output, run.args.measure
    outputs.write_npz(
        out / "mean_attributions.npz",
        **{f"{d}__{c}": m.astype(np.float32) for (d, c), m in means.items()},
        layers=np.asarray(layers),
    )
    s = Summary(
        "Neuron attribution",
        "Neuron integrated gradients of FFN neurons averaged per dataset and class, top-p% "
        "selections, and pruning of the selected neurons against random neurons.",
    )
    s.heading("Setting")
    s.facts(
        {
            "model": args.model,
            "score type": study.score_type,
            "attribution pairs": "; ".join(
                f"{d}: " + ", ".join(f"{c} {n}" for c, n in cs.items())
                for d, cs in pair_counts.items()
            ),
            "targets": f"relevant pairs `{args.relevant_target}`, non-relevant pairs "
            f"`{args.non_relevant_target}`",
            "NIG": f"{args.path} path, baseline `{args.baseline}`, "
            + (
                f"n_steps auto (rtol {args.rtol:g})"
                if args.n_steps == "auto"
                else f"{args.method}, {args.n_steps} steps"
            ),
            "selection": f"top p% of all neurons by {args.sign} mean attribution",
            "pruning candidates": f"{len(candidates)} pairs of {args.dataset}"
            + (f" ({args.split})" if args.split else ""),
        }
    )
    p_min = min(args.percents)
    qrows = [
        {
            "dataset": d, "class": c, "pairs": n, "mean |completeness error|": e,
            "mean est. rel. error": est, f"top-{p_min:g}% overlap (n vs n/2 steps)": ov,
            "mean path points": pts,
        }
        for (d, c), (n, e, est, ov, pts) in quality.items()
    ]  # fmt: skip
    s.table(
        pd.DataFrame(qrows),
        "completeness: |F(x) - F(baseline) - integrated gradients|"
        + (" of the embedding path" if args.path == "input" else " per layer")
        + "; est. rel. error: the attributions' own estimated error (nested rules), relative to "
        "each pair's largest neuron attribution",
        ".3g",
    )
    unstable = [
        f"{d} {c} (est. error {est:.2g}, overlap {ov:.2f})"
        for (d, c), (_, _, est, ov, _) in quality.items()
        if est > 0.05 or ov < 0.9
    ]
    if unstable:
        s.paragraph(
            f"**Warning: the requested steps leave the selection unstable** for "
            f"{'; '.join(unstable)}: halving the steps changes the top-{p_min:g}% neurons "
            "(overlap < 0.9) or the estimated error exceeds 5%. Rerun with `--n-steps auto` "
            "(and `--rtol`) or more steps."
        )

    # selected neurons and their layers
    frames = []
    for (name, p), sel in sels.items():
        t = sel.table.copy()
        t.insert(0, "selection", name)
        t.insert(1, "percent", p)
        frames.append(t)
    neurons = pd.concat(frames, ignore_index=True)
    outputs.write_csv(neurons, out / "selected_neurons.csv")
    s.heading("Selected neurons")
    p0 = min(args.percents)
    size = pd.DataFrame(
        [
            {
                "selection": name,
                "p": p,
                "neurons": len(sel),
                **{f"L{layer}": n for layer, n in enumerate(sel.per_layer())},
            }
            for (name, p), sel in sels.items()
        ]
    )
    s.table(size, "neurons per layer of every selection", ".3g")
    first = next(iter(means))
    top = sels[(f"{first[0]}:{first[1]}", p0)].table.head(args.top)
    s.table(top, f"top {len(top)} neurons of {first[0]} {first[1]} (p = {p0:g}%)", ".4g")
    overlap = []
    for p in args.percents:
        names = [n for n, q in sels if q == p]
        for i, a in enumerate(names):
            for b in names[i + 1 :]:
                ma, mb = sels[(a, p)].mask, sels[(b, p)].mask
                inter, union = int((ma & mb).sum()), int((ma | mb).sum())
                overlap.append(
                    {"p": p, "a": a, "b": b, "shared": inter, "jaccard": inter / max(union, 1)}
                )
    if overlap:
        s.table(pd.DataFrame(overlap), "overlap between selections", {"p": "g", "jaccard": ".3f"})
    path = plots.line_plot(
        {
            f"{name} {p:g}%": (list(range(len(sel.per_layer()))), sel.per_layer())
            for (name, p), sel in sels.items()
            if p == max(args.percents) and ":" in name
        },
        out / "neurons_per_layer.png",
        title=f"Selected neurons per layer (p = {max(args.percents):g}%)",
        xlabel="layer",
        ylabel="neurons",
    )
    s.image(path.name, "selected neurons per layer")

    # pruning curve
    s.heading("Pruning")
    summaries = []
    for (name, p), u in zip(keys, prune_units):
        row = run.store.get(u.id)
        t = pd.DataFrame(row["summary"])
        t.insert(0, "kind", name)
        t.insert(1, "p", p)
        summaries.append(t)
    table = pd.concat(summaries, ignore_index=True)
    outputs.write_csv(table, out / "pruning.csv")
    cols = [
        "kind",
        "p",
        "n_neurons",
        "unpruned",
        "selected",
        "random_mean",
        "random_std",
        "p_vs_random",
        "p_vs_unpruned",
    ]
    s.paragraph(
        f"{measure} with the selected neurons zeroed, against {args.prune_seeds} random "
        "selections with the same number of neurons in every layer (paired t-tests over "
        "queries: selected vs the random controls' per-query mean, and vs the unpruned model)."
    )
    s.table(
        table[cols],
        None,
        {"p": "g", "n_neurons": "d", "p_vs_random": ".3g", "p_vs_unpruned": ".3g"},
    )
    series, bands = {}, {}
    for kind, t in table.groupby("kind", sort=False):
        t = t.sort_values("p")
        series[f"{kind} selected"] = (t.p.tolist(), t.selected.tolist())
        series[f"{kind} random (mean)"] = (t.p.tolist(), t.random_mean.tolist())
        bands[f"{kind} random min-max"] = (
            t.p.tolist(),
            t.random_min.tolist(),
            t.random_max.tolist(),
        )
    path = plots.line_plot(
        series,
        out / "pruning_curve.png",
        title=f"{measure} after pruning the top p% neurons",
        xlabel="p (% of all FFN neurons)",
        ylabel=measure,
        references={"unpruned": float(table.unpruned.iloc[0])},
        bands=bands,
        logx=True,
    )
    s.image(path.name, f"pruning curve: {measure} vs p")
    s.paragraph(
        "Files: `selected_neurons.csv`, `pruning.csv`, `mean_attributions.npz` (mean attribution "
        "per dataset and class, [layer, neuron]), `results.jsonl`."
    )
    return s


if __name__ == "__main__":
    raise SystemExit(main())
