"""QK-circuit SVD: which heads are built to attend from a token to tokens like itself, what do
their leading singular directions read, and do these heads coincide with the matching heads?
("Understanding Matching Mechanisms in Cross-Encoders", QK-circuit analysis.)

Every head's bilinear form ``W_QK = W_Q W_K^T`` is decomposed with one batched thin SVD
(:func:`mechir.circuits.qk_alignment`): the alignment ``sum_k S_k cos(u_k, v_k)`` (= trace of
``W_QK``), its positive-cosine variant and their normalised forms score how much of a head's
spectrum matches like with like. The top heads' leading singular directions are read as tokens
(:func:`mechir.circuits.singular_direction_tokens`: vocabulary embeddings, or residual states of
real pairs) and compared with the mean query and document states of real pairs
(:func:`mechir.circuits.singular_direction_part_cosines`). When a ``matching_heads`` run of the
same model exists, the correlation between alignment and matching-head Delta is reported.

Units of work: the alignment table, one (head, direction) token reading each, the part cosines.
Example::

    python -m analyses.qk_svd --model ../shared/models/minilm-l6-ce-scifact \\
        --dataset ../shared/data/scifact --split quick --depth 20 --max-length 160
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from analyses.base import Stage, Study, Unit, UsageError
from analyses.common import DEFAULT_RESULTS, candidate_pairs, default_run_name
from analyses.summary import Summary
from mechir import outputs
from mechir.interface import HookedReranker
from mechir.lazy import lazy_import
from mechir.selection import head_label, parse_head, select_heads

pd = lazy_import("pandas")
plots = lazy_import("analyses.plots")

SCORES = (
    "alignment",
    "alignment_norm",
    "alignment_pos",
    "alignment_pos_norm",
    "alignment_topk_norm",
    "alignment_pos_topk_norm",
)
#: matching_heads columns correlated with the alignment scores.
MATCHING_COLUMNS = ("Δ qd_max vs easy", "Δ dq_max vs easy", "Δ qd_max vs hard")


# ---------------------------------------------------------------------- units
def compute_alignment(model: HookedReranker, args: argparse.Namespace) -> dict[str, Any]:
    from mechir.circuits import qk_alignment

    return {"table": qk_alignment(model, k=args.k).to_dict("list")}


def selected_heads(alignment: pd.DataFrame, args: argparse.Namespace, shape: dict) -> list[str]:
    """The ``--top-heads`` heads by ``--rank-by``, then any ``--heads`` (validated)."""
    top = alignment.sort_values(args.rank_by, ascending=False).label.head(args.top_heads).tolist()
    cfg = argparse.Namespace(n_layers=shape["n_layers"], n_heads=shape["n_heads"])
    try:
        extra = [head_label(*h) for h in select_heads(cfg, args.heads, allow_empty=True)]
    except ValueError as err:
        raise UsageError(str(err)) from None
    return list(dict.fromkeys([*top, *extra]))


def pairs_batch(model: HookedReranker, args: argparse.Namespace, collection: Any) -> Any:
    pairs = candidate_pairs(args, collection)[: args.cosine_pairs]
    return model.encode(
        [p.query for p in pairs], [p.document for p in pairs], max_length=args.max_length
    )


def compute_tokens(
    model: HookedReranker, args: argparse.Namespace, svd: Any, batch: Any, label: str, k: int
) -> dict[str, Any]:
    from mechir.circuits import singular_direction_tokens

    table = singular_direction_tokens(
        model, label, k, n=args.tokens, svd=svd, batch=batch, batch_size=args.batch_size
    )
    return {"table": table.to_dict("list")}


def compute_cosines(
    model: HookedReranker, args: argparse.Namespace, svd: Any, batch: Any, heads: list[str]
) -> dict[str, Any]:
    from mechir.circuits import singular_direction_part_cosines

    k = min(args.directions, svd.rank)
    table = singular_direction_part_cosines(
        model, batch, k=k, heads=heads, svd=svd, batch_size=args.batch_size
    )
    return {"table": table.to_dict("list")}


# ---------------------------------------------------------------------- the study
class QKSVD(Study):
    name = "qk_svd"
    work_options = ("top_heads", "heads", "rank_by", "matching_heads")

    @classmethod
    def add_options(cls, p: argparse.ArgumentParser) -> None:
        g = p.add_argument_group("QK SVD")
        g.add_argument("--k", type=int, default=3, help="leading directions of the top-k scores")
        g.add_argument(
            "--rank-by", default="alignment_norm", choices=SCORES, help="score that picks top heads"
        )
        g.add_argument("--top-heads", type=int, default=5, help="heads whose directions are read")
        g.add_argument("--heads", nargs="*", default=[], help="more heads to read, e.g. 3/7 5/1")
        g.add_argument(
            "--directions", type=int, default=3, help="singular directions read per head"
        )
        g.add_argument(
            "--tokens", type=int, default=10, help="tokens listed per direction and sign"
        )
        g.add_argument(
            "--token-source",
            choices=["vocabulary", "pairs"],
            default="vocabulary",
            help="read directions on vocabulary embeddings or on residual states of real pairs",
        )
        g.add_argument(
            "--cosine-pairs",
            type=int,
            default=200,
            help="first-stage candidate pairs whose mean query/document states are compared",
        )
        g.add_argument(
            "--matching-heads",
            type=Path,
            default=None,
            help="a matching_heads output directory to correlate with "
            "(default: results/matching_heads/<same model, dataset, split> if present)",
        )

    def check(self) -> None:
        d_head = self.shape["d_model"] // self.shape["n_heads"]
        if not 1 <= self.args.directions <= d_head or not 1 <= self.args.k <= d_head:
            raise UsageError(f"--k and --directions must be within 1..d_head={d_head}")

    @cached_property
    def svd(self) -> Any:
        from mechir.circuits import qk_svd

        return qk_svd(self.model)

    @cached_property
    def batch(self) -> Any:
        return pairs_batch(self.model, self.args, self.collection)

    def stages(self) -> Iterator[Stage]:
        """The alignment of every head, the token readings of the selected heads' directions,
        then the part cosines of those heads."""
        args = self.args
        yield Stage(
            "alignment",
            [Unit("alignment", "alignment of all heads")],
            lambda u: compute_alignment(self.model, args),
        )
        self.alignment = pd.DataFrame(self.store.get("alignment")["table"])
        self.heads = selected_heads(self.alignment, args, self.shape)
        self.token_units = [
            Unit(f"tokens:{args.token_source}:{h}:{k}", f"head {h} direction {k}", (h, k))
            for h in self.heads
            for k in range(args.directions)
        ]
        use_pairs = args.token_source == "pairs"
        yield Stage(
            "tokens",
            self.token_units,
            lambda u: compute_tokens(
                self.model, args, self.svd, self.batch if use_pairs else None, *u.spec
            ),
        )
        self.cos_unit = Unit("cosines:" + ",".join(self.heads), "part cosines", self.heads)
        yield Stage(
            "cosines",
            [self.cos_unit],
            lambda u: compute_cosines(self.model, args, self.svd, self.batch, u.spec),
        )

    def summarize(self) -> Summary:
        return summarize(self)


build_parser = QKSVD.parser
main = QKSVD.main


# ---------------------------------------------------------------------- summary
def matching_directory(args: argparse.Namespace) -> Path | None:
    """``--matching-heads``, or the default matching_heads output of the same setting."""
    if args.matching_heads is not None:
        if not (Path(args.matching_heads) / "head_deltas.csv").exists():
            raise UsageError(f"{args.matching_heads}: no head_deltas.csv (a matching_heads run)")
        return Path(args.matching_heads)
    default = DEFAULT_RESULTS / "matching_heads" / default_run_name(args)
    return default if (default / "head_deltas.csv").exists() else None


def correlations(alignment: pd.DataFrame, deltas: pd.DataFrame) -> pd.DataFrame:
    """Pearson and Spearman correlation of every alignment score with every matching Delta,
    over the heads in both tables."""
    from scipy.stats import pearsonr, spearmanr

    merged = alignment.merge(deltas, on="label", suffixes=("", "_m"))
    rows = []
    for score in [s for s in SCORES if s in merged.columns]:
        for col in [c for c in MATCHING_COLUMNS if c in merged.columns]:
            x, y = merged[score].to_numpy(float), merged[col].to_numpy(float)
            ok = np.isfinite(x) & np.isfinite(y)
            if ok.sum() < 3 or np.std(x[ok]) == 0 or np.std(y[ok]) == 0:
                continue
            r, p_r = pearsonr(x[ok], y[ok])
            rho, p_rho = spearmanr(x[ok], y[ok])
            rows.append(
                {
                    "alignment score": score,
                    "matching Δ": col,
                    "heads": int(ok.sum()),
                    "pearson r": float(r),
                    "p (pearson)": float(p_r),
                    "spearman ρ": float(rho),
                    "p (spearman)": float(p_rho),
                }
            )
    return pd.DataFrame(rows)


def _token_summary(tables: list[pd.DataFrame], n: int) -> pd.DataFrame:
    rows = []
    for t in tables:
        head, k = t.label.iloc[0], int(t.k.iloc[0])
        row: dict[str, Any] = {"head": head, "k": k, "σ": float(t.sigma.iloc[0])}
        for vec in ("u", "v"):
            for sign in ("+", "-"):
                sel = t[(t.vector == vec) & (t.sign == sign)].sort_values("rank")
                row[f"{vec}{sign}"] = " ".join(sel.token.astype(str).head(n))
        rows.append(row)
    return pd.DataFrame(rows)


def summarize(study: QKSVD) -> Summary:
    """Write the alignment, token and cosine tables and plots of a finished run; its summary."""
    run, alignment, heads = study.run, study.alignment, study.heads
    token_units, cos_unit, shape = study.token_units, study.cos_unit, study.shape
    args, out = run.args, run.output
    n_layers, n_heads = shape["n_layers"], shape["n_heads"]
    outputs.write_csv(alignment, out / "alignment.csv")
    tokens = [pd.DataFrame(run.store.get(u.id)["table"]) for u in token_units]
    outputs.write_csv(pd.concat(tokens, ignore_index=True), out / "direction_tokens.csv")
    cosines = pd.DataFrame(run.store.get(cos_unit.id)["table"])
    outputs.write_csv(cosines, out / "part_cosines.csv")

    s = Summary(
        "QK-circuit SVD",
        "Per head, the SVD of W_QK = W_Q W_K^T: alignment = Σ_k S_k cos(u_k, v_k) (= trace "
        "W_QK) measures how much the head attends from a token to tokens like itself; "
        "`_pos` keeps only directions with cos > 0, `_norm` divides by Σ_k S_k, `topk` uses the "
        f"{args.k} leading directions. The key bias W_K b_Q (ignored by W_QK) has norm "
        "`key_bias_norm`.",
    )
    s.heading("Setting")
    s.facts(
        {
            "model": args.model,
            "score type": study.score_type,
            "heads": f"{n_layers} layers x {n_heads} heads",
            "top heads by": args.rank_by,
            "directions read per head": args.directions,
            "token source": args.token_source,
            "part cosines over": f"the first {args.cosine_pairs} candidate pairs of "
            f"{args.dataset}" + (f" ({args.split})" if args.split else ""),
        }
    )
    cols = ["label", *[c for c in SCORES if c in alignment.columns], "sigma_1", "key_bias_norm"]
    top = alignment.sort_values(args.rank_by, ascending=False).head(max(args.top_heads, 10))
    s.heading("Heads by alignment")
    s.table(top[cols], f"top heads by {args.rank_by} (all heads in alignment.csv)", ".3f")
    for score in ("alignment_norm", "alignment_pos_norm"):
        grid = np.full((n_layers, n_heads), np.nan)
        for layer, head, value in zip(alignment["layer"], alignment["head"], alignment[score]):
            grid[layer, head] = value
        path = plots.heatmap(
            grid,
            out / f"heatmap_{score}.png",
            row_labels=[str(i) for i in range(n_layers)],
            col_labels=[str(i) for i in range(n_heads)],
            xlabel="head",
            ylabel="layer",
            title=f"{score} per head",
            colorbar_label=score,
            center=0.0 if score == "alignment_norm" else None,
            highlight=[parse_head(h) for h in heads],
            fmt=".2f",
        )
        s.image(path.name, f"{score} per layer and head (outlined: heads read below)")

    s.heading("Singular directions read as tokens")
    s.paragraph(
        "Direction k adds S_k (x_q·u_k)(x_k·v_k) to the attention score: a query-side token "
        "along `u+` attends to key-side tokens along `v+` (and `u-` to `v-`). Tokens are the "
        + (
            "vocabulary embeddings as layer 0 sees them (u: query segment, v: document segment)."
            if args.token_source == "vocabulary"
            else "residual states of real pairs entering the head's layer."
        )
    )
    s.table(_token_summary(tokens, args.tokens), None, ".3g")
    s.heading("Directions vs mean query and document states")
    s.paragraph(
        "cos of u_k / v_k with the mean query (Q) and document (D) residual entering the layer; "
        "`qd` = cos(u,Q)·cos(v,D) > 0: direction k raises attention from query to document."
    )
    s.table(cosines.drop(columns=["layer", "head"]), None, "+.3f")

    mdir = matching_directory(args)
    s.heading("Alignment vs matching-head Δ")
    if mdir is None:
        s.paragraph(
            "No matching_heads run found for this model and dataset: run "
            "`python -m analyses.matching_heads` with the same options first, or pass "
            "`--matching-heads DIR`."
        )
    else:
        deltas = pd.read_csv(mdir / "head_deltas.csv")
        corr = correlations(alignment, deltas)
        outputs.write_csv(corr, out / "correlations.csv")
        s.paragraph(f"Matching-head Δ from `{mdir}`, correlated over heads.")
        if len(corr):
            s.table(corr, None, {"heads": "d", "p (pearson)": ".3g", "p (spearman)": ".3g"})
            merged = alignment.merge(deltas, on="label", suffixes=("", "_m"))
            ycol = next(c for c in MATCHING_COLUMNS if c in merged.columns)
            path = plots.scatter_plot(
                merged[args.rank_by],
                merged[ycol],
                out / "alignment_vs_matching.png",
                labels=merged.label.tolist(),
                title=f"{args.rank_by} vs {ycol}",
                xlabel=args.rank_by,
                ylabel=ycol,
            )
            s.image(path.name, f"{args.rank_by} against {ycol}, one point per head")
        else:
            s.paragraph("Too few heads with finite values to correlate.")
    s.paragraph(
        "Files: `alignment.csv` (every head), `direction_tokens.csv`, `part_cosines.csv`"
        + (", `correlations.csv`" if mdir is not None else "")
        + ", `results.jsonl`."
    )
    return s


if __name__ == "__main__":
    raise SystemExit(main())
