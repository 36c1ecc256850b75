"""Matching heads: which attention heads link query and document tokens more strongly for
relevant documents than for negatives, lexically (exact matches) or semantically? ("Understanding
Matching Mechanisms in Cross-Encoders", matching-head analysis.)

For every query, its relevant documents, hard negatives (judged non-relevant, or unjudged
first-stage documents) and easy negatives (random corpus passages) are encoded and their attention
statistics streamed with :func:`mechir.matching.attention_statistics`: per pair, layer and head,
the max and mass of Query->Document and Document->Query attention, split into exact-match and
non-matching entries, and the attention to CLS / SEP1 / SEP2. :func:`mechir.matching.
matching_head_deltas` then scores every head: Delta = median over queries of the per-query mean
``max Q->D attention`` of relevant pairs minus that of negatives (also D->Q, and against hard
negatives); heads with |Delta| above a threshold are matching heads. Optionally the top matching
heads are knocked out (:func:`mechir.hooks.head_knockout_hooks`) and the candidates reranked:
nDCG@10 against the full model and against random heads of the same number.

Units of work: one query (all its pairs' statistics), then one knockout condition (a full
rerank). Example::

    python -m analyses.matching_heads --model ../shared/models/minilm-l6-ce-scifact \\
        --dataset ../shared/data/scifact --split quick --max-length 160 --knockout-top 3
"""

from __future__ import annotations

import argparse
import random
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from analyses.base import Stage, Study, StudyRun, Unit, UsageError
from analyses.common import require_queries, writes_outputs
from analyses.reranking import (
    compare_to_baseline,
    per_query_values,
    reference_rankings,
    rerank_row,
)
from analyses.summary import Summary
from mechir import outputs
from mechir.cli_common import fraction, nonnegative_float
from mechir.data import matching_pairs
from mechir.interface import HookedReranker
from mechir.lazy import lazy_import
from mechir.matching import (
    STATISTICS,
    AttentionStatistics,
    attention_statistics,
    filter_correct,
    matching_head_deltas,
    matching_head_labels,
)
from mechir.selection import head_label, parse_head
from mechir.store import decode_array, encode_array

pd = lazy_import("pandas")
torch = lazy_import("torch")
plots = lazy_import("analyses.plots")

#: The statistics whose relevant-vs-negative Delta is tabulated.
DELTA_STATISTICS = (
    "qd_max",
    "dq_max",
    "qd_match_max",
    "qd_nonmatch_max",
    "dq_match_max",
    "dq_nonmatch_max",
)
PAIR_INFO = ("score", "predicted_relevant", "n_query", "n_document", "n_matches")
KNOCKOUT_BASELINE = "knockout:none"


# ---------------------------------------------------------------------- statistics units
def study_pairs(args: argparse.Namespace, collection: Any) -> pd.DataFrame:
    """The pairs table of :func:`mechir.data.matching_pairs` for the selected queries."""
    return matching_pairs(
        collection,
        query_ids=collection.query_ids(args.limit_queries),
        min_rel=args.min_rel,
        max_relevant=args.max_relevant,
        max_hard=args.max_hard,
        n_easy=args.n_easy,
        seed=args.seed,
    )


def statistics_units(pairs: pd.DataFrame) -> list[Unit]:
    return [
        Unit(f"stats:{qid}", f"query {qid}", group)
        for qid, group in pairs.groupby("qid", sort=False)
    ]


def compute_statistics(
    model: HookedReranker, args: argparse.Namespace, unit: Unit
) -> dict[str, Any]:
    """Stream the attention statistics of one query's pairs; arrays stored exactly."""
    group: pd.DataFrame = unit.spec
    batch = model.encode(list(group["query"]), list(group["document"]), max_length=args.max_length)
    stats = attention_statistics(
        model, batch, batch_size=args.batch_size, whole_words=args.whole_words
    )
    return {
        "qid": str(group.qid.iloc[0]),
        "pairs": group.pair.tolist(),
        "layers": stats.layers,
        "values": {name: encode_array(v.numpy()) for name, v in stats.values.items()},
        "info": {c: stats.pairs[c].tolist() for c in PAIR_INFO},
    }


def gather_statistics(run: StudyRun, pairs: pd.DataFrame) -> AttentionStatistics:
    """All stored per-query statistics as one :class:`AttentionStatistics` in pair order."""
    rows = [run.store.get(u.id) for u in statistics_units(pairs)]
    order = np.concatenate([r["pairs"] for r in rows])
    if not np.array_equal(np.sort(order), np.arange(len(pairs))):
        raise ValueError(f"{run.output}: stored statistics do not cover the pairs table")
    perm = np.argsort(order)
    values = {
        name: np.concatenate([decode_array(r["values"][name]) for r in rows])[perm]
        for name in STATISTICS
    }
    info = pd.DataFrame({c: np.concatenate([r["info"][c] for r in rows])[perm] for c in PAIR_INFO})
    info.insert(0, "pair", np.arange(len(pairs)))
    return AttentionStatistics(
        {k: torch.from_numpy(v) for k, v in values.items()}, list(rows[0]["layers"]), info
    )


# ---------------------------------------------------------------------- knockout units
def knockout_units(
    top_heads: Sequence[str], n_layers: int, n_heads: int, n_random: int, seed: int
) -> list[Unit]:
    """Baseline, the top heads together, each alone, and ``n_random`` random sets of the same
    size drawn from the other heads."""
    units = [Unit(KNOCKOUT_BASELINE, "no knockout", [])]
    if not top_heads:
        return units
    units.append(Unit("knockout:top:" + ",".join(top_heads), "top heads", list(top_heads)))
    if len(top_heads) > 1:
        units += [Unit(f"knockout:head:{h}", f"head {h}", [h]) for h in top_heads]
    others = [
        head_label(layer, h)
        for layer in range(n_layers)
        for h in range(n_heads)
        if head_label(layer, h) not in top_heads
    ]
    for i in range(n_random):
        rng = random.Random(f"{seed}:knockout:{i}")
        heads = sorted(rng.sample(others, min(len(top_heads), len(others))), key=_head_key)
        units.append(Unit(f"knockout:random{i}:" + ",".join(heads), f"random set {i}", heads))
    return units


def _head_key(label: str) -> tuple[int, int]:
    return parse_head(label)


def compute_knockout(
    model: HookedReranker, pairs: Sequence[Any], args: argparse.Namespace, unit: Unit
) -> dict[str, Any]:
    from mechir.hooks import head_knockout_hooks

    heads: list[str] = unit.spec
    hooks = head_knockout_hooks(model, heads, mode=args.knockout_mode) if heads else None
    return {"heads": heads, **rerank_row(model, pairs, args, hooks)}


# ---------------------------------------------------------------------- the study
class MatchingHeads(Study):
    name = "matching_heads"
    work_options = (
        "threshold",
        "paired",
        "correct_only",
        "top",
        "knockout_top",
        "knockout_random",
        "knockout_mode",
        "measure",
        "random_shuffles",
        "alpha",
    )

    @classmethod
    def add_options(cls, p: argparse.ArgumentParser) -> None:
        g = p.add_argument_group("pairs")
        g.add_argument("--min-rel", type=int, default=1, help="relevant = judged at least this")
        g.add_argument(
            "--max-relevant", type=int, default=10, help="relevant pairs per query (max)"
        )
        g.add_argument("--max-hard", type=int, default=10, help="hard negatives per query (max)")
        g.add_argument(
            "--n-easy",
            type=int,
            default=None,
            help="easy negatives per query (default: as relevant)",
        )
        g.add_argument(
            "--whole-words",
            action="store_true",
            help="exact matches must also be the same whole word (WordPieces joined)",
        )
        s = p.add_argument_group("matching heads (summary options)")
        s.add_argument(
            "--threshold", type=nonnegative_float, default=0.1, help="|Delta| of a matching head"
        )
        s.add_argument(
            "--paired", action="store_true", help="median of per-query differences (paired Delta)"
        )
        s.add_argument(
            "--correct-only",
            action=argparse.BooleanOptionalAction,
            default=True,
            help="only pairs the model classifies correctly (the paper's setting)",
        )
        s.add_argument("--top", type=int, default=10, help="heads listed in the summary")
        k = p.add_argument_group("head knockout follow-up")
        k.add_argument(
            "--knockout-top",
            type=int,
            default=0,
            help="knock out the N top matching heads (together and one by one) and rerank",
        )
        k.add_argument(
            "--knockout-random", type=int, default=3, help="random head sets of the same size"
        )
        k.add_argument("--knockout-mode", choices=["zero"], default="zero")
        k.add_argument("--measure", default="nDCG@10")
        k.add_argument(
            "--random-shuffles", type=int, default=200, help="shuffles of the random floor"
        )
        k.add_argument("--alpha", type=fraction, default=0.05)

    def check(self) -> None:
        self.shape  # noqa: B018 -- the model's config is readable
        if self.args.knockout_top < 0 or self.args.top < 1:
            raise UsageError("--knockout-top must be >= 0 and --top >= 1")

    def stages(self) -> Iterator[Stage]:
        """The attention statistics of every query, then (``--knockout-top``) the knockouts of
        the top matching heads those statistics find."""
        args = self.args
        if args.knockout_top:  # checked before any model work
            require_queries(
                self.candidates, args, at_least=2,
                needed_by="the knockouts' paired t-tests (--knockout-top 0 skips them)",
            )  # fmt: skip
        self.pairs = study_pairs(args, self.collection)
        if writes_outputs():  # torchrun: rank 0 writes the outputs
            outputs.write_csv(
                self.pairs[["pair", "qid", "docid", "kind", "relevance"]], self.output / "pairs.csv"
            )
        yield Stage(
            "statistics",
            statistics_units(self.pairs),
            lambda u: compute_statistics(self.model, args, u),
        )
        self.stats = gather_statistics(self.run, self.pairs)
        self.deltas, self.used = head_deltas(self.stats, self.pairs, args)
        self.knock: list[Unit] = []
        self.knock_candidates: list[Any] = []
        if args.knockout_top:
            top = top_matching_heads(self.deltas, args)[: args.knockout_top]
            shape = self.shape
            self.knock = knockout_units(
                top, shape["n_layers"], shape["n_heads"], args.knockout_random, args.seed
            )
            self.knock_candidates = self.candidates
            yield Stage(
                "knockout",
                self.knock,
                lambda u: compute_knockout(self.model, self.candidates, args, u),
            )

    def summarize(self) -> Summary:
        return summarize(self)


build_parser = MatchingHeads.parser
main = MatchingHeads.main


def head_deltas(
    stats: AttentionStatistics, pairs: pd.DataFrame, args: argparse.Namespace
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(deltas, used_pairs)``: the library's matching-head Delta table for the tabulated
    statistics, against each kind of negative present, over the (correctly classified) pairs."""
    used = filter_correct(pairs, stats) if args.correct_only else pairs
    negatives = [k for k in ("easy_negative", "hard_negative") if k in set(used.kind)]
    if "relevant" not in set(used.kind) or not negatives:
        raise UsageError(
            f"not enough pairs to compare: kinds {sorted(set(used.kind))} after filtering"
            + (" (try --no-correct-only)" if args.correct_only else "")
        )
    deltas = matching_head_deltas(
        stats.table(),
        used,
        statistics=DELTA_STATISTICS,
        negatives=negatives,
        threshold=args.threshold,
        paired=args.paired,
    )
    return deltas, used


def top_matching_heads(deltas: pd.DataFrame, args: argparse.Namespace) -> list[str]:
    """Matching heads (|Delta| of max Q->D attention, relevant vs easy negatives, above the
    threshold), largest first; against hard negatives when there are no easy ones."""
    negative = "easy_negative" if "easy_negative" in set(deltas.negative) else "hard_negative"
    return matching_head_labels(
        deltas, statistic="qd_max", negative=negative, threshold=args.threshold
    )


# ---------------------------------------------------------------------- summary
FORMATS = {
    "t": ".2f",
    "p": ".3g",
    "p_holm": ".3g",
    "delta": "+.4f",
}


def _wide_deltas(deltas: pd.DataFrame) -> pd.DataFrame:
    """One row per head, one column per (statistic, negative) Delta."""
    short = {"easy_negative": "easy", "hard_negative": "hard"}
    wide = deltas.pivot_table(
        index=["layer", "head", "label"], columns=["statistic", "negative"], values="delta"
    )
    wide.columns = [f"Δ {stat} vs {short[neg]}" for stat, neg in wide.columns]
    return wide.reset_index()


def _grid(frame: pd.DataFrame, column: str, n_layers: int, n_heads: int) -> np.ndarray:
    grid = np.full((n_layers, n_heads), np.nan)
    for r in frame[["layer", "head", column]].itertuples(index=False):
        grid[int(r[0]), int(r[1])] = r[2]
    return grid


def summarize(study: MatchingHeads) -> Summary:
    """Write the Delta tables and plots of a finished run; its summary."""
    run, collection, stats, pairs = study.run, study.collection, study.stats, study.pairs
    used, deltas, knock, candidates = study.used, study.deltas, study.knock, study.knock_candidates
    shape = study.shape
    args, out = run.args, run.output
    n_layers, n_heads = shape["n_layers"], shape["n_heads"]
    outputs.write_csv(deltas, out / "deltas.csv")
    wide = _wide_deltas(deltas)
    outputs.write_csv(wide, out / "head_deltas.csv")
    negative = "easy" if any(c.endswith("vs easy") for c in wide.columns) else "hard"
    main_col = f"Δ qd_max vs {negative}"
    top = wide.reindex(wide[main_col].abs().sort_values(ascending=False).index).head(args.top)
    shown = [
        f"Δ {stat} vs {neg}"
        for stat in ("qd_max", "dq_max")
        for neg in ("easy", "hard")
        if f"Δ {stat} vs {neg}" in wide.columns
    ] + [f"Δ qd_match_max vs {negative}", f"Δ qd_nonmatch_max vs {negative}"]
    top = top[["label", *shown]]
    matching = top_matching_heads(deltas, args)

    s = Summary(
        "Matching heads",
        "Which heads attend from query tokens to document tokens (and back) more strongly for "
        "relevant documents than for negatives? Δ = median over queries of the per-query mean "
        "max attention (relevant) minus the same for negatives.",
    )
    counts = used.kind.value_counts()
    s.heading("Setting")
    s.facts(
        study.setting()
        | {
            "queries": pairs.qid.nunique(),
            "pairs (all)": len(pairs),
            "pairs used": ", ".join(
                f"{k} {counts.get(k, 0)}"
                for k in ("relevant", "hard_negative", "easy_negative")
                if k in set(pairs.kind)
            )
            + (" (correctly classified only)" if args.correct_only else ""),
            "relevant": f"judged >= {args.min_rel}",
            "max length": args.max_length or "model maximum",
            "exact match": "same token id" + (" and whole word" if args.whole_words else ""),
            "Δ": "median of per-query differences" if args.paired else "difference of medians",
            "matching-head threshold": f"|Δ max Q->D| > {args.threshold}",
        }
    )
    s.heading("Top heads")
    s.paragraph(
        f"{len(matching)} matching head(s) with |{main_col}| > {args.threshold}: "
        + (", ".join(f"`{h}`" for h in matching) or "none")
        + ". `qd`: query tokens attending to document tokens, `dq`: the reverse; `match` / "
        "`nonmatch` restrict the max to exact-match (lexical) or non-matching (semantic) token "
        "pairs. Every head's Δ for every statistic is in `head_deltas.csv`."
    )
    s.table(top, f"top {len(top)} heads by |{main_col}|", "+.3f")

    images = []
    for stat, neg in (
        ("qd_max", "easy"),
        ("dq_max", "easy"),
        ("qd_max", "hard"),
        ("qd_match_max", negative),
        ("qd_nonmatch_max", negative),
    ):
        col = f"Δ {stat} vs {neg}"
        if col not in wide.columns:
            continue
        grid = _grid(wide, col, n_layers, n_heads)
        highlight = [parse_head(h) for h in matching] if stat == "qd_max" else []
        path = plots.heatmap(
            grid,
            out / f"heatmap_{stat}_vs_{neg}.png",
            row_labels=[str(i) for i in range(n_layers)],
            col_labels=[str(i) for i in range(n_heads)],
            xlabel="head",
            ylabel="layer",
            title=f"{col} (relevant minus {neg} negatives)",
            colorbar_label="Δ",
            highlight=[(layer, h) for layer, h in highlight],
        )
        images.append((path, f"{col} per layer and head (outlined: matching heads)"))

    s.heading("Lexical vs semantic matching, and no-op attention, per layer")
    layer_table = per_layer_table(stats, used, wide, negative)
    outputs.write_csv(layer_table, out / "per_layer.csv")
    s.table(layer_table, "per layer: max over heads of Δ, and mean attention over heads and pairs")
    layer_path = plots.line_plot(
        {
            f"max Δ qd_match_max vs {negative}": (
                layer_table.layer,
                layer_table[f"max Δ qd_match_max vs {negative}"],
            ),
            f"max Δ qd_nonmatch_max vs {negative}": (
                layer_table.layer,
                layer_table[f"max Δ qd_nonmatch_max vs {negative}"],
            ),
            "share of Q->D mass on exact matches (relevant)": (
                layer_table.layer,
                layer_table["exact-match share of Q->D mass"],
            ),
        },
        out / "per_layer_matching.png",
        title="Lexical (exact-match) vs semantic (non-matching) Q->D attention per layer",
        xlabel="layer",
        ylabel="value",
    )
    noop_path = plots.line_plot(
        {
            name: (layer_table.layer, layer_table[name])
            for name in ("attention to CLS", "attention to SEP1", "attention to SEP2")
        },
        out / "per_layer_noop.png",
        title="Attention to CLS / SEP per layer (mean over heads, tokens and pairs)",
        xlabel="layer",
        ylabel="attention mass",
    )
    for path, caption in images:
        s.image(path.name, caption)
    s.image(layer_path.name, "lexical vs semantic matching per layer")
    s.image(noop_path.name, "no-op attention per layer")

    if knock:
        knockout_section(s, run, collection, knock, candidates)
    s.paragraph(
        "Files: `deltas.csv` (the library's Δ table: head x statistic x negative), "
        "`head_deltas.csv` (one row per head), `per_layer.csv`, `pairs.csv`, `results.jsonl`."
    )
    return s


def per_layer_table(
    stats: AttentionStatistics, used: pd.DataFrame, wide: pd.DataFrame, negative: str
) -> pd.DataFrame:
    """Per layer: the largest head Δ of exact-match and non-matching max Q->D attention, the
    share of relevant pairs' Q->D attention mass on exact matches, and no-op attention."""
    v = {k: t.numpy() for k, t in stats.values.items()}  # [pair, layer, head]
    rel = used.pair[used.kind == "relevant"].to_numpy()
    every = used.pair.to_numpy()
    mass = v["qd_mass"][rel].sum(axis=(0, 2))
    share = v["qd_match_mass"][rel].sum(axis=(0, 2)) / np.where(mass > 0, mass, np.nan)
    rows = []
    for li, layer in enumerate(stats.layers):
        w = wide[wide.layer == layer]
        rows.append(
            {
                "layer": layer,
                f"max Δ qd_match_max vs {negative}": w[f"Δ qd_match_max vs {negative}"].max(),
                f"max Δ qd_nonmatch_max vs {negative}": w[f"Δ qd_nonmatch_max vs {negative}"].max(),
                "exact-match share of Q->D mass": float(share[li]),
                "attention to CLS": float(v["cls_mass"][every, li].mean()),
                "attention to SEP1": float(v["sep1_mass"][every, li].mean()),
                "attention to SEP2": float(v["sep2_mass"][every, li].mean()),
            }
        )
    return pd.DataFrame(rows)


def knockout_section(
    s: Summary, run: StudyRun, collection: Any, knock: Sequence[Unit], candidates: Sequence[Any]
) -> None:
    args, out, measure = run.args, run.output, run.args.measure
    runs = {u.id: run.store.get(u.id)["run"] for u in knock}
    values = per_query_values(runs, collection.qrels, measure)
    others = [u.id for u in knock if u.id != KNOCKOUT_BASELINE]
    table = compare_to_baseline(
        values, KNOCKOUT_BASELINE, others, measure=measure, alpha=args.alpha
    )
    labels = {u.id: u.label for u in knock}
    table.insert(0, "condition", table.unit.map(labels))
    table.insert(1, "heads", table.unit.map({u.id: ", ".join(u.spec) for u in knock}))
    outputs.write_csv(table.drop(columns="unit"), out / "knockout.csv")
    baseline = float(np.mean(list(values[KNOCKOUT_BASELINE].values())))
    refs, levels = reference_rankings(
        collection,
        candidates,
        model_value=baseline,
        measure=measure,
        shuffles=args.random_shuffles,
        seed=args.seed,
        model_label="full model",
    )
    s.heading("Head knockout")
    s.paragraph(
        f"The top {len(knock[1].spec) if len(knock) > 1 else 0} matching heads knocked out "
        f"(their output zeroed) together and one by one, and {args.knockout_random} random sets "
        f"of as many other heads; {measure} over {len(candidates)} first-stage candidates "
        "(paired t-test against the full model, Holm over these conditions)."
    )
    s.small_sample(len(values[KNOCKOUT_BASELINE]), "the paired t-tests of the knockouts")
    s.table(refs)
    cols = ["condition", "heads", measure, "delta", "t", "p_holm", "significant"]
    s.table(table[cols], f"{measure} with heads knocked out", FORMATS)
    path = plots.bar_plot(
        table.condition.tolist(),
        table[measure].tolist(),
        out / "knockout.png",
        title=f"{measure} with heads knocked out",
        ylabel=measure,
        references=levels,
    )
    s.image(path.name, f"{measure} per knockout condition")


if __name__ == "__main__":
    raise SystemExit(main())
