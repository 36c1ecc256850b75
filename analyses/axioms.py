"""IR axioms in a cross-encoder: how often does it agree with TFC1, TFC2, STMC1, LNC1 and LNC2,
which components carry each effect, and does it compute a semantic BM25 (term matching x IDF)?
(Chen et al. 2024, "Axiomatic Causal Interventions for Reverse Engineering Relevance Computation
in Neural Retrieval Models"; Lu, Chen & Eickhoff 2025, "A cross-encoder rediscovers a semantic
variant of BM25"; Câmara & Hauff 2020, diagnostic datasets.)

What it computes, from the first-stage candidates of ``--dataset`` (``--limit-queries``,
``--depth``):

1. **Diagnostics** (:mod:`patching.axioms`): for each axiom, pairs of documents built so that the
   axiom says which must score higher; how often the model agrees (with a sign test).
2. **Components**: every layer's attention (all heads) and MLP knocked out (zeroed), and the
   change of each axiom's mean score gap.
3. **Patching** of the aligned axioms (``--patch-axioms``, default TFC1): block patching (residual
   stream, attention and MLP outputs per layer x part), head patching (layer x head; guided exact
   top-k with ``--guided-k``), position patching (layer x position, first pairs), pattern
   patching (the top heads' attention rows), and head -> [CLS] path patching
   (:func:`patching.semantic_bm25.cls_path_patch`).
4. **Semantic BM25** (Lu et al.): duplicate-token heads; an SVD of the token embeddings against
   the collection's IDF (Spearman of the leading components); a linear soft-TF x IDF fit of the
   top head -> [CLS] heads' effects, with R² on held-out queries; the IDF direction removed from
   the embeddings, and its effect on nDCG@10 (against a random direction).
5. **Seed checks** (options): matching heads scaled at factors 0-2 (``--head-scaling``), the
   QK-subspace ablation of the matching heads against random heads (``--qk-ablation``), the FFN
   share per layer (``--ffn-share``), NIG neuron sets of one half of the queries ablated, fully
   and partly, on the other half (``--nig-percent``), and the same diagnostics and layer profiles
   for other models side by side (``--replicate``).

Example (offline, a few minutes)::

    python -m analyses.axioms --model demo --dataset demo --limit-queries 2 --output DIR
"""

from __future__ import annotations

import argparse
import json
import math
import random
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from analyses.base import Stage, Study, Unit, UsageError
from analyses.common import slug, writes_outputs
from analyses.reranking import compare_to_baseline, per_query_values, rerank_row
from analyses.summary import Summary
from mechir.lazy import lazy_import
from mechir.store import decode_array, encode_array

pd = lazy_import("pandas")
torch = lazy_import("torch")
plots = lazy_import("analyses.plots")

AXIOM_NAMES = ("TFC1", "TFC2", "STMC1", "LNC1", "LNC2")
ALIGNED = ("TFC1", "TFC2", "STMC1")
BLOCKS = ("resid_pre", "attn_out", "mlp_out")
BASELINE = "rerank:baseline"


# ====================================================================== diagnostics
def idf_statistics(args: argparse.Namespace, collection: Any, candidates: Sequence[Any]) -> Any:
    from patching import TermStatistics

    if args.idf_from == "corpus":
        return TermStatistics.from_documents(collection.docs.values())
    return TermStatistics.from_documents({p.docid: p.document for p in candidates}.values())


def require_cross_encoder(family: Any, name: str) -> None:
    """The study reads a cross-encoder's [CLS] token, its pair layout and its embedding
    matrix: prompt-based rerankers (MonoT5, LLM rerankers) are refused in one line (``family``
    None: not known before loading, checked again after)."""
    if family is not None and family.kind != "encoder":
        raise UsageError(
            f"{name}: the axioms study analyses cross-encoders ([CLS] query [SEP] document "
            f"[SEP]); {family.name} is a prompt-based reranker ({family.kind}): run "
            "patching_tfc1 and the other studies on it"
        )


def build_sets(
    model: Any, collection: Any, candidates: Sequence[Any], stats: Any, args: argparse.Namespace
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


def compute_diagnostic(model: Any, dset: Any, args: argparse.Namespace) -> dict[str, Any]:
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


# ====================================================================== components
def knockout_hooks(model: Any, layer: int, kind: str) -> Any:
    """Zero every head of ``layer`` (``hook_z``) or its MLP output (``hook_mlp_out``)."""
    from mechir.hooks import SITES, site_hooks
    from mechir.hooks.site import Zero

    site = "z" if kind == "attention" else "mlp_out"
    return site_hooks(model, SITES[site], action=Zero(), layers=[layer])


def compute_components(
    model: Any, dset: Any, layer: int, args: argparse.Namespace
) -> dict[str, Any]:
    """The axiom's per-pair gap with layer ``layer``'s attention or MLP knocked out."""
    from patching.axioms import DiagnosticSet, axiom_scores

    sub = DiagnosticSet(dset.axiom, dset.pairs[: args.component_pairs], {})
    out: dict[str, Any] = {"axiom": dset.axiom, "layer": layer}
    if not sub.pairs:
        return out | {"attention": None, "mlp": None}
    for kind in ("attention", "mlp"):
        hooks = knockout_hooks(model, layer, kind)
        frame = axiom_scores(model, sub, batch_size=args.batch_size, hooks=hooks)
        out[kind] = encode_array(frame.gap.to_numpy())
    return out


# ====================================================================== patching
def encode_result(result: Any) -> dict[str, Any]:
    return {
        "target": result.target,
        "dims": list(result.dims),
        "coords": {k: list(v) for k, v in result.coords.items()},
        "patched": encode_array(result.patched.float().numpy()),
        "clean": result.clean.tolist(),
        "corrupted": result.corrupted.tolist(),
        "pair_ids": list(result.pair_ids),
        "grades": list(result.grades),
        "method": result.method,
    }


def decode_result(row: dict[str, Any]) -> Any:
    from patching import PatchingResult

    return PatchingResult(
        target=row["target"],
        dims=tuple(row["dims"]),
        coords={k: list(v) for k, v in row["coords"].items()},
        patched=torch.from_numpy(decode_array(row["patched"])),
        clean=torch.tensor(row["clean"]),
        corrupted=torch.tensor(row["corrupted"]),
        pair_ids=list(row["pair_ids"]),
        grades=list(row["grades"]),
        method=row["method"],
    )


def patch_pairs(model: Any, dset: Any, n: int | None) -> Any:
    from patching.axioms import DiagnosticSet

    return DiagnosticSet(dset.axiom, dset.pairs[:n], {}).aligned(model.tokenizer)


def compute_patching(model: Any, pairs: Any, analysis: str, args: argparse.Namespace) -> dict:
    """One patching analysis of one axiom's aligned pairs (see the module docstring)."""
    from patching import head_target, patch_sweep, patch_top_cells, resid_target
    from patching.semantic_bm25 import cls_path_patch

    budget = dict(batch_size=None, memory_budget=args.memory_budget)
    quiet = budget | {"progress": False}
    if analysis == "heads" and args.guided_k:
        try:
            top = patch_top_cells(
                model, pairs, head_target(), k=args.guided_k, average=True,
                min_delta=args.min_delta, memory_budget=args.memory_budget, progress=False,
            )  # fmt: skip
        except ValueError:  # no pair with |clean - corrupted| >= min_delta: nothing to rank
            top = None
        if top is not None:
            heads = [f"{layer}/{head}" for layer, head in top.top_labels(0)]
            exact = patch_sweep(model, pairs, head_target(heads=heads), **quiet)
            return {"guided": heads, "n_rows": int(top.n_rows), "result": encode_result(exact)}
    if analysis == "heads":  # every head (also when guided patching found nothing to rank)
        result = patch_sweep(model, pairs, head_target(), **quiet)
    elif analysis.startswith("block:"):
        component = analysis.split(":", 1)[1]
        result = patch_sweep(model, pairs, resid_target(component, by="part"), **quiet)
    elif analysis.startswith("ffn:"):
        component = analysis.split(":", 1)[1]
        result = patch_sweep(model, pairs, resid_target(component, by="all"), **quiet)
    elif analysis == "position":
        sub = pairs[: args.position_pairs]
        result = patch_sweep(model, sub, resid_target("resid_pre", by="position"), **quiet)
    elif analysis == "cls_path":
        result = cls_path_patch(model, pairs, freeze_mlps=args.freeze_mlps, **budget)
    else:
        raise ValueError(f"unknown patching analysis {analysis!r}")
    return {"result": encode_result(result)}


def compute_pattern(model: Any, pairs: Any, heads: list[str], args: argparse.Namespace) -> dict:
    from patching import patch_sweep, pattern_target

    sub = pairs[: args.position_pairs]
    result = patch_sweep(
        model, sub, pattern_target(heads=heads), memory_budget=args.memory_budget, progress=False
    )
    return {"heads": heads, "result": encode_result(result)}


def top_heads(result: Any, n: int, min_delta: float) -> list[str]:
    """The ``n`` heads of a (layer, head) result with the largest ``|mean metric|``."""
    mean = result.mean(min_delta).numpy()
    flat = [
        (abs(float(mean[i, j])), i, j)
        for i in range(mean.shape[0])
        for j in range(mean.shape[1])
        if np.isfinite(mean[i, j])
    ]
    flat.sort(key=lambda t: (-t[0], t[1], t[2]))
    return [f"{i}/{j}" for _, i, j in flat[:n]]


# ====================================================================== semantic BM25
def compute_duplicates(model: Any, dset: Any, args: argparse.Namespace) -> dict[str, Any]:
    """Duplicate-token scores on the TFC1 documents with the term (it duplicates a query token),
    else on the candidates."""
    from patching.semantic_bm25 import duplicate_token_scores

    higher, _, _ = dset.batches(model.tokenizer)
    frame = duplicate_token_scores(model, higher, batch_size=args.batch_size)
    return {"table": frame.to_dict("list")}


def token_statistics(model: Any, collection: Any) -> tuple[Any, Any]:
    from patching.semantic_bm25 import token_idf

    d_vocab = model.embed.embed.W_E.shape[0]
    return token_idf(model.tokenizer, collection.docs.values(), d_vocab=d_vocab)


def compute_idf_svd(model: Any, collection: Any, args: argparse.Namespace) -> dict[str, Any]:
    """Spearman of the leading right singular vectors of ``W_E`` with token IDF (tokens seen in
    the corpus, no special tokens), and the IDF direction."""
    from patching.semantic_bm25 import embedding_idf_svd

    idf, df = token_statistics(model, collection)
    seen = df > 0
    seen[torch.tensor(model.tokenizer.all_special_ids, dtype=torch.long)] = False
    E = model.embed.embed.W_E.detach()
    table, direction = embedding_idf_svd(E, idf, seen, k=min(args.svd_components, min(E.shape)))
    best = int(table.spearman.abs().idxmax())
    proj = (E.float().cpu()[seen] @ direction).numpy()
    sample = np.random.default_rng(args.seed).permutation(int(seen.sum()))[:2000]
    return {
        "table": table.to_dict("list"),
        "component": int(table.component[best]),
        "direction": encode_array(direction.numpy()),
        "tokens": int(seen.sum()),
        "scatter": {
            "projection": proj[sample].tolist(),
            "idf": idf[seen].numpy()[sample].tolist(),
        },
    }


def fit_pairs(candidates: Sequence[Any], args: argparse.Namespace) -> list[Any]:
    qids = list(dict.fromkeys(p.qid for p in candidates))
    keep = set(qids[: args.fit_queries]) if args.fit_queries else set(qids)
    return [p for p in candidates if p.qid in keep]


def compute_fit(
    model: Any, pairs: Sequence[Any], heads: list[str], idf: Any, args: argparse.Namespace
) -> dict[str, Any]:
    """Per pair: the soft-TF x IDF features and each top head's effect ``s - s(head zeroed)``."""
    from mechir.hooks import head_knockout_hooks
    from patching.semantic_bm25 import soft_tf_idf

    batch = model.encode(
        [p.query for p in pairs], [p.document for p in pairs], max_length=args.max_length
    )
    with torch.no_grad():
        base = model.score(batch, batch_size=args.batch_size).double()
        effects = {
            h: (
                base
                - model.score(
                    batch, hooks=head_knockout_hooks(model, [h]), batch_size=args.batch_size
                ).double()
            ).tolist()
            for h in heads
        }
    stop = _stopword_ids(model.tokenizer)
    feats = soft_tf_idf(model.embed.embed.W_E, idf, batch, power=args.soft_tf_power, exclude=stop)
    return {
        "qids": [p.qid for p in pairs],
        "score": base.tolist(),
        "effects": effects,
        "features": feats.drop(columns="query_tokens").to_dict("list"),
    }


def _stopword_ids(tokenizer: Any) -> list[int]:
    from patching import STOPWORDS

    ids = [tokenizer(w, add_special_tokens=False)["input_ids"] for w in sorted(STOPWORDS)]
    return sorted({i[0] for i in ids if len(i) == 1})


def fit_table(row: dict[str, Any], args: argparse.Namespace) -> pd.DataFrame:
    """Linear fits ``effect ~ feature`` per head and feature; R² on held-out queries (every
    other query, in query order, is held out)."""
    from patching.semantic_bm25 import linear_fit

    qids = row["qids"]
    order = list(dict.fromkeys(qids))
    train = np.array([order.index(q) % 2 == 0 for q in qids])
    rows = []
    targets = {"score": row["score"], **{f"head {h}": v for h, v in row["effects"].items()}}
    for target, y in targets.items():
        for feature, x in row["features"].items():
            try:
                fit = linear_fit(x, y, train)
            except ValueError:
                fit = {"r2_heldout": math.nan}
            rows.append({"target": target, "feature": feature, **fit})
    return pd.DataFrame(rows)


def compute_rerank(model: Any, pairs: Sequence[Any], args: argparse.Namespace, hooks: Any) -> dict:
    return rerank_row(model, pairs, args, hooks)


def random_direction(d: int, seed: int) -> Any:
    gen = torch.Generator().manual_seed(int(seed))
    v = torch.randn(d, generator=gen)
    return v / v.norm()


# ====================================================================== seed checks
def matching_head_list(model: Any, collection: Any, args: argparse.Namespace) -> dict[str, Any]:
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


def qk_directions(spec: str, model: Any, heads: Sequence[str]) -> Any:
    """``"all"`` or ``"top:K"`` (the K largest singular directions) for every head."""
    if spec == "all":
        return "all"
    k = int(spec.split(":", 1)[1])
    return list(range(min(k, model.cfg.d_head)))


def nig_split(candidates: Sequence[Any]) -> tuple[list[Any], list[Any]]:
    """Candidates of every other query (attribution split A) and of the rest (split B)."""
    qids = list(dict.fromkeys(p.qid for p in candidates))
    a = set(qids[0::2])
    return [p for p in candidates if p.qid in a], [p for p in candidates if p.qid not in a]


def compute_nig(model: Any, pairs: Sequence[Any], qrels: Any, args: argparse.Namespace) -> dict:
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


# ====================================================================== replication
def compute_replicate(
    model_name: str, collection: Any, candidates: Sequence[Any], args: argparse.Namespace
) -> dict[str, Any]:
    """Agreement with every axiom and the TFC1 layer profile (attention / MLP knockouts) of
    another model, built with its own tokenizer and embeddings."""
    from mechir import load_cross_encoder
    from patching.axioms import agreement, axiom_scores

    model = load_cross_encoder(model_name, device=args.device)
    require_cross_encoder(model.family, model_name)
    stats = idf_statistics(args, collection, candidates)
    sets = build_sets(model, collection, candidates, stats, args)
    out: dict[str, Any] = {
        "model": model_name,
        "family": model.family.name,
        "n_layers": model.cfg.n_layers,
        "agreement": {},
        "profile": {},
    }
    for ax, dset in sets.items():
        if dset.pairs:
            out["agreement"][ax] = agreement(axiom_scores(model, dset, batch_size=args.batch_size))
    first = next((d for d in sets.values() if d.pairs and d.axiom == "TFC1"), None)
    if first is not None:
        base = compute_diagnostic(model, _first(first, args.component_pairs), args)
        base_gap = float(diagnostic_frame(base).gap.mean())
        for layer in range(model.cfg.n_layers):
            row = compute_components(model, first, layer, args)
            out["profile"][layer] = {
                k: float(decode_array(row[k]).mean()) - base_gap for k in ("attention", "mlp")
            }
    return out


def _first(dset: Any, n: int) -> Any:
    from patching.axioms import DiagnosticSet

    return DiagnosticSet(dset.axiom, dset.pairs[:n], {})


# ====================================================================== the study
class Axioms(Study):
    name = "axioms"
    work_options = (
        "min_delta",
        "top",
        "head_scaling",
        "qk_ablation",
        "qk_directions",
        "ffn_share",
        "nig_percent",
        "nig_factors",
        "replicate",
        "idf_factors",
        "measure",
    )

    @classmethod
    def add_options(cls, p: argparse.ArgumentParser) -> None:
        g = p.add_argument_group("diagnostics")
        g.add_argument(
            "--axioms", nargs="+", type=str.upper, choices=AXIOM_NAMES, default=list(AXIOM_NAMES)
        )
        g.add_argument("--max-pairs", type=int, default=100, help="pairs per axiom (at most)")
        g.add_argument(
            "--component-pairs",
            type=int,
            default=16,
            help="pairs per axiom for the per-layer attention / MLP knockouts",
        )
        g.add_argument(
            "--term-choice",
            choices=["random", "first", "max_idf", "min_idf"],
            default="random",
            help="which query term TFC1, TFC2 and STMC1 use (random: seeded per pair)",
        )
        g.add_argument("--filler", default="a", help="filler token of TFC1/TFC2")
        g.add_argument("--lnc2-copies", type=int, default=2, help="LNC2: copies of the document")
        g.add_argument(
            "--idf-from",
            choices=["corpus", "candidates"],
            default="corpus",
            help="documents of the IDF statistics",
        )
        t = p.add_argument_group("patching (Chen et al. 2024; Lu et al. 2025)")
        t.add_argument(
            "--patch-axioms",
            nargs="*",
            type=str.upper,
            choices=ALIGNED,
            default=["TFC1"],
            help="aligned axioms to patch (block, head, position, pattern, head -> CLS)",
        )
        t.add_argument("--patch-pairs", type=int, default=16, help="pairs patched per axiom")
        t.add_argument(
            "--position-pairs", type=int, default=2, help="pairs of position / pattern patching"
        )
        t.add_argument(
            "--guided-k",
            type=int,
            default=0,
            help="head patching: the exact top K heads (guided by attribution patching) instead "
            "of every head",
        )
        t.add_argument(
            "--freeze-mlps", action="store_true", help="head -> CLS paths: freeze MLPs too"
        )
        t.add_argument("--top-heads", type=int, default=3, help="top heads (pattern, fits)")
        t.add_argument(
            "--memory-budget", type=float, default=2**30, help="bytes of one expanded forward"
        )
        t.add_argument(
            "--min-delta",
            type=float,
            default=1e-3,
            help="pairs with |clean - corrupted| below this are excluded (summary option)",
        )
        t.add_argument("--top", type=int, default=10, help="rows of the top-cell tables")
        b = p.add_argument_group("semantic BM25 (Lu et al. 2025)")
        b.add_argument("--svd-components", type=int, default=10, help="leading components")
        b.add_argument(
            "--fit-queries", type=int, default=None, help="queries of the soft-TF x IDF fit"
        )
        b.add_argument("--soft-tf-power", type=float, default=4.0, help="softTF = sum cos^p")
        b.add_argument(
            "--idf-factors",
            nargs="+",
            type=float,
            default=[0.0],
            help="scale the IDF direction of the embeddings by these factors (0 removes it)",
        )
        b.add_argument("--measure", default="nDCG@10")
        s = p.add_argument_group("seed checks")
        s.add_argument(
            "--head-scaling",
            nargs="*",
            type=float,
            default=[],
            help="scale the matching heads (and random heads) by these factors, e.g. 0 0.5 1 1.5 2",
        )
        s.add_argument(
            "--matching-heads", nargs="+", default=None, help="the matching heads (default: found)"
        )
        s.add_argument(
            "--qk-ablation",
            action="store_true",
            help="remove QK singular directions of the matching heads vs random heads",
        )
        s.add_argument(
            "--qk-directions",
            nargs="+",
            default=["top:1", "all"],
            help="directions removed: 'top:K' or 'all'",
        )
        s.add_argument(
            "--ffn-share",
            action="store_true",
            help="each layer's MLP patched and knocked out beside its attention",
        )
        s.add_argument(
            "--nig-percent",
            type=float,
            default=None,
            help="NIG top-p%% neurons of one half of the queries, ablated on the other half",
        )
        s.add_argument(
            "--nig-factors",
            nargs="+",
            type=float,
            default=[0.0, 0.25, 0.5, 0.75],
            help="partial ablation: neuron activations scaled by these factors",
        )
        s.add_argument("--nig-pairs", type=int, default=32, help="pairs attributed (split A)")
        s.add_argument("--nig-steps", type=int, default=16, help="NIG integration steps")
        s.add_argument(
            "--replicate",
            nargs="*",
            default=[],
            help="other models: diagnostics and layer profiles side by side",
        )

    def check(self) -> None:
        args = self.args
        for name in ("max_pairs", "component_pairs", "patch_pairs", "position_pairs"):
            if getattr(args, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be >= 1")
        if args.top_heads < 1 or args.guided_k < 0 or args.svd_components < 1:
            raise UsageError("--top-heads and --svd-components must be >= 1, --guided-k >= 0")
        if args.lnc2_copies < 2:
            raise UsageError("--lnc2-copies must be >= 2")
        for spec in args.qk_directions:
            if spec != "all" and not (
                spec.startswith("top:") and spec[4:].isdigit() and int(spec[4:]) > 0
            ):
                raise UsageError(f"--qk-directions {spec!r}: use 'all' or 'top:K' (K >= 1)")
        if args.nig_percent is not None and not 0 < args.nig_percent <= 100:
            raise UsageError("--nig-percent must be in (0, 100]")
        from mechir.settings import model_family

        for name in (args.model, *args.replicate):
            require_cross_encoder(model_family(name), name)
        self.shape  # noqa: B018 -- the model's config is readable

    # ------------------------------------------------------------------ stages
    def stages(self) -> Iterator[Stage]:
        args = self.args
        require_cross_encoder(self.model.family, args.model)  # a hub id is known once loaded
        self.stats = idf_statistics(args, self.collection, self.candidates)
        self.sets = build_sets(self.model, self.collection, self.candidates, self.stats, args)
        if writes_outputs():
            self._write_pairs()
        yield Stage(
            "diagnostics",
            [Unit(f"diag:{ax}", f"{ax} scores", ax) for ax in args.axioms],
            lambda u: compute_diagnostic(self.model, self.sets[u.spec], args),
        )
        yield Stage(
            "components",
            [
                Unit(f"comp:{ax}:{layer}", f"{ax} layer {layer}", (ax, layer))
                for ax in args.axioms
                for layer in range(self.shape["n_layers"])
            ],
            lambda u: compute_components(self.model, self.sets[u.spec[0]], u.spec[1], args),
        )
        yield from self._patching_stages()
        yield from self._bm25_stages()
        yield from self._seed_stages()

    def _write_pairs(self) -> None:
        rows = [
            {"axiom": ax, "pair_id": p.pair_id, "grade": p.grade, "info": json.dumps(dict(p.info))}
            for ax, dset in self.sets.items()
            for p in dset.pairs
        ]
        pd.DataFrame(rows, columns=["axiom", "pair_id", "grade", "info"]).to_csv(
            self.output / "pairs.csv", index=False
        )

    @property
    def patch_axioms(self) -> list[str]:
        return [ax for ax in self.args.patch_axioms if ax in self.sets and self.sets[ax].pairs]

    def analyses(self) -> list[str]:
        out = ["heads", *(f"block:{c}" for c in BLOCKS), "position", "cls_path"]
        if self.args.ffn_share:
            out += ["ffn:attn_out", "ffn:mlp_out"]
        return out

    def _patching_stages(self) -> Iterator[Stage]:
        args = self.args
        self.pairs_of = {
            ax: patch_pairs(self.model, self.sets[ax], args.patch_pairs) for ax in self.patch_axioms
        }
        yield Stage(
            "patching",
            [
                Unit(f"patch:{ax}:{a}", f"{ax} {a}", (ax, a))
                for ax in self.patch_axioms
                for a in self.analyses()
            ],
            lambda u: compute_patching(self.model, self.pairs_of[u.spec[0]], u.spec[1], args),
        )
        units = []
        self.pattern_heads: dict[str, list[str]] = {}
        for ax in self.patch_axioms:
            heads = top_heads(self.result(f"patch:{ax}:heads"), args.top_heads, args.min_delta)
            self.pattern_heads[ax] = heads
            units.append(Unit(f"pattern:{ax}:" + ",".join(heads), f"{ax} patterns", ax))
        self.pattern_units = units
        yield Stage(
            "pattern patching",
            units,
            lambda u: compute_pattern(
                self.model, self.pairs_of[u.spec], self.pattern_heads[u.spec], args
            ),
        )

    def result(self, unit: str) -> Any:
        return decode_result(self.store.get(unit)["result"])

    def _bm25_stages(self) -> Iterator[Stage]:
        args = self.args
        tfc1 = self.sets.get("TFC1")
        units = [Unit("bm25:idf_svd", "embedding SVD vs IDF", "idf_svd")]
        if tfc1 is not None and tfc1.pairs:
            units.insert(0, Unit("bm25:duplicates", "duplicate-token heads", "duplicates"))
        self.fit_heads: list[str] = []
        if self.patch_axioms:
            path = self.result(f"patch:{self.patch_axioms[0]}:cls_path")
            self.fit_heads = top_heads(path, args.top_heads, args.min_delta)
        self.fit_pairs = fit_pairs(self.candidates, args)
        units.append(Unit("bm25:fit:" + ",".join(self.fit_heads), "soft-TF x IDF fit", "fit"))
        units.append(Unit(BASELINE, "rerank, no intervention", "baseline"))

        def compute(u: Unit) -> dict[str, Any]:
            if u.spec == "duplicates":
                return compute_duplicates(self.model, tfc1, args)
            if u.spec == "idf_svd":
                return compute_idf_svd(self.model, self.collection, args)
            if u.spec == "fit":
                idf, _ = token_statistics(self.model, self.collection)
                return compute_fit(self.model, self.fit_pairs, self.fit_heads, idf, args)
            return compute_rerank(self.model, self.candidates, args, None)

        self.bm25_units = units
        yield Stage("semantic BM25", units, compute)
        direction = torch.from_numpy(decode_array(self.store.get("bm25:idf_svd")["direction"]))
        self.idf_units = []
        for f in args.idf_factors:
            self.idf_units += [
                Unit(f"idf_edit:idf:{f:g}", f"IDF direction x{f:g}", ("idf", f)),
                Unit(f"idf_edit:random:{f:g}", f"random direction x{f:g}", ("random", f)),
            ]

        def edit(u: Unit) -> dict[str, Any]:
            from patching.semantic_bm25 import embedding_direction_hooks

            kind, f = u.spec
            v = direction if kind == "idf" else random_direction(len(direction), args.seed)
            hooks = embedding_direction_hooks(self.model, v, factor=f)
            return compute_rerank(self.model, self.candidates, args, hooks)

        yield Stage("IDF direction edit", self.idf_units, edit)

    def _seed_stages(self) -> Iterator[Stage]:
        args = self.args
        self.match_units: list[Unit] = []
        if args.head_scaling or args.qk_ablation:
            yield Stage(
                "matching heads",
                [Unit("seed:matching_heads", "matching heads", None)],
                lambda u: matching_head_list(self.model, self.collection, args),
            )
            heads = self.store.get("seed:matching_heads")["heads"]
            sets = {"matching": heads, "random": random_heads(heads, self.shape, args.seed)}
            self.head_sets = sets
            units = [
                Unit(f"scale:{name}:{f:g}", f"{name} heads x{f:g}", (name, f))
                for name in sets
                for f in args.head_scaling
                if f != 1.0
            ]
            units += [
                Unit(f"qk:{name}:{spec}", f"{name} heads QK {spec}", (name, spec))
                for name in sets
                for spec in (args.qk_directions if args.qk_ablation else [])
            ]
            self.match_units = units

            def compute(u: Unit) -> dict[str, Any]:
                from mechir.hooks import head_scaling_hooks, qk_subspace_ablation_hooks

                name, how = u.spec
                hs = self.head_sets[name]
                if u.id.startswith("scale:"):
                    hooks = head_scaling_hooks(self.model, hs, factor=how)
                else:
                    hooks = qk_subspace_ablation_hooks(
                        self.model, heads=hs, directions=qk_directions(how, self.model, hs)
                    )
                return compute_rerank(self.model, self.candidates, args, hooks) | {"heads": hs}

            yield Stage("matching heads: scaling and QK ablation", units, compute)
        self.nig_units: list[Unit] = []
        if args.nig_percent is not None:
            split_a, split_b = nig_split(self.candidates)
            if not split_a or not split_b:
                raise UsageError("--nig-percent needs at least two queries (--limit-queries)")
            self.nig_b = split_b
            yield Stage(
                "NIG attribution (split A)",
                [Unit("nig:attribution", "NIG on split A", None)],
                lambda u: compute_nig(self.model, split_a, self.collection.qrels, args),
            )
            sel, control = nig_selection(
                self.store.get("nig:attribution"), self.shape["n_layers"], args
            )
            self.nig_sets = {"NIG": sel, "random": control}
            units = [
                Unit(f"nig:{name}:{f:g}", f"{name} neurons x{f:g} on split B", (name, f))
                for name in self.nig_sets
                for f in args.nig_factors
                if f != 1.0
            ]
            self.nig_units = units

            def ablate(u: Unit) -> dict[str, Any]:
                from mechir.hooks import neuron_ablation_hooks

                name, f = u.spec
                hooks = neuron_ablation_hooks(self.model, self.nig_sets[name].neurons(), factor=f)
                row = compute_rerank(self.model, split_b, args, hooks)
                return row | {"neurons": len(self.nig_sets[name])}

            yield Stage("NIG ablation (split B)", units, ablate)
        self.rep_units = [
            Unit(f"replicate:{i}:{slug(m)}", f"replicate {m}", m)
            for i, m in enumerate(args.replicate)
        ]
        if self.rep_units:
            yield Stage(
                "replication",
                self.rep_units,
                lambda u: compute_replicate(u.spec, self.collection, self.candidates, args),
            )

    def summarize(self) -> Summary:
        return summarize(self)


build_parser = Axioms.parser
main = Axioms.main


# ====================================================================== summary
def _fmt(frame: pd.DataFrame, default: str = ".4f", **formats: str) -> dict[str, str]:
    return {c: formats.get(c, default) for c in frame.columns}


def _save_fig(fig: Any, path: Any) -> None:
    fig.savefig(path, dpi=plots.DPI, bbox_inches="tight")


def summarize(study: Axioms) -> Summary:
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


def _diagnostics_section(study: Axioms, s: Summary) -> dict[str, pd.DataFrame]:
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
    table.to_csv(out / "agreement.csv", index=False)
    pd.concat([f.assign(axiom=ax) for ax, f in frames.items()], ignore_index=True).to_csv(
        out / "diagnostics.csv", index=False
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


def _components_section(study: Axioms, s: Summary, frames: dict[str, pd.DataFrame]) -> None:
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
    table.to_csv(out / "components.csv", index=False)
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


def _patching_section(study: Axioms, s: Summary, ax: str) -> None:
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
        result.to_frame(args.min_delta).to_csv(out / f"patch_{ax}_{name}.csv.gz", index=False)
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
        result.to_frame(args.min_delta).to_csv(out / f"patch_{ax}_pattern.csv.gz", index=False)
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


def _bm25_section(study: Axioms, s: Summary) -> None:
    args, out = study.args, study.output
    s.heading("Semantic BM25 (Lu et al. 2025)")
    dup = study.store.get("bm25:duplicates")
    if dup is not None:
        table = pd.DataFrame(dup["table"])
        table.to_csv(out / "duplicate_heads.csv", index=False)
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
    table.to_csv(out / "idf_svd.csv", index=False)
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
    fit = fit_table(study.store.get(fit_unit.id), args)
    fit.to_csv(out / "soft_tf_fit.csv", index=False)
    s.heading("A linear soft-TF x IDF model of the relevance-scoring heads", 3)
    s.paragraph(
        "Target: a head's effect on each candidate's score (score minus the score with the head "
        "zeroed), for the top head -> [CLS] heads, and the score itself; features: sum over "
        "query tokens of IDF x softTF (softTF = sum over document tokens of the embedding cosine "
        f"to the power {args.soft_tf_power:g}, so exact matches count 1), its log-saturated form, "
        "and exact TF x IDF. Least squares on every other query, R² on the held-out queries."
    )
    s.table(
        fit[["target", "feature", "slope", "r2_train", "r2_heldout", "pearson_heldout"]]
        if "slope" in fit else fit,
        "soft-TF x IDF fits (held-out R²)",
        {"slope": "+.4g", "r2_train": "+.3f", "r2_heldout": "+.3f", "pearson_heldout": "+.3f"},
    )  # fmt: skip
    _idf_edit_section(study, s)


def _rerank_table(study: Axioms, units: Sequence[Unit], labels: Sequence[str]) -> pd.DataFrame:
    args = study.args
    runs = {BASELINE: study.store.get(BASELINE)["run"]}
    runs |= {u.id: study.store.get(u.id)["run"] for u in units}
    values = per_query_values(runs, study.collection.qrels, args.measure)
    frame = compare_to_baseline(values, BASELINE, [u.id for u in units], measure=args.measure)
    frame.insert(0, "condition", list(labels))
    return frame.drop(columns="unit")


def _idf_edit_section(study: Axioms, s: Summary) -> None:
    args, out = study.args, study.output
    if not study.idf_units:
        return
    labels = [
        f"{'IDF' if u.spec[0] == 'idf' else 'random'} direction x{u.spec[1]:g}"
        for u in study.idf_units
    ]
    frame = _rerank_table(study, study.idf_units, labels)
    frame.to_csv(out / "idf_edit.csv", index=False)
    base = _baseline_value(study)
    s.heading("IDF-direction edit", 3)
    s.paragraph(
        f"The IDF direction of the token embeddings scaled (0 removes it) before the embedding "
        f"LayerNorm, against a random direction; {args.measure} of the reranked candidates "
        f"(unedited: {base:.4f}), paired t-test over queries, Holm-adjusted."
    )
    s.table(frame, None, {"delta": "+.4f", "t": ".2f", "p": ".3g", "p_holm": ".3g", "queries": "d"})


def _baseline_value(study: Axioms, qids: Sequence[str] | None = None) -> float:
    values = per_query_values(
        {BASELINE: study.store.get(BASELINE)["run"]}, study.collection.qrels, study.args.measure
    )[BASELINE]
    if qids is not None:
        values = {q: v for q, v in values.items() if q in set(qids)}
    return float(np.mean(list(values.values()))) if values else math.nan


def _matching_section(study: Axioms, s: Summary) -> None:
    args, out = study.args, study.output
    info = study.store.get("seed:matching_heads")
    s.heading("Seed check: matching heads amplified, suppressed, QK-ablated")
    s.paragraph(
        f"Matching heads {', '.join(study.head_sets['matching'])} ({info['source']}); random "
        f"heads {', '.join(study.head_sets['random'])} (same number, seeded)."
    )
    labels = [u.label for u in study.match_units]
    frame = _rerank_table(study, study.match_units, labels)
    frame.to_csv(out / "matching_heads_checks.csv", index=False)
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


def _ffn_section(study: Axioms, s: Summary) -> None:
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
    table.to_csv(out / "ffn_share.csv", index=False)
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


def _nig_section(study: Axioms, s: Summary) -> None:
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
    frame.to_csv(out / "nig_ablation.csv", index=False)
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


def _replicate_section(study: Axioms, s: Summary) -> None:
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
    table.to_csv(out / "replication.csv", index=False)
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


if __name__ == "__main__":
    raise SystemExit(main())
