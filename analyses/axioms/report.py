"""The axioms study's summary: tables, plots and the sections of ``summary.md``."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from analyses.axioms.activation_patching import decode_result, top_heads
from analyses.axioms.diagnostics import ALIGNED, BASELINE, diagnostic_frame
from analyses.axioms.regression import fit_table
from analyses.base import Study, Unit
from analyses.reranking import compare_to_baseline, per_query_values
from analyses.summary import Summary
from mechir import outputs
from mechir.lazy import lazy_import
from mechir.store import decode_array

pd = lazy_import("pandas")
torch = lazy_import("torch")
plots = lazy_import("analyses.plots")


def _save_fig(fig: Any, path: Any) -> None:
    outputs.save_figure(fig, path, dpi=plots.DPI, bbox_inches="tight")


def summarize(study: Study) -> Summary:
    """Tables, plots and the summary of a finished run."""
    args, out, store = study.args, study.output, study.store
    s = Summary(
        "IR axioms: diagnostics, patching and semantic BM25",
        "Diagnostic datasets TFC1, TFC2, STMC1, LNC1 and LNC2 (Fang et al. 2004; Câmara & Hauff "
        "2020), the components that carry them (Chen et al. 2024), and the semantic BM25 "
        "analyses of Lu, Chen & Eickhoff 2025 (duplicate-token heads, IDF in the embeddings, a "
        "soft-TF x IDF model of the relevance-scoring heads).",
    )
    s.heading("Setting")
    s.facts(
        study.setting(
            candidates=len(study.candidates),
            pairs_per_axiom=f"at most {args.max_pairs}",
            term_choice=args.term_choice,
            IDF=f"BM25 IDF over the {args.idf_from}",
            max_length=args.max_length or "model maximum",
        )
    )
    frames = _diagnostics_section(study, s)
    _components_section(study, s, frames)
    for ax in study.patch_axioms:
        _patching_section(study, s, ax)
    _bm25_section(study, s)
    if study.match_units:
        _matching_section(study, s)
    if args.ffn_share and study.patch_axioms:
        _ffn_section(study, s)
    if study.nig_units:
        _nig_section(study, s)
    if study.rep_units:
        _replicate_section(study, s)
    s.paragraph(
        "Files: `diagnostics.csv` (per pair scores), `agreement.csv`, `components.csv`, "
        "`pairs.csv` (how each pair was built), `patch_<axiom>_<analysis>.csv.gz`, "
        "`duplicate_heads.csv`, `idf_svd.csv`, `soft_tf_fit.csv`, `idf_edit.csv`, "
        "`results.jsonl`."
    )
    del store, out
    return s


def _diagnostics_section(study: Study, s: Summary) -> dict[str, pd.DataFrame]:
    from patching.axioms import STATEMENTS, agreement

    out = study.output
    frames = {}
    rows = []
    for ax in study.args.axioms:
        row = study.store.get(f"diag:{ax}")
        frame = diagnostic_frame(row)
        frames[ax] = frame
        stats = agreement(frame) if len(frame) else {"pairs": 0}
        rows.append({"axiom": ax, "statement": STATEMENTS[ax], **stats, "skipped": row["skipped"]})
    table = pd.DataFrame(rows)
    outputs.write_csv(table, out / "agreement.csv")
    outputs.write_csv(
        pd.concat([f.assign(axiom=ax) for ax, f in frames.items()], ignore_index=True),
        out / "diagnostics.csv",
    )
    s.heading("Diagnostics: does the model agree with the axioms?")
    s.paragraph(
        "Per axiom, pairs of documents built from the candidates so that the axiom says which "
        "must score higher (TFC1: one more query-term occurrence; TFC2: the second occurrence "
        "adds less than the first; STMC1: a term related to a query term, by the model's own "
        "embedding neighbours, beats an IDF-matched unrelated term; LNC1: adding a non-query "
        "term does not raise the score; LNC2: repeating the document does not lower it). "
        "Agreement = share of pairs where the model orders them as the axiom says; the sign test "
        "is against chance (1/2)."
    )
    fmt = {"pairs": "d", "skipped": "d", "sign_test_p": ".3g", "mean_gap": "+.4f"}
    s.table(table, None, fmt)
    ok = table[table.pairs > 0]
    if len(ok):
        path = out / "agreement.png"
        plots.bar_plot(
            list(ok.axiom), list(ok.agreement), path, title="agreement with each axiom",
            ylabel="share of pairs", references={"chance": 0.5},
        )  # fmt: skip
        s.image(path.name, "Agreement with TFC1, TFC2, STMC1, LNC1, LNC2")
    return frames


def _components_section(study: Study, s: Summary, frames: dict[str, pd.DataFrame]) -> None:
    args, out = study.args, study.output
    n_layers = study.shape["n_layers"]
    rows = []
    for ax in args.axioms:
        base = frames[ax].gap.to_numpy()[: args.component_pairs]
        for layer in range(n_layers):
            row = study.store.get(f"comp:{ax}:{layer}")
            for kind in ("attention", "mlp"):
                if row[kind] is None:
                    continue
                gap = decode_array(row[kind])
                rows.append(
                    {
                        "axiom": ax,
                        "layer": layer,
                        "knocked out": kind,
                        "mean gap": float(gap.mean()),
                        "Δ mean gap": float(gap.mean() - base.mean()),
                        "agreement": float(
                            (gap > 0).mean() if ax in ALIGNED else (gap >= 0).mean()
                        ),
                    }
                )
    table = pd.DataFrame(rows)
    outputs.write_csv(table, out / "components.csv")
    s.heading("Components: which layers carry each axiom?")
    s.paragraph(
        f"Each layer's attention (every head's output) or MLP output zeroed, on the first "
        f"{args.component_pairs} pairs of each axiom: the change of the mean score gap (the "
        "axiom's margin; TFC2: the drop of the gain). Negative = the component carries the "
        "effect the axiom asks for."
    )
    if table.empty:
        return
    panels = {}
    for kind in ("attention", "mlp"):
        sub = table[table["knocked out"] == kind]
        grid = np.full((len(args.axioms), n_layers), np.nan)
        for r in sub.itertuples(index=False):
            grid[args.axioms.index(r.axiom), r.layer] = r[4]
        panels[f"{kind} knocked out"] = grid
    path = out / "components.png"
    plots.heatmap_grid(
        panels, path, row_labels=list(args.axioms), col_labels=[str(i) for i in range(n_layers)],
        title="Δ mean gap per layer", colorbar_label="Δ mean gap", ncols=2,
    )  # fmt: skip
    s.image(path.name, "Change of each axiom's mean gap when a layer's attention / MLP is zeroed")
    wide = table.pivot_table(index="layer", columns=["axiom", "knocked out"], values="Δ mean gap")
    wide.columns = [f"{a} {k}" for a, k in wide.columns]
    s.table(wide.reset_index(), "Δ mean gap per layer", "+.4f")


def _patching_section(study: Study, s: Summary, ax: str) -> None:
    from patching import plot_patching

    args, out = study.args, study.output
    s.heading(f"{ax}: activation patching")
    pairs = study.pairs_of[ax]
    s.paragraph(
        f"{len(pairs)} aligned {ax} pairs: clean = the document the axiom favours, corrupted = "
        "the other; metric = (patched - corrupted) / (clean - corrupted), 1 = the component "
        f"alone restores the clean score (pairs with |clean - corrupted| < {args.min_delta} "
        "excluded)."
    )
    for a in study.analyses():
        row = study.store.get(f"patch:{ax}:{a}")
        result = decode_result(row["result"])
        name = a.replace(":", "_")
        outputs.write_csv(result.to_frame(args.min_delta), out / f"patch_{ax}_{name}.csv.gz")
        if a.startswith("ffn:"):
            continue
        fig = plot_patching(result, min_delta=args.min_delta, by_grade=a != "position")
        path = out / f"patch_{ax}_{name}.png"
        _save_fig(fig, path)
        label = {
            "heads": "head patching (layer x head)",
            "position": f"position patching (residual stream, first {args.position_pairs} pairs)",
            "cls_path": "head -> [CLS] path patching",
        }.get(a, f"block patching: {a.split(':')[-1]} per layer x part")
        if a == "heads" and "guided" in row:
            label += f" (guided: exact top {args.guided_k}, {row['n_rows']} exact patches)"
        s.image(path.name, f"{ax}: {label}")
        if a in ("heads", "cls_path"):
            heads = top_heads(result, args.top, args.min_delta)
            mean = result.mean(args.min_delta).numpy()
            top = pd.DataFrame(
                {
                    "head": heads,
                    "mean metric": [
                        float(mean[int(h.split("/")[0]), int(h.split("/")[1])]) for h in heads
                    ],
                }
            )
            s.table(top, f"{ax}: top heads, {label}", {"mean metric": "+.4f"})
    for unit in study.pattern_units:
        if unit.spec != ax:
            continue
        row = study.store.get(unit.id)
        result = decode_result(row["result"])
        outputs.write_csv(result.to_frame(args.min_delta), out / f"patch_{ax}_pattern.csv.gz")
        mean = result.mean(args.min_delta).numpy()  # [layer, head, position]
        heads = [tuple(int(x) for x in h.split("/")) for h in row["heads"]]
        grid = np.stack([mean[layer, head] for layer, head in heads])
        keep = np.isfinite(grid).any(0)
        path = out / f"patch_{ax}_pattern.png"
        plots.heatmap(
            grid[:, keep], path, row_labels=row["heads"],
            col_labels=[str(p) for p in np.arange(grid.shape[1])[keep]],
            title=f"{ax}: pattern patching (mean metric)", xlabel="query position",
            ylabel="head", colorbar_label="mean metric",
        )  # fmt: skip
        s.image(
            path.name,
            f"{ax}: pattern patching of heads {', '.join(row['heads'])} (attention rows per query "
            "position)",
        )


def _bm25_section(study: Study, s: Summary) -> None:
    args, out = study.args, study.output
    s.heading("Semantic BM25 (Lu et al. 2025)")
    dup = study.store.get("bm25:duplicates")
    if dup is not None:
        table = pd.DataFrame(dup["table"])
        outputs.write_csv(table, out / "duplicate_heads.csv")
        n_layers, n_heads = study.shape["n_layers"], study.shape["n_heads"]
        grid = np.full((n_layers, n_heads), np.nan)
        for r in table.itertuples(index=False):
            grid[r.layer, r.head] = r.ratio
        path = out / "duplicate_heads.png"
        plots.heatmap(
            grid, path, row_labels=[str(i) for i in range(n_layers)],
            col_labels=[str(i) for i in range(n_heads)], title="duplicate-token attention / "
            "uniform", xlabel="head", ylabel="layer", colorbar_label="ratio", center=1.0,
        )  # fmt: skip
        s.heading("Duplicate-token heads", 3)
        s.paragraph(
            "Attention from a query or document token to the other occurrences of the same token "
            "(on the TFC1 documents with the added term), against a uniform pattern (ratio 1)."
        )
        s.image(path.name, "Duplicate-token attention per head (ratio to uniform)")
        top = table.sort_values("ratio", ascending=False).head(args.top_heads)
        s.table(top[["label", "score", "uniform", "ratio", "tokens"]], "top duplicate-token heads",
                {"tokens": "d"})  # fmt: skip
    svd = study.store.get("bm25:idf_svd")
    table = pd.DataFrame(svd["table"])
    outputs.write_csv(table, out / "idf_svd.csv")
    best = table.loc[table.spearman.abs().idxmax()]
    s.heading("IDF in the token embeddings", 3)
    s.paragraph(
        f"SVD of the token embedding matrix W_E; Spearman correlation of each leading right "
        f"singular vector's projections with the BM25 IDF of the {svd['tokens']} tokens seen in "
        f"the corpus. **IDF direction**: component {int(best.component)}, Spearman "
        f"{best.spearman:+.3f}."
    )
    s.table(table, "embedding SVD vs IDF", {"component": "d", "p": ".3g", "spearman": "+.3f"})
    path = out / "idf_direction.png"
    plots.scatter_plot(
        svd["scatter"]["idf"], svd["scatter"]["projection"], path,
        title=f"projection on component {int(best.component)} vs IDF", xlabel="IDF",
        ylabel="W_E[t] . v",
    )  # fmt: skip
    s.image(path.name, "Token embeddings projected on the IDF direction vs IDF (sample)")
    fit_unit = next(u for u in study.bm25_units if u.spec == "fit")
    fit_row = study.store.get(fit_unit.id)
    fit = fit_table(fit_row, args)
    outputs.write_csv(fit, out / "soft_tf_fit.csv")
    s.heading("A linear soft-TF x IDF model of the relevance-scoring heads", 3)
    s.paragraph(
        "Target: a head's effect on each candidate's score (score minus the score with the head "
        "zeroed), for the top head -> [CLS] heads, and the score itself; features: sum over "
        "query tokens of IDF x softTF (softTF = sum over document tokens of the embedding cosine "
        f"to the power {args.soft_tf_power:g}, so exact matches count 1), its log-saturated form, "
        "and exact TF x IDF. Least squares on every other query, R² on the held-out queries."
    )
    s.small_sample(len(set(fit_row["qids"])) // 2, "the held-out R²")
    s.table(
        fit[["target", "feature", "slope", "r2_train", "r2_heldout", "pearson_heldout"]]
        if "slope" in fit else fit,
        "soft-TF x IDF fits (held-out R²)",
        {"slope": "+.4g", "r2_train": "+.3f", "r2_heldout": "+.3f", "pearson_heldout": "+.3f"},
    )  # fmt: skip
    _idf_edit_section(study, s)


def _rerank_table(study: Study, units: Sequence[Unit], labels: Sequence[str]) -> pd.DataFrame:
    args = study.args
    runs = {BASELINE: study.store.get(BASELINE)["run"]}
    runs |= {u.id: study.store.get(u.id)["run"] for u in units}
    values = per_query_values(runs, study.collection.qrels, args.measure)
    frame = compare_to_baseline(values, BASELINE, [u.id for u in units], measure=args.measure)
    frame.insert(0, "condition", list(labels))
    return frame.drop(columns="unit")


def _idf_edit_section(study: Study, s: Summary) -> None:
    args, out = study.args, study.output
    if not study.idf_units:
        return
    labels = [
        f"{'IDF' if u.spec[0] == 'idf' else 'random'} direction x{u.spec[1]:g}"
        for u in study.idf_units
    ]
    frame = _rerank_table(study, study.idf_units, labels)
    outputs.write_csv(frame, out / "idf_edit.csv")
    base = _baseline_value(study)
    s.heading("IDF-direction edit", 3)
    s.paragraph(
        f"The IDF direction of the token embeddings scaled (0 removes it) before the embedding "
        f"LayerNorm, against a random direction; {args.measure} of the reranked candidates "
        f"(unedited: {base:.4f}), paired t-test over queries, Holm-adjusted."
    )
    s.small_sample(int(frame["queries"].min()) if len(frame) else 0, "the paired t-tests")
    s.table(frame, None, {"delta": "+.4f", "t": ".2f", "p": ".3g", "p_holm": ".3g", "queries": "d"})


def _baseline_value(study: Study, qids: Sequence[str] | None = None) -> float:
    values = per_query_values(
        {BASELINE: study.store.get(BASELINE)["run"]}, study.collection.qrels, study.args.measure
    )[BASELINE]
    if qids is not None:
        values = {q: v for q, v in values.items() if q in set(qids)}
    return float(np.mean(list(values.values()))) if values else math.nan


def _matching_section(study: Study, s: Summary) -> None:
    args, out = study.args, study.output
    info = study.store.get("seed:matching_heads")
    s.heading("Seed check: matching heads amplified, suppressed, QK-ablated")
    s.paragraph(
        f"Matching heads {', '.join(study.head_sets['matching'])} ({info['source']}); random "
        f"heads {', '.join(study.head_sets['random'])} (same number, seeded)."
    )
    labels = [u.label for u in study.match_units]
    frame = _rerank_table(study, study.match_units, labels)
    outputs.write_csv(frame, out / "matching_heads_checks.csv")
    s.small_sample(int(frame["queries"].min()) if len(frame) else 0, "the paired t-tests")
    s.table(frame, None, {"delta": "+.4f", "t": ".2f", "p": ".3g", "p_holm": ".3g", "queries": "d"})
    if args.head_scaling:
        base = _baseline_value(study)
        series = {}
        for name in study.head_sets:
            xs = sorted({*args.head_scaling, 1.0})
            ys = []
            for f in xs:
                if f == 1.0:
                    ys.append(base)
                else:
                    row = frame[frame.condition == f"{name} heads x{f:g}"]
                    ys.append(float(row[args.measure].iloc[0]))
            series[f"{name} heads"] = (xs, ys)
        path = out / "head_scaling.png"
        plots.line_plot(
            series, path, title="heads scaled by a factor", xlabel="factor (1 = unchanged)",
            ylabel=args.measure, references={"unchanged": base},
        )  # fmt: skip
        s.image(path.name, f"{args.measure} with the matching heads (and random heads) scaled")


def _ffn_section(study: Study, s: Summary) -> None:
    args, out = study.args, study.output
    rows = []
    for ax in study.patch_axioms:
        comp = pd.read_csv(out / "components.csv")
        comp = comp[comp.axiom == ax]
        attn = decode_result(study.store.get(f"patch:{ax}:ffn:attn_out")["result"])
        mlp = decode_result(study.store.get(f"patch:{ax}:ffn:mlp_out")["result"])
        a_mean = attn.mean(args.min_delta).numpy().reshape(-1)
        m_mean = mlp.mean(args.min_delta).numpy().reshape(-1)
        for layer in range(study.shape["n_layers"]):
            ko = comp[comp.layer == layer].set_index("knocked out")["Δ mean gap"]
            ka, km = float(ko.get("attention", np.nan)), float(ko.get("mlp", np.nan))
            pa, pm = float(a_mean[layer]), float(m_mean[layer])
            rows.append(
                {
                    "axiom": ax,
                    "layer": layer,
                    "attention patched": pa,
                    "MLP patched": pm,
                    "FFN share (patching)": abs(pm) / (abs(pa) + abs(pm)) if pa or pm else np.nan,
                    "attention knocked out": ka,
                    "MLP knocked out": km,
                    "FFN share (knockout)": abs(km) / (abs(ka) + abs(km)) if ka or km else np.nan,
                }
            )
    table = pd.DataFrame(rows)
    outputs.write_csv(table, out / "ffn_share.csv")
    s.heading("Seed check: what the feed-forward networks contribute")
    s.paragraph(
        "Per layer, the attention output and the MLP output patched from the clean run (whole "
        "stream, mean metric) and knocked out (Δ mean gap); FFN share = |MLP| / (|attention| + "
        "|MLP|)."
    )
    s.table(table, None, {"layer": "d"} | {c: "+.4f" for c in table.columns[2:]})
    for ax in study.patch_axioms:
        sub = table[table.axiom == ax]
        path = out / f"ffn_share_{ax}.png"
        plots.line_plot(
            {
                "attention patched": (sub.layer, sub["attention patched"]),
                "MLP patched": (sub.layer, sub["MLP patched"]),
            },
            path, title=f"{ax}: attention vs MLP output patched per layer", xlabel="layer",
            ylabel="mean metric",
        )  # fmt: skip
        s.image(path.name, f"{ax}: attention and MLP patching per layer")


def _nig_section(study: Study, s: Summary) -> None:
    args, out = study.args, study.output
    row = study.store.get("nig:attribution")
    qids_b = list(dict.fromkeys(p.qid for p in study.nig_b))
    # compared on split B only: the baseline run restricted to B's queries
    runs = {BASELINE: study.store.get(BASELINE)["run"]}
    runs = {BASELINE: {q: d for q, d in runs[BASELINE].items() if q in set(qids_b)}}
    runs |= {u.id: study.store.get(u.id)["run"] for u in study.nig_units}
    values = per_query_values(runs, study.collection.qrels, args.measure)
    frame = compare_to_baseline(values, BASELINE, [u.id for u in study.nig_units],
                                measure=args.measure)  # fmt: skip
    frame.insert(0, "condition", [u.label for u in study.nig_units])
    frame = frame.drop(columns="unit")
    outputs.write_csv(frame, out / "nig_ablation.csv")
    base = _baseline_value(study, qids_b)
    s.heading("Seed check: NIG neurons on held-out queries, fully and partly ablated")
    s.paragraph(
        f"NIG (input path, {args.nig_steps} steps) on {row['pairs']} relevant candidates of split "
        f"A (every other query); the top {args.nig_percent:g}% neurons by mean attribution are "
        f"scaled by each factor on split B's {len(qids_b)} queries (1 = unchanged, 0 = zeroed), "
        "beside random neurons with the same count per layer."
    )
    s.table(frame, None, {"delta": "+.4f", "t": ".2f", "p": ".3g", "p_holm": ".3g", "queries": "d"})
    series = {}
    for name in study.nig_sets:
        xs = sorted({*args.nig_factors, 1.0})
        ys = [
            base if f == 1.0 else float(frame[frame.condition == f"{name} neurons x{f:g} on "
                                             "split B"][args.measure].iloc[0])
            for f in xs
        ]  # fmt: skip
        series[f"{name} neurons"] = (xs, ys)
    path = out / "nig_partial.png"
    plots.line_plot(
        series, path, title="neurons scaled on held-out queries", xlabel="factor (1 = unchanged)",
        ylabel=args.measure, references={"unchanged": base},
    )  # fmt: skip
    s.image(path.name, f"{args.measure} on split B with the NIG neurons (and random) scaled")


def _replicate_section(study: Study, s: Summary) -> None:
    args, out = study.args, study.output
    s.heading("Seed check: the same study over several models")
    models = [
        {
            "model": args.model,
            "n_layers": study.shape["n_layers"],
            "agreement": {},
            "profile": {},
        }
    ]
    agree = pd.read_csv(out / "agreement.csv")
    models[0]["agreement"] = {
        r.axiom: {"agreement": r.agreement} for r in agree.itertuples() if r.pairs > 0
    }
    comp = pd.read_csv(out / "components.csv")
    for r in comp[comp.axiom == "TFC1"].itertuples(index=False):
        models[0]["profile"].setdefault(r.layer, {})[
            "attention" if r[2] == "attention" else "mlp"
        ] = r[4]
    models += [study.store.get(u.id) for u in study.rep_units]
    for m in models:
        m["profile"] = {int(k): v for k, v in m["profile"].items()}
    rows = []
    for m in models:
        row = {"model": m["model"], "layers": m["n_layers"]}
        row |= {ax: m["agreement"].get(ax, {}).get("agreement", np.nan) for ax in args.axioms}
        rows.append(row)
    table = pd.DataFrame(rows)
    outputs.write_csv(table, out / "replication.csv")
    s.table(table, "agreement with each axiom per model", {"layers": "d"})
    for kind in ("attention", "mlp"):
        series = {}
        for m in models:
            layers = sorted(int(k) for k in m["profile"])
            if not layers:
                continue
            depth = [l / max(1, m["n_layers"] - 1) for l in layers]  # noqa: E741
            series[m["model"]] = (depth, [m["profile"][k][kind] for k in layers])
        if series:
            path = out / f"replication_{kind}.png"
            plots.line_plot(
                series, path, title=f"TFC1: Δ mean gap with each layer's {kind} knocked out",
                xlabel="relative depth (layer / (n_layers - 1))", ylabel="Δ mean gap",
            )  # fmt: skip
            s.image(path.name, f"Layer profiles side by side: {kind} knocked out (TFC1)")
