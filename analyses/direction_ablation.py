"""Attention direction ablation: which flows of information between the input parts does the
relevance score need, and in which layers? (Table 1 and the layer curves of "Understanding
Matching Mechanisms in Cross-Encoders".)

For every condition -- one of the 25 part->part directions between CLS | Query | SEP1 | Document
| SEP2, or a named group (all Q->D, all D->Q, no Q<->D interaction, CLS reads nothing, CLS reads
Q+D, Doc->Doc) -- and every layer range (cumulative ``0..k``, sliding windows, explicit ranges),
the attention of the attending part's tokens to the attended part's tokens is removed with
:func:`mechir.hooks.direction_ablation_hooks` (mode ``zero``, the paper's, or ``renormalize``),
every candidate is reranked, and nDCG@10 is compared with the unablated model (paired t-test over
queries, Holm correction over all conditions of the directory) and with the random-ranking and
worst-ranking floors of the same candidates.

Unit of work: one (condition, layer range) over all candidates; its stored row is the full run,
so any measure can be recomputed. Conditions that remove the same set of directions (the group
``query_to_document`` and the direction ``QUERY->DOCUMENT``) share one unit.

Example (the shared quick set; groups and the 25 directions, all layers at once)::

    python -m analyses.direction_ablation --model ../shared/models/minilm-l6-ce-scifact \\
        --dataset ../shared/data/scifact --split quick --depth 20 --max-length 160 \\
        --conditions groups directions --layers all
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from analyses.base import Study, StudyRun, Unit
from analyses.common import require_queries
from analyses.reranking import (
    compare_to_baseline,
    per_query_values,
    reference_rankings,
    rerank_row,
    tied_queries,
)
from analyses.summary import Summary
from mechir import outputs
from mechir.cli_common import fraction
from mechir.hooks import (
    ALL_DIRECTIONS,
    DIRECTION_GROUPS,
    cumulative_layer_ranges,
    direction_ablation_hooks,
    sliding_layer_windows,
)
from mechir.lazy import lazy_import
from mechir.parts import PARTS, Part, parse_parts
from mechir.selection import select_layers

pd = lazy_import("pandas")
plots = lazy_import("analyses.plots")

BASELINE = "none"

PartPair = tuple[Part, Part]


# ---------------------------------------------------------------------- conditions
@dataclass(frozen=True)
class Condition:
    """A set of single part->part directions removed together, with its display names."""

    pairs: frozenset[PartPair]

    @property
    def key(self) -> str:
        """Canonical id, e.g. ``"QUERY->DOCUMENT,DOCUMENT->QUERY"`` (input order of parts)."""
        return ",".join(f"{a.name}->{b.name}" for a, b in sorted(self.pairs))

    @property
    def names(self) -> list[str]:
        """Group names removing exactly these directions, then the direction label if single."""
        out = [g for g, dirs in DIRECTION_GROUPS.items() if _expand(dirs) == self.pairs]
        if len(self.pairs) == 1:
            ((a, b),) = self.pairs
            out.append(f"{a.name}->{b.name}")
        return out or [self.key]

    @property
    def name(self) -> str:
        return self.names[0]

    def directions(self) -> list[tuple[Part, Part]]:
        return sorted(self.pairs)


def _expand(directions: Sequence[tuple[Any, Any]]) -> frozenset[PartPair]:
    return frozenset(
        (a, b) for att, tgt in directions for a in parse_parts(att) for b in parse_parts(tgt)
    )


def condition_from_key(key: str) -> Condition:
    """Inverse of :attr:`Condition.key`."""
    return Condition(_expand([tuple(item.split("->")) for item in key.split(",")]))


def parse_conditions(tokens: Sequence[str]) -> list[Condition]:
    """Conditions from ``--conditions`` tokens: ``groups`` (the named groups), ``directions``
    (all 25), a group name, or ``ATTENDING->ATTENDED`` with ``+``-joined part names on either
    side (``query->document``, ``cls->query+document``). Duplicates are dropped.

    Raises:
        ValueError: an unknown token, with the valid choices.
    """
    out: dict[frozenset[PartPair], Condition] = {}
    for token in tokens:
        t = token.strip()
        if t == "groups":
            found = [Condition(_expand(d)) for d in DIRECTION_GROUPS.values()]
        elif t == "directions":
            found = [Condition(frozenset([d])) for d in ALL_DIRECTIONS]
        elif t in DIRECTION_GROUPS:
            found = [Condition(_expand(DIRECTION_GROUPS[t]))]
        elif "->" in t:
            attending, _, attended = t.partition("->")
            try:
                found = [Condition(_expand([(attending.split("+"), attended.split("+"))]))]
            except ValueError as err:
                raise ValueError(f"condition {token!r}: {err}") from None
        else:
            raise ValueError(
                f"unknown condition {token!r}: use 'groups', 'directions', a group name "
                f"({', '.join(DIRECTION_GROUPS)}) or 'attending->attended' with part names "
                "(cls, query, sep1, document, sep2; join several with '+')"
            )
        for c in found:
            out.setdefault(c.pairs, c)
    return list(out.values())


# ---------------------------------------------------------------------- layer ranges
def layers_label(layers: Sequence[int]) -> str:
    """``[0, 1, 2]`` -> ``"0-2"``, ``[3]`` -> ``"3"``, ``[0, 2]`` -> ``"0,2"``."""
    layers = sorted(layers)
    if len(layers) > 1 and layers == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}-{layers[-1]}"
    return ",".join(str(x) for x in layers)


def parse_layer_ranges(tokens: Sequence[str], n_layers: int) -> list[list[int]]:
    """Layer ranges from ``--layers`` tokens: ``cumulative`` (``0..k`` for every k), ``all``,
    ``window:W`` or ``window:W:S`` (width W, stride S, default 1), ``a-b``, ``a`` or ``a,b,c``.

    Raises:
        ValueError: an unknown token or a layer the model does not have.
    """
    cfg = argparse.Namespace(n_layers=n_layers)
    out: dict[str, list[int]] = {}
    for token in tokens:
        t = token.strip()
        if t == "cumulative":
            found = cumulative_layer_ranges(n_layers)
        elif t == "all":
            found = [list(range(n_layers))]
        elif m := re.fullmatch(r"window:(\d+)(?::(\d+))?", t):
            found = sliding_layer_windows(n_layers, int(m[1]), int(m[2] or 1))
        elif m := re.fullmatch(r"(\d+)-(\d+)", t):
            if int(m[1]) > int(m[2]):
                raise ValueError(f"layer range {t!r} is empty (write low-high)")
            found = [select_layers(cfg, range(int(m[1]), int(m[2]) + 1))]
        elif re.fullmatch(r"\d+(,\d+)*", t):
            found = [select_layers(cfg, [int(x) for x in t.split(",")])]
        else:
            raise ValueError(
                f"unknown layer range {token!r}: use 'cumulative', 'all', 'window:W[:S]', "
                "'a-b', 'a' or 'a,b,c'"
            )
        for layers in found:
            out.setdefault(layers_label(layers), list(layers))
    return list(out.values())


def unit_id(condition: Condition | None, layers: Sequence[int] = ()) -> str:
    return BASELINE if condition is None else f"{condition.key}@{layers_label(layers)}"


def plan_units(conditions: Sequence[Condition], ranges: Sequence[list[int]]) -> list[Unit]:
    """The baseline, then every (condition, range): conditions outer, ranges inner."""
    units = [Unit(BASELINE, "no ablation", None)]
    for c in conditions:
        for layers in ranges:
            units.append(
                Unit(unit_id(c, layers), f"{c.name} @ {layers_label(layers)}", (c, layers))
            )
    return units


# ---------------------------------------------------------------------- the study
class DirectionAblation(Study):
    name = "direction_ablation"
    work_options = ("conditions", "layers", "measure", "random_shuffles", "alpha")
    output_files = ("table.csv", "per_query.csv", "references.csv")

    @classmethod
    def add_options(cls, p: argparse.ArgumentParser) -> None:
        g = p.add_argument_group("direction ablation")
        g.add_argument(
            "--conditions",
            nargs="+",
            default=["groups", "directions"],
            help="'groups', 'directions' (all 25), group names "
            f"({', '.join(DIRECTION_GROUPS)}) or 'attending->attended' (e.g. query->document)",
        )
        g.add_argument(
            "--layers",
            nargs="+",
            default=["cumulative"],
            help="layer ranges: 'cumulative' (0..k for every k), 'all', 'window:W[:S]', 'a-b', "
            "'a,b'",
        )
        g.add_argument("--mode", choices=["zero", "renormalize"], default="zero")
        g.add_argument("--measure", default="nDCG@10", help="ir_measures measure of the tables")
        g.add_argument(
            "--random-shuffles", type=int, default=200, help="shuffles of the random floor"
        )
        g.add_argument(
            "--alpha", type=fraction, default=0.05, help="significance level (after Holm)"
        )

    def check(self) -> None:
        self.conditions = parse_conditions(self.args.conditions)
        self.ranges = parse_layer_ranges(self.args.layers, self.shape["n_layers"])

    def run_name_extra(self) -> list[str]:
        return [self.args.mode]

    def plan(self) -> list[Unit]:
        require_queries(
            self.candidates, self.args, at_least=2, needed_by="the summary's paired t-tests"
        )
        return plan_units(self.conditions, self.ranges)

    def compute(self, unit: Unit) -> dict[str, Any]:
        """Rerank every candidate with the unit's directions removed; the row holds the run."""
        model, args = self.model, self.args
        if unit.spec is None:
            return rerank_row(model, self.candidates, args)
        condition, layers = unit.spec
        directions = condition.directions()
        hooks = direction_ablation_hooks(
            model, directions=directions, layers=layers, mode=args.mode
        )
        return {
            "condition": condition.key,
            "layers": list(layers),
            **rerank_row(model, self.candidates, args, hooks),
        }

    def summarize(self) -> Summary:
        return summarize(self)


build_parser = DirectionAblation.parser
main = DirectionAblation.main


# ---------------------------------------------------------------------- summary
def result_table(run: StudyRun, collection: Any) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(table, per_query)``: one row per ablation unit in the directory (measure, change
    against the unablated model, paired t-test, Holm-adjusted p over all of them) and the
    per-query values of every unit (the baseline included)."""
    args, measure = run.args, run.args.measure
    if BASELINE not in run.store:
        raise ValueError(f"{run.output}: the unablated baseline unit is missing")
    rows = {row["unit"]: row for row in run.store}
    values = per_query_values({u: r["run"] for u, r in rows.items()}, collection.qrels, measure)
    ablations = [u for u in rows if u != BASELINE]
    tests = compare_to_baseline(values, BASELINE, ablations, measure=measure, alpha=args.alpha)
    records = []
    for unit in ablations:
        cond = condition_from_key(rows[unit]["condition"])
        layers = rows[unit]["layers"]
        records.append(
            {
                "condition": cond.name,
                "also": ", ".join(cond.names[1:]),
                "directions": cond.key,
                "n_directions": len(cond.pairs),
                "layers": layers_label(layers),
                "first_layer": min(layers),
                "last_layer": max(layers),
                "n_layers": len(layers),
                "tied_queries": tied_queries(rows[unit]["run"]),
                "unit": unit,
            }
        )
    table = pd.DataFrame(records, columns=list(records[0]) if records else ["unit"])
    table = table.merge(tests, on="unit")
    table = table[[c for c in table.columns if c != "unit"] + ["unit"]]
    if len(table):
        order = {name: i for i, name in enumerate([*DIRECTION_GROUPS, *_direction_names()])}
        table["_order"] = table["condition"].map(lambda n: order.get(n, len(order)))
        table = table.sort_values(["_order", "condition", "first_layer", "last_layer"])
        table = table.drop(columns="_order").reset_index(drop=True)
    long = pd.DataFrame(
        [(u, q, v) for u, vals in values.items() for q, v in sorted(vals.items())],
        columns=["unit", "qid", measure],
    )
    return table, long


def _direction_names() -> list[str]:
    return [f"{a.name}->{b.name}" for a, b in ALL_DIRECTIONS]


FORMATS = {"t": ".2f", "p": ".3g", "p_holm": ".3g", "delta": "+.4f"}


def summarize(study: DirectionAblation) -> Summary:
    """Write ``table.csv``, ``per_query.csv`` and the plots of a finished run; its summary."""
    run, collection, pairs = study.run, study.collection, study.candidates
    n_layers = study.shape["n_layers"]
    args, out, measure = run.args, run.output, run.args.measure
    table, per_query = result_table(run, collection)
    outputs.write_csv(table, out / "table.csv")
    outputs.write_csv(per_query, out / "per_query.csv")

    baseline = float(per_query.loc[per_query.unit == BASELINE, measure].mean())
    refs, references = reference_rankings(
        collection,
        pairs,
        model_value=baseline,
        measure=measure,
        shuffles=args.random_shuffles,
        seed=args.seed,
    )
    outputs.write_csv(refs, out / "references.csv")

    n_queries = per_query.loc[per_query.unit == BASELINE, "qid"].nunique()
    s = Summary(
        "Attention direction ablation",
        f"Which part->part attention flows does the relevance score need? Attention is removed "
        f"with mode `{args.mode}`; {measure} of the reranked candidates against the unablated "
        "model.",
    )
    s.heading("Setting")
    s.facts(
        study.setting(
            queries=n_queries,
            candidate_pairs=len(pairs),
            depth=args.depth,
            max_length=args.max_length or "model maximum",
            mode=args.mode,
            **{
                "conditions x layer ranges": len(table),
                "significance": f"paired t-test over queries, Holm over all {len(table)} "
                f"ablations, alpha {args.alpha}",
            },
        )
    )
    s.small_sample(n_queries, "the paired t-tests")
    s.heading("Reference rankings")
    s.table(refs)

    full = table[table.n_layers == n_layers] if len(table) else table
    cols = ["condition", "also", measure, "delta", "t", "p_holm", "significant"]
    if len(full):
        s.heading(f"All layers (0-{n_layers - 1})")
        s.table(full[cols], f"{measure} with the directions removed in every layer", FORMATS)
        groups = full[full.condition.isin(list(DIRECTION_GROUPS))]
        if len(groups):
            bars = plots.bar_plot(
                groups.condition.tolist(),
                groups[measure].tolist(),
                out / "bars_all_layers_groups.png",
                title=f"{measure} with each group removed in layers 0-{n_layers - 1}",
                ylabel=measure,
                references=references,
            )
            s.image(bars.name, f"{measure} per group removed in every layer, with the floors")
    tied = table[table.tied_queries > 0] if len(table) else table
    if len(tied):
        s.paragraph(
            f"**Ties**: {len(tied)} condition(s) leave some queries with (near-)constant scores "
            "over all their candidates (`tied_queries` in `table.csv`; "
            + ", ".join(f"{r.condition} @ {r.layers}: {r.tied_queries}" for r in tied.itertuples())
            + f" of {n_queries} queries). Their ranking, and so their {measure}, is decided by "
            "tie-breaking and floating-point noise rather than by the model; read them against "
            "the random-order floor."
        )
    heatmaps = _heatmaps(table, out, n_layers, baseline, measure)
    for path, caption in heatmaps:
        s.image(path.name, caption)

    if len(table):
        contiguous = table.last_layer - table.first_layer + 1 == table.n_layers
        cumulative = table[contiguous & (table.first_layer == 0)]
        if cumulative.layers.nunique() > 1:
            pivot = _pivot(cumulative, measure, "last_layer", lambda k: layers_label(range(k + 1)))
            s.heading("Cumulative layer ranges 0..k")
            s.table(pivot, f"{measure} with the directions removed in layers 0..k", ".4f")
            for path, caption in _curves(cumulative, out, "cumulative", references, measure):
                s.image(path.name, caption)
        windows = table[contiguous & (table.first_layer > 0)]
        for width, group in windows.groupby("n_layers"):
            rows = pd.concat([group, cumulative[cumulative.n_layers == width]])
            if rows.layers.nunique() < 2:
                continue
            pivot = _pivot(rows, measure, "first_layer", lambda a, w=width: f"{a}-{a + w - 1}")
            s.heading(f"Windows of {width} layer{'s' if width > 1 else ''}")
            s.table(pivot, f"{measure} with the directions removed in one window", ".4f")
            for path, caption in _curves(rows, out, f"window{width}", references, measure):
                s.image(path.name, caption)
        shown = set(full.index) | set(cumulative.index) | set(windows.index)
        rest = table[~table.index.isin(shown)]
        if len(rest):
            s.heading("Other layer selections")
            s.table(rest[["condition", "layers", measure, "delta", "t", "p_holm"]], None, FORMATS)
    s.paragraph(
        "Files: `table.csv` (one row per condition and layer range), `per_query.csv` (per-query "
        f"{measure} of every unit), `references.csv`, `results.jsonl` (the reranked runs)."
    )
    return s


def _pivot(rows: pd.DataFrame, measure: str, by: str, label: Any) -> pd.DataFrame:
    pivot = rows.pivot_table(index="condition", columns=by, values=measure, sort=False)
    pivot.columns = [label(int(c)) for c in pivot.columns]
    return pivot.reset_index()


def _heatmaps(
    table: pd.DataFrame, out: Path, n_layers: int, baseline: float, measure: str
) -> list[tuple[Path, str]]:
    if not len(table):
        return []
    single = table[table.n_directions == 1]
    names = [p.name for p in PARTS]
    panels: dict[str, np.ndarray] = {}
    for layers, group in single.groupby("layers", sort=False):
        grid = np.full((5, 5), np.nan)
        for r in group.itertuples():
            ((a, b),) = condition_from_key(r.directions).pairs
            grid[PARTS.index(a), PARTS.index(b)] = r.delta
        panels[f"layers {layers}"] = grid
    made = []
    full = layers_label(range(n_layers))
    if f"layers {full}" in panels:
        made.append(
            (
                plots.heatmap(
                    panels[f"layers {full}"],
                    out / "heatmap_all_layers.png",
                    row_labels=names,
                    col_labels=names,
                    xlabel="attended part (keys)",
                    ylabel="attending part (queries)",
                    title=f"Δ {measure} with attending->attended removed in layers {full} "
                    f"(unablated {baseline:.3f})",
                    colorbar_label=f"Δ {measure}",
                ),
                f"Δ {measure} per removed direction, all layers",
            )
        )
    if len(panels) > 1:
        ordered = dict(sorted(panels.items(), key=lambda kv: _range_sort_key(kv[0])))
        made.append(
            (
                plots.heatmap_grid(
                    ordered,
                    out / "heatmaps_by_range.png",
                    row_labels=names,
                    col_labels=names,
                    title=f"Δ {measure} per removed direction (rows attend, columns attended), "
                    "by layer range",
                    colorbar_label=f"Δ {measure}",
                ),
                f"Δ {measure} per removed direction, one panel per layer range",
            )
        )
    return made


def _range_sort_key(label: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.split(r"[-,]", label.removeprefix("layers ")))


def _curves(
    rows: pd.DataFrame, out: Path, kind: str, references: dict[str, float], measure: str
) -> list[tuple[Path, str]]:
    made = []
    x_col = "last_layer" if kind == "cumulative" else "first_layer"
    xlabel = "k (directions removed in layers 0..k)" if kind == "cumulative" else "window start"
    groups = rows.condition.isin(list(DIRECTION_GROUPS)) | (rows.n_directions > 1)
    for family, subset in (("groups", rows[groups]), ("directions", rows[rows.n_directions == 1])):
        series = {
            name: (g[x_col].tolist(), g[measure].tolist())
            for name, g in subset.sort_values(x_col).groupby("condition", sort=False)
            if len(g) > 1
        }
        if not series:
            continue
        path = plots.line_plot(
            series,
            out / f"curve_{kind}_{family}.png",
            title=f"{measure} vs layers ({kind}, {family})",
            xlabel=xlabel,
            ylabel=measure,
            references=references,
        )
        made.append((path, f"{measure} vs layer ({kind} ranges, {family})"))
    return made


if __name__ == "__main__":
    raise SystemExit(main())
