"""Circuit discovery: which edges of the cross-encoder carry relevance? Edge attribution (EAP-IG
and EAP) of clean pairs against pairs whose query words are replaced, top-n and greedy circuits
checked by exact edge patching (faithfulness curves, CPR/CMD), the circuit drawn, and its heads
against the matching heads (Hanna et al. 2024; MIB, Mueller et al. 2025).

Pairs: for each of the first ``--limit-queries`` judged queries, up to ``--relevant`` relevant and
``--non-relevant`` non-relevant documents among its top ``--depth`` candidates; the corrupted
input replaces every word piece of the query's content words with the filler token
(:func:`patching.edges.replace_query_words`: same length and parts, token-aligned; the
filler is the tokenizer's mask token unless ``--filler`` names another). The
metric is the relevance margin of each query (mean relevant score minus mean non-relevant score;
``--metric score``: every pair's score).

Stages (each resumable, and split across ranks under torchrun):

1. ``attribution``: per query, EAP-IG (``--n-steps`` riemann_left steps, with its error estimate)
   and EAP of every edge (:func:`patching.edges.edge_attribution`);
2. ``exact`` (``--exact-queries N``): every edge patched alone on the first N queries' pairs, the
   reference ranking (slow: one partial forward per edge and pair);
3. ``curves``: per ranking (EAP-IG, EAP, exact when computed) and budget, the top-n circuit's
   exact metric (every other edge patched);
4. ``greedy``: EAP-IG proposes, exact patching chooses (:func:`patching.edges.greedy_circuit`), up
   to ``--greedy-budget``;
5. ``matching``: the matching heads of the same queries, as ``analyses.matching_heads`` finds them
   with its defaults (relevant vs easy negatives, max Q->D attention, ``|Delta| > 0.1``).

Examples (the embedded demo: about a minute with ``--preset quick``; about half an hour with
the defaults below, the greedy search a third of it)::

    python -m analyses.circuit_discovery --model demo --dataset demo --preset quick
    python -m analyses.circuit_discovery --model demo --dataset demo --limit-queries 4 --depth 10
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from analyses.base import Stage, Study, Unit, UsageError
from analyses.common import candidate_pairs, writes_outputs
from analyses.summary import Summary
from mechir import outputs
from mechir.cli_common import float_range, fraction, positive_float, steps_or_auto
from mechir.interface import HookedReranker
from mechir.lazy import lazy_import
from mechir.store import decode_array, encode_array

pd = lazy_import("pandas")
torch = lazy_import("torch")
plots = lazy_import("analyses.plots")

BUDGETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5)
RANKINGS = ("eap_ig", "eap", "exact")


# ---------------------------------------------------------------------- pairs
def select_candidates(
    args: argparse.Namespace, collection: Any, candidates: Sequence[Any] | None = None
) -> tuple[list[Any], dict[str, str]]:
    """Per query, its first ``--relevant`` relevant and ``--non-relevant`` non-relevant
    candidates (first-stage order), and the queries left out with the reason: for the margin, a
    query lacking either kind among its top ``--depth``.

    ``candidates``: the first ``--limit-queries`` judged queries' top ``--depth`` candidates
    (default: :func:`analyses.common.candidate_pairs`, which names the file at fault when there
    are none).

    Raises:
        UsageError: no query is left, naming why each was left out and what to change.
    """
    if candidates is None:
        candidates = candidate_pairs(args, collection)
    by_query: dict[str, list[Any]] = {}
    for p in candidates:
        by_query.setdefault(str(p.qid), []).append(p)
    out, left_out = [], {}
    for qid, items in by_query.items():
        judged = collection.qrels.get(qid, {})
        rel = [p for p in items if judged.get(str(p.docid), 0) > 0][: args.relevant]
        non = [p for p in items if judged.get(str(p.docid), 0) <= 0][: args.non_relevant]
        if args.metric == "margin" and (not rel or not non):
            kind = "relevant" if not rel else "non-relevant"
            left_out[qid] = f"no {kind} document in its top {args.depth}"
            continue
        out += rel + non
    if not out:
        reasons = "; ".join(f"{q}: {r}" for q, r in list(left_out.items())[:3])
        more = f" (and {len(left_out) - 3} more)" if len(left_out) > 3 else ""
        hint = (
            "raise --depth or --limit-queries, or use --metric score"
            if args.metric == "margin"
            else "raise --depth or --limit-queries"
        )
        raise UsageError(
            f"none of the {len(by_query)} selected queries has both a relevant and a "
            f"non-relevant document among its top {args.depth} candidates ({reasons}{more}), "
            f"so the relevance margin is undefined: {hint}"
            if args.metric == "margin"
            else f"none of the {len(by_query)} selected queries has a document of the kinds asked "
            f"for (--relevant {args.relevant}, --non-relevant {args.non_relevant}) among its top "
            f"{args.depth} candidates: {hint}"
        )
    return out, left_out


def build_pairs(
    model: HookedReranker,
    collection: Any,
    args: argparse.Namespace,
    items: Sequence[Any] | None = None,
) -> tuple[Any, dict]:
    """The clean and corrupted pairs of the selected candidates (``items``: default
    :func:`select_candidates`) and the pairs skipped (no content word to replace)."""
    from patching.edges import replace_query_words

    if items is None:
        items, _ = select_candidates(args, collection)
    return replace_query_words(
        model.tokenizer,
        items,
        max_length=args.max_length or model.max_length,
        filler=filler_of(model, args),
        qrels=collection.qrels,
    )


def filler_of(model: HookedReranker, args: argparse.Namespace) -> str:
    """``--filler``, else the tokenizer's mask token (on the SciFact demo model it lowers the
    relevance margin of 8 of 10 queries, 3.22 -> 0.60 on average; "a" 6 of 10, -> 1.71), else
    "a"."""
    mask = model.tokenizer.mask_token if model.tokenizer is not None else None
    return args.filler or mask or "a"


def query_of(pair_id: str) -> str:
    return pair_id.split(":", 1)[0]


# ---------------------------------------------------------------------- the study
class CircuitDiscovery(Study):
    name = "circuit_discovery"
    needs = ("edge_circuits",)
    #: ``--preset quick``: a first look in about a minute on the embedded demo (4 queries, of
    #: which 2 have both kinds of document in their top 10, x 2 pairs; EAP-IG in 4 steps, three
    #: budgets, no greedy search, no matching heads); the default setting takes about half an
    #: hour there.
    presets = {
        "quick": {
            "limit_queries": 4,
            "depth": 10,
            "relevant": 1,
            "non_relevant": 1,
            "n_steps": 4,
            "budgets": [0.01, 0.05, 0.2],
            "greedy_budget": 0.0,
            "matching": False,
        }
    }
    work_options = ("draw_budget", "top_edges")
    output_files = ("pairs.csv", "edges.csv.gz", "faithfulness.csv", "circuit.svg")

    @classmethod
    def add_options(cls, p: argparse.ArgumentParser) -> None:
        g = p.add_argument_group("pairs")
        g.add_argument("--relevant", type=int, default=2, help="relevant documents per query")
        g.add_argument(
            "--non-relevant", type=int, default=2, help="non-relevant documents per query"
        )
        g.add_argument(
            "--filler",
            default=None,
            help="token replacing the query's content words (default: the tokenizer's mask "
            "token, else 'a')",
        )
        g.add_argument(
            "--metric",
            choices=["margin", "score"],
            default="margin",
            help="margin: per query, mean relevant minus mean non-relevant score",
        )
        a = p.add_argument_group("edge attribution")
        a.add_argument(
            "--n-steps", type=steps_or_auto, default=8, help="EAP-IG riemann_left steps, or auto"
        )
        a.add_argument("--parts", action="store_true", help="split every edge by input part")
        a.add_argument(
            "--exact-queries",
            type=int,
            default=0,
            help="also patch every edge alone on the first N queries' pairs (slow)",
        )
        a.add_argument(
            "--memory-budget", type=positive_float, default=2**30, help="bytes of one patched batch"
        )
        c = p.add_argument_group("circuits")
        c.add_argument(
            "--budgets",
            type=fraction,
            nargs="+",
            default=list(BUDGETS),
            help="edge fractions of the faithfulness curves",
        )
        c.add_argument(
            "--greedy-budget",
            type=float_range(0, 1, high_open=True),
            default=0.002,
            help="greedy search up to this edge fraction (0: no greedy search)",
        )
        c.add_argument("--greedy-step", type=int, default=None, help="edges added per round")
        c.add_argument("--greedy-window", type=int, default=None, help="candidates per round")
        c.add_argument(
            "--draw-budget", type=fraction, default=0.005, help="the drawn circuit (summary option)"
        )
        c.add_argument("--top-edges", type=int, default=20, help="edges listed (summary option)")
        c.add_argument(
            "--no-matching",
            dest="matching",
            action="store_false",
            help="skip the matching-head comparison",
        )

    def check(self) -> None:
        args = self.args
        if args.relevant < 0 or args.non_relevant < 0 or args.relevant + args.non_relevant < 1:
            raise UsageError("--relevant and --non-relevant must be >= 0, one of them >= 1")
        for option, value in (("--relevant", args.relevant), ("--non-relevant", args.non_relevant)):
            if args.metric == "margin" and value == 0:
                raise UsageError(
                    f"{option} 0: the margin metric (mean relevant minus mean non-relevant score) "
                    f"needs both kinds of document per query; give {option} 1 or more, or use "
                    "--metric score"
                )
        budgets = args.budgets
        if any(not 0 < b < 1 for b in budgets) or sorted(budgets) != budgets:
            raise UsageError("--budgets must increase within (0, 1)")
        if not 0 <= args.greedy_budget < 1 or not 0 < args.draw_budget < 1:
            raise UsageError("--greedy-budget must be in [0, 1) and --draw-budget in (0, 1)")
        if args.exact_queries < 0:
            raise UsageError("--exact-queries must be >= 0")

    # ------------------------------------------------------------------ stages
    def stages(self) -> Iterator[Stage]:
        args = self.args
        # the inputs are checked before the model loads (a file at fault is named)
        items, self.left_out = select_candidates(args, self.collection, self.candidates)
        if self.left_out and writes_outputs():  # say why fewer queries than selected are used
            selected = len(self.left_out) + len({p.qid for p in items})
            reasons = "; ".join(f"{q}: {r}" for q, r in self.left_out.items())
            print(
                f"{self.name}: {len(self.left_out)} of {selected} selected queries left out of "
                f"the margin ({reasons})",
                file=sys.stderr,
            )
        self.pairs, self.skipped = build_pairs(self.model, self.collection, args, items)
        self.queries = list(dict.fromkeys(query_of(p) for p in self.pairs.pair_ids))
        if writes_outputs():
            outputs.write_csv(
                pd.DataFrame({"pair": self.pairs.pair_ids, "grade": self.pairs.grades}),
                self.output / "pairs.csv",
            )
        yield Stage(
            "attribution",
            [Unit(f"attr:{q}", f"query {q}", q) for q in self.queries],
            self.compute_attribution,
        )
        exact_q = self.queries[: args.exact_queries]
        if exact_q:
            yield Stage(
                "exact", [Unit(f"exact:{q}", f"query {q}", q) for q in exact_q], self.compute_exact
            )
        self.gather()
        yield Stage(
            "curves",
            [
                Unit(f"curve:{r}:{b}", f"{r} {b:.1%}", (r, b))
                for r in self.rankings()
                for b in args.budgets
            ],
            self.compute_curve_point,
        )
        if args.greedy_budget > 0:
            yield Stage("greedy", [Unit("greedy", "greedy search", None)], self.compute_greedy)
        if args.matching:
            yield Stage(
                "matching", [Unit("matching", "matching heads", None)], self.compute_matching
            )

    def _query_pairs(self, qid: str) -> Any:
        idx = [i for i, p in enumerate(self.pairs.pair_ids) if query_of(p) == qid]
        return self.pairs[idx].to(self.model.cfg.device)

    def graph(self) -> Any:
        from patching.edges import edge_graph

        return edge_graph(self.model, parts=self.args.parts)

    def compute_attribution(self, unit: Unit) -> dict[str, Any]:
        from patching.edges import edge_attribution

        pairs = self._query_pairs(unit.spec)
        common = dict(graph=self.graph(), memory_budget=self.args.memory_budget)
        ig = edge_attribution(
            self.model, pairs, method="eap_ig", n_steps=self.args.n_steps, **common
        )
        eap = edge_attribution(self.model, pairs, method="eap", **common)
        return {
            "pair_ids": list(pairs.pair_ids),
            "grades": list(pairs.grades),
            "clean": ig.clean.tolist(),
            "corrupted": ig.corrupted.tolist(),
            "eap_ig": encode_array(ig.pair_scores.numpy()),
            "eap": encode_array(eap.pair_scores.numpy()),
            "error": ig.error.tolist(),
            "embedding_completeness": ig.embedding_completeness.tolist(),
            "n_points": ig.n_points.tolist(),
        }

    def compute_exact(self, unit: Unit) -> dict[str, Any]:
        from patching.edges import edge_attribution

        pairs = self._query_pairs(unit.spec)
        exact = edge_attribution(
            self.model, pairs, method="exact", graph=self.graph(),
            memory_budget=self.args.memory_budget,
        )  # fmt: skip
        return {"pair_ids": list(pairs.pair_ids), "exact": encode_array(exact.pair_scores.numpy())}

    def gather(self) -> None:
        """Per-pair effects of every method, in pair order, and the metric's unit matrix."""
        from patching.edges import metric_matrix

        rows = [self.store.get(f"attr:{q}") for q in self.queries]
        ids = [p for r in rows for p in r["pair_ids"]]
        order = [ids.index(p) for p in self.pairs.pair_ids]
        self.effects = {
            m: torch.from_numpy(np.concatenate([decode_array(r[m]) for r in rows])[order])
            for m in ("eap_ig", "eap")
        }
        self.clean = torch.tensor([x for r in rows for x in r["clean"]])[order]
        self.corrupted = torch.tensor([x for r in rows for x in r["corrupted"]])[order]
        self.rows = rows
        self.a, self.units = metric_matrix(
            self.args.metric, list(self.pairs.pair_ids), list(self.pairs.grades)
        )
        self.a = self.a.float()
        exact_rows = [self.store.get(f"exact:{q}") for q in self.queries[: self.args.exact_queries]]
        self.exact_pairs: list[str] = [p for r in exact_rows for p in r["pair_ids"]]
        if exact_rows:
            self.effects["exact"] = torch.from_numpy(
                np.concatenate([decode_array(r["exact"]) for r in exact_rows])
            )

    def rankings(self) -> list[str]:
        return [r for r in RANKINGS if r in self.effects]

    def ranking(self, name: str) -> Any:
        """Edges by ``|mean effect on the metric|`` of a method (exact: over its pairs only)."""
        effects = self.effects[name]
        if name == "exact":
            index = [list(self.pairs.pair_ids).index(p) for p in self.exact_pairs]
            a = self.a[:, index]
            keep = a.abs().sum(1) > 0
            mean = (a[keep] @ effects).mean(0) if bool(keep.any()) else effects.mean(0)
        else:
            mean = (self.a @ effects).mean(0)
        return torch.argsort(mean.abs(), descending=True, stable=True), mean

    def compute_curve_point(self, unit: Unit) -> dict[str, Any]:
        from patching.edges import patch_edge_sets
        from patching.edges.circuits import budget_edges

        name, budget = unit.spec
        graph = self.graph()
        ranking, _ = self.ranking(name)
        k = budget_edges(budget, graph.n_edges)
        outside = torch.ones(graph.n_edges, dtype=torch.bool)
        outside[ranking[:k]] = False
        scores = patch_edge_sets(
            self.model, self.pairs, sets=outside[None], graph=graph,
            memory_budget=self.args.memory_budget,
        )[:, 0]  # fmt: skip
        return {"n_edges": k, "scores": scores.tolist()}

    def compute_greedy(self, unit: Unit) -> dict[str, Any]:
        from patching.edges import EdgeScores, greedy_circuit

        args = self.args
        graph = self.graph()
        budgets = [b for b in args.budgets if b < args.greedy_budget] + [args.greedy_budget]
        scores = EdgeScores(
            graph=graph, method="eap_ig", scores=self.a @ self.effects["eap_ig"],
            pair_scores=self.effects["eap_ig"], clean=self.a @ self.clean,
            corrupted=self.a @ self.corrupted, units=list(self.units),
            pair_ids=list(self.pairs.pair_ids), source="token",
        )  # fmt: skip
        curve = greedy_circuit(
            self.model, self.pairs, scores=scores, budgets=budgets, step=args.greedy_step,
            window=args.greedy_window, graph=graph, metric=self.a,
            memory_budget=args.memory_budget,
        )  # fmt: skip
        return {
            "budgets": curve.budgets,
            "n_edges": curve.n_edges,
            "faithfulness": curve.faithfulness.tolist(),
            "circuits": [c.tolist() for c in curve.circuits],
            "trace": curve.meta["trace"],
            "rows": curve.meta["rows"],
            "step": curve.meta["step"],
            "window": curve.meta["window"],
        }

    def compute_matching(self, unit: Unit) -> dict[str, Any]:
        """The matching heads of the study's queries, as ``analyses.matching_heads`` computes
        them with its default options."""
        from analyses.matching_heads import head_deltas, study_pairs, top_matching_heads
        from mechir.matching import attention_statistics

        defaults = argparse.Namespace(
            limit_queries=None, min_rel=1, max_relevant=10, max_hard=10, n_easy=None,
            seed=self.args.seed, threshold=0.1, paired=False, correct_only=True,
        )  # fmt: skip
        table = study_pairs(defaults, self.collection)
        table = table[table.qid.astype(str).isin(self.queries)].reset_index(drop=True)
        table["pair"] = np.arange(len(table))
        batch = self.model.encode(
            list(table["query"]), list(table["document"]), max_length=self.args.max_length
        )
        stats = attention_statistics(self.model, batch, batch_size=self.args.batch_size)
        try:
            deltas, used = head_deltas(stats, table, defaults)
        except UsageError as err:
            return {"heads": [], "note": str(err), "pairs": len(table)}
        heads = top_matching_heads(deltas, defaults)
        qd = deltas[deltas.statistic == "qd_max"]
        return {
            "heads": heads,
            "pairs": len(table),
            "used_pairs": len(used),
            "deltas": qd[["label", "negative", "delta"]].to_dict("records"),
        }

    def summarize(self) -> Summary:
        return summarize(self)


build_parser = CircuitDiscovery.parser
main = CircuitDiscovery.main


# ---------------------------------------------------------------------- summary
def _curves(study: CircuitDiscovery) -> dict[str, dict[str, Any]]:
    """Per ranking: budgets, edges, faithfulness (metric means over units), CPR and CMD."""
    from patching.edges.circuits import cpr_cmd, faithfulness

    a = study.a
    m_clean = float((a @ study.clean).mean())
    m_corrupted = float((a @ study.corrupted).mean())
    out = {}
    for name in study.rankings():
        rows = [study.store.get(f"curve:{name}:{b}") for b in study.args.budgets]
        metric = torch.tensor([float((a @ torch.tensor(r["scores"])).mean()) for r in rows])
        f = faithfulness(metric, m_clean, m_corrupted)
        cpr, cmd = cpr_cmd(study.args.budgets, f.tolist())
        out[name] = {
            "budgets": list(study.args.budgets),
            "n_edges": [r["n_edges"] for r in rows],
            "faithfulness": f.tolist(),
            "cpr": cpr,
            "cmd": cmd,
        }
    if study.args.greedy_budget > 0:
        g = study.store.get("greedy")
        out["greedy (eap_ig + exact)"] = {
            "budgets": g["budgets"],
            "n_edges": g["n_edges"],
            "faithfulness": g["faithfulness"],
            "cpr": None,  # stops at --greedy-budget: no area over the whole range
            "cmd": None,
        }
    return out


def summarize(study: CircuitDiscovery) -> Summary:
    """Tables, the curves plot, the circuit drawing and the heads shared with the matching
    heads, from the stored units."""
    from scipy import stats as sstats

    from patching.edges import circuit_svg, heads_in
    from patching.edges.circuits import budget_edges

    args, out = study.args, study.output
    graph = study.graph()
    s = Summary(
        "Circuit discovery: the edges behind relevance",
        "Clean pairs against the same pairs with the query's content words replaced by "
        f"'{filler_of(study.model, args)}'; edges patched from the corrupted run.",
    )
    s.heading("Setting")
    s.facts(
        study.setting()
        | {
            "pairs": f"{len(study.pairs)} ({len(study.queries)} queries; {len(study.skipped)} "
            "skipped)",
            "queries left out": "; ".join(f"{q}: {r}" for q, r in study.left_out.items()) or "none",
            "metric": args.metric
            + (
                " (mean relevant - mean non-relevant score per query)"
                if args.metric == "margin"
                else ""
            ),  # fmt: skip
            "edge graph": f"{len(graph.senders)} senders, {len(graph.receivers)} receivers, "
            f"{graph.n_edges} edges" + (" (by part)" if args.parts else ""),
            "EAP-IG": f"riemann_left, n_steps={args.n_steps}",
            "max length": args.max_length or "model maximum",
        }
    )
    a = study.a
    m_clean, m_corr = a @ study.clean, a @ study.corrupted
    s.heading("The behaviour")
    s.table(
        pd.DataFrame(
            {
                "unit": study.units,
                "clean": m_clean.numpy(),
                "corrupted": m_corr.numpy(),
                "clean - corrupted": (m_clean - m_corr).numpy(),
            }
        ),
        f"the metric ({args.metric}) per unit",
        ".4f",
    )
    errors = np.array([e for r in study.rows for e in r["error"]])
    completeness = np.array([e for r in study.rows for e in r["embedding_completeness"]])
    s.paragraph(
        f"EAP-IG's estimated integration error (max over edges, per pair): median "
        f"{np.median(errors):.3g}, max {errors.max():.3g}; embedding completeness "
        f"(score change minus the integrated gradients of the embedding): median "
        f"{np.median(np.abs(completeness)):.3g}, max {np.abs(completeness).max():.3g}. Neither "
        "measures how far the linear estimate is from exact patching: the curves below do."
    )
    # ------------------------------------------------------------ top edges
    _, mean_ig = study.ranking("eap_ig")
    _, mean_eap = study.ranking("eap")
    frame = pd.DataFrame(
        {
            "edge": graph.edge_labels(),
            "eap_ig": mean_ig.numpy(),
            "eap": mean_eap.numpy(),
        }
    )
    if "exact" in study.effects:
        frame["exact"] = study.ranking("exact")[1].numpy()
    outputs.write_csv(frame, out / "edges.csv.gz")
    top = frame.reindex(frame.eap_ig.abs().sort_values(ascending=False).index).head(args.top_edges)
    s.heading("Edges")
    s.table(
        top,
        f"top {args.top_edges} edges by |EAP-IG| (mean effect on the metric of patching the edge "
        "alone; negative: the edge carries relevance)",
        "+.4f",
    )
    agreement = {
        "EAP vs EAP-IG": sstats.spearmanr(mean_eap.numpy(), mean_ig.numpy())[0],
    }
    if "exact" in study.effects:
        ex = frame["exact"].to_numpy()
        agreement["EAP-IG vs exact"] = sstats.spearmanr(mean_ig.numpy(), ex)[0]
        agreement["EAP vs exact"] = sstats.spearmanr(mean_eap.numpy(), ex)[0]
    s.table(
        pd.DataFrame({"pair of rankings": list(agreement), "Spearman": list(agreement.values())}),
        "rank agreement over all edges",
        ".4f",
    )
    # ------------------------------------------------------------ curves
    curves = _curves(study)
    rows = []
    for name, c in curves.items():
        for b, k, f in zip(c["budgets"], c["n_edges"], c["faithfulness"]):
            rows.append({"ranking": name, "budget": b, "edges": k, "faithfulness": f})
    curve_frame = pd.DataFrame(rows)
    outputs.write_csv(curve_frame, out / "faithfulness.csv")
    s.heading("Faithfulness")
    s.paragraph(
        "f(C) = (m(C) - m(empty)) / (m(N) - m(empty)) with every edge outside the circuit "
        "patched from the corrupted run (MIB's definition); CPR: area under f, CMD: area "
        "between f and 1, trapezoids over the edge fractions and 100% (f = 1)."
        + (
            " The greedy search stops at --greedy-budget (rounds of "
            f"{study.store.get('greedy')['step']} edges out of "
            f"{study.store.get('greedy')['window']} candidates, every circuit patched exactly): "
            "it has no CPR/CMD over the whole range."
            if args.greedy_budget > 0
            else ""
        )
    )
    wide = curve_frame.pivot(index="budget", columns="ranking", values="faithfulness")
    wide.insert(0, "edges", [budget_edges(b, graph.n_edges) for b in wide.index])
    wide = wide.reset_index()
    s.table(wide, "faithfulness per edge budget (fraction of all edges)", ".4f")
    s.table(
        pd.DataFrame(
            [
                {"ranking": n, "CPR": c["cpr"], "CMD": c["cmd"]}
                for n, c in curves.items()
                if c["cpr"] is not None
            ]
        ),
        "CPR (higher is better) and CMD (lower is better)",
        ".4f",
    )
    plot = plots.line_plot(
        {n: (c["budgets"], c["faithfulness"]) for n, c in curves.items()},
        out / "faithfulness.png",
        title="faithfulness of top-n circuits",
        xlabel="edges in the circuit (fraction)",
        ylabel="faithfulness f(C)",
        references={"whole model": 1.0, "empty circuit": 0.0},
        logx=True,
    )
    s.image(plot.name, "faithfulness curves (exact patching of every circuit)")
    # ------------------------------------------------------------ the circuit
    k = budget_edges(args.draw_budget, graph.n_edges)
    ranking, _ = study.ranking("eap_ig")
    circuit = ranking[:k]
    from patching.edges import EdgeScores

    scores = EdgeScores(
        graph=graph, method="eap_ig", scores=a @ study.effects["eap_ig"],
        pair_scores=study.effects["eap_ig"], clean=m_clean, corrupted=m_corr,
        units=list(study.units), pair_ids=list(study.pairs.pair_ids), source="token",
    )  # fmt: skip
    svg = circuit_svg(graph, circuit, scores, title=f"EAP-IG top {k} edges")
    outputs.write_text(out / "circuit.svg", svg)
    s.heading("The circuit")
    s.image("circuit.svg", f"the top {k} edges by |EAP-IG| ({args.draw_budget:.1%} of the edges)")
    heads = [f"{lay}/{h}" for lay, h in heads_in(graph, circuit)]
    if args.matching:
        m = study.store.get("matching")
        matching = m["heads"]
        shared = [h for h in heads if h in matching]
        s.heading("Heads shared with the matching heads")
        s.facts(
            {
                "heads of the circuit": ", ".join(heads) or "none",
                "matching heads (|Δ qd_max| > 0.1, relevant vs easy negatives)": ", ".join(matching)
                or f"none ({m.get('note', 'no head above the threshold')})",
                "shared": f"{len(shared)}: " + (", ".join(shared) or "none"),
            }
        )
    s.paragraph(
        "Files: `edges.csv.gz` (every edge's mean effect per method), `faithfulness.csv`, "
        "`circuit.svg`, `pairs.csv`, `results.jsonl`."
    )
    return s


if __name__ == "__main__":
    raise SystemExit(main())
