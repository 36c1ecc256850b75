"""Pruning the neurons NIG selects: does zeroing them hurt reranking more than random neurons?

1. Attribute (input path / neuron conductance, ``riemann_right``) the shared SciFact
   cross-encoder's relevance score to its FFN neurons on judged-relevant (query, document) pairs
   of the SciFact **train** split (a subset of queries), averaged in a streaming accumulator; the
   same for the non-relevant class (``prob:non_relevant``) on the top BM25 non-relevant document
   of the same queries with ``--groups non_relevant`` (or ``relevant,non_relevant``).
2. Select the global top 0.05% and 0.5% of neurons by signed mean attribution.
3. Rerank the quick SciFact test set (50 queries x BM25 top-20 = 1,000 pairs) unpruned, with the
   selected neurons zeroed, and with random controls of the same per-layer counts (several seeds);
   nDCG@10, paired t-tests over queries.

Attribution and evaluation use disjoint queries (train vs test). Writes
``benchmarks/results/nig_pruning_cpu.json``.

    python benchmarks/bench_nig_pruning.py [--attr-queries 40] [--n-steps 16] [--seeds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from assets import SCIFACT, SHARED_MODEL  # benchmarks/ is on the path of a script run

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--attr-queries", type=int, default=40, help="train queries to attribute on")
    ap.add_argument("--n-steps", type=int, default=16)
    ap.add_argument("--percents", default="0.05,0.5")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--max-length", type=int, default=160)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--groups", default="relevant", help="relevant and/or non_relevant")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/nig_pruning_cpu.json"))
    args = ap.parse_args()
    if not SHARED_MODEL.exists():
        print(f"{SHARED_MODEL} not found: this benchmark needs the shared assets")
        return

    import torch

    torch.set_num_threads(args.threads)
    from mechir import load_cross_encoder
    from mechir.attribution import (
        mean_neuron_attributions,
        pair_batches,
        pruning_evaluation,
        top_neurons,
    )
    from mechir.data import load_collection

    model = load_cross_encoder(str(SHARED_MODEL), device="cpu")
    train = load_collection(SCIFACT, split="train")
    quick = load_collection(SCIFACT, split="quick")
    qids = train.query_ids(args.attr_queries)
    wanted = args.groups.split(",")
    if not set(wanted) <= {"relevant", "non_relevant"}:
        raise SystemExit(f"--groups: choose from relevant, non_relevant; got {args.groups}")
    all_groups = {
        "relevant": lambda: [train.pair(q, d) for q in qids for d in train.relevant(q)],
        "non_relevant": lambda: [train.pair(q, train.hard_negatives(q)[0]) for q in qids],
    }
    groups = {g: all_groups[g]() for g in wanted}
    targets = {"relevant": "score", "non_relevant": "prob:non_relevant"}

    percents = [float(p) for p in args.percents.split(",")]
    selections, attribution = {}, {}
    for group, pairs in groups.items():
        t0 = time.perf_counter()
        means = mean_neuron_attributions(
            model,
            pair_batches(model, pairs, batch_size=4, max_length=args.max_length),
            path="input",
            method="riemann_right",
            n_steps=args.n_steps,
            target=targets[group],
        )
        scores = means.mean("all")
        attribution[group] = {
            "pairs": len(pairs),
            "target": targets[group],
            "seconds": time.perf_counter() - t0,
            "mean_abs_embedding_completeness": float(means.completeness.mean.mean()),
            "per_layer_mean_attribution": scores.sum(-1).tolist(),
        }
        print(f"attributed {len(pairs)} {group} pairs in {attribution[group]['seconds']:.0f} s")
        for p in percents:
            label = f"{group} top {p:g}%"
            selections[label] = top_neurons(scores, p, n_layers=model.cfg.n_layers, label=label)

    t0 = time.perf_counter()
    result = pruning_evaluation(
        model,
        quick.candidates(depth=20),
        quick.qrels,
        selections,
        seeds=list(range(args.seeds)),
        max_length=args.max_length,
        batch_size=32,
        progress=True,
    )
    eval_seconds = time.perf_counter() - t0
    report = {
        "benchmark": "NIG neuron selection validated by pruning (nDCG@10)",
        "model": str(SHARED_MODEL),
        "device": "cpu",
        "torch_threads": args.threads,
        "attribution": {
            "split": "scifact train (relevant: judged-relevant pairs; non_relevant: the top "
            "BM25 document not judged relevant, one per query)",
            "queries": len(qids),
            "path": "input (neuron conductance)",
            "method": "riemann_right",
            "n_steps": args.n_steps,
            "baseline": "pad (query and document [PAD], [CLS]/[SEP] kept)",
            "selection": "global signed top-p% (positive) of the mean per-neuron attribution",
            "groups": attribution,
        },
        "evaluation": {
            "collection": "scifact quick (50 test queries x BM25 top-20)",
            "pairs": len(quick.candidates(depth=20)),
            "seeds": args.seeds,
            "seconds": eval_seconds,
        },
        "summary": result.summary.to_dict(orient="records"),
        "conditions": result.conditions.to_dict(orient="records"),
        "selected_neurons": {
            name: sel.table.to_dict(orient="records") for name, sel in selections.items()
        },
        "per_layer_counts": {name: sel.per_layer() for name, sel in selections.items()},
        "gpu": "not available in this environment",
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=float) + "\n")
    print(result.summary.to_string())
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
