"""Feature circuits: faithfulness by node budget, attribution patching vs exact patching, time.

On the shared SciFact MiniLM cross-encoder (else the embedded demo copy), two TopK SAEs trained
through SAELens (:func:`mechir.features.training.train_sae`) on the candidates of training
queries at two successive residual sites (``blocks.3.hook_resid_pre`` -> ``blocks.4``), then the
contrastive feature circuit (:mod:`mechir.features.circuits`) of held-out relevant pairs against
copies whose query content words are replaced by the mask token
(:func:`patching.edges.replace_query_words`, as the circuit study does), keeping the pairs whose
copy scores lower (the query's words raise the score: the behaviour the circuit explains;
``--all-pairs`` keeps every pair), side by side:

* **node effects** by attribution patching (one forward + backward) and by integrated gradients
  (``--ig-steps`` per site): completeness error per SAE (their sum vs ``s(clean) -
  s(corrupted)``), and agreement with exact single-node patching (the node set to its
  corrupted value, everything else running) on the ``--exact-nodes`` nodes of largest
  ``|effect|``: Pearson, Spearman, sign agreement; time of each;
* **faithfulness by node budget**, measured exactly (every node outside the circuit at its
  corrupted value), for the nodes ranked by each method, at budgets down to 0.1% of the nodes
  (the issue's target: >= 0.8 with <= 1% of the nodes);
* pruning by cumulative influence, replacement and completeness scores, edge time.

The machine's load average is recorded before and after (the 2-core machine is shared).

    nice python benchmarks/bench_feature_circuits.py [--train-queries 40] [--steps 1500]
        [--out benchmarks/results/feature_circuits_cpu.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from assets import SCIFACT, default_model  # noqa: E402

UP, DOWN = "blocks.3.hook_resid_pre", "blocks.4.hook_resid_pre"


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def train(model, train_pairs, eval_pairs, site, args):
    import torch

    from mechir.features.saes import training_config
    from mechir.features.source import RowStream, collect_activations
    from mechir.features.training import evaluate_sae, train_sae

    def collect(pairs):
        return collect_activations(
            model, pairs, site, pairs_per_forward=args.batch_size, max_length=args.max_length
        )

    rows, t_collect = timed(lambda: collect(train_pairs))
    held = collect(eval_pairs)
    g = torch.Generator().manual_seed(0)
    eval_acts = held.acts[torch.randperm(len(held), generator=g)[:4096]]
    d = rows.acts.shape[1]
    cfg = training_config(
        "topk",
        d_in=d,
        d_sae=args.d_sae_factor * d,
        site=site,
        k=args.k,
        normalize_activations="expected_average_only_in",
    )
    sae, t_train = timed(
        lambda: train_sae(
            cfg,
            RowStream(rows.acts, batch_size=args.train_batch, seed=0),
            steps=args.steps,
            batch_size=args.train_batch,
            lr=args.lr,
            progress=False,
            seed=0,
            output=args.save_saes / site if args.save_saes else None,
        )
    )
    return sae, {
        "site": site,
        "training_rows": len(rows),
        "collect_seconds": t_collect,
        "train_seconds": t_train,
        **evaluate_sae(sae, eval_acts),
    }


def agreement(est, exact):
    import torch
    from scipy.stats import spearmanr

    return {
        "pearson": float(torch.corrcoef(torch.stack([est, exact]))[0, 1]),
        "spearman": float(spearmanr(est.numpy(), exact.numpy()).statistic),
        "sign_agreement": float((est.sign() == exact.sign()).float().mean()),
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train-queries", type=int, default=40)
    p.add_argument("--eval-queries", type=int, default=20)
    p.add_argument("--depth", type=int, default=10)
    p.add_argument("--max-length", type=int, default=160)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--train-batch", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--d-sae-factor", type=int, default=4)
    p.add_argument("--pairs", type=int, default=8, help="held-out relevant pairs")
    p.add_argument("--ig-steps", type=int, default=8)
    p.add_argument("--down-nodes", type=int, default=16)
    p.add_argument("--exact-nodes", type=int, default=30)
    p.add_argument("--influence", type=float, default=0.8)
    p.add_argument(
        "--budgets",
        type=float,
        nargs="+",
        default=[0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25],
    )
    p.add_argument(
        "--filler", default=None, help="token replacing query words (default: the mask token)"
    )
    p.add_argument(
        "--all-pairs",
        action="store_true",
        help="keep every relevant pair (default: only those whose corrupted copy scores lower)",
    )
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--save-saes", type=Path, default=None, help="keep the two SAEs here")
    p.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks/results/feature_circuits_cpu.json"
    )
    args = p.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from mechir import load_cross_encoder
    from mechir.data import load_collection
    from mechir.features.circuits import (
        baseline_nodes,
        contrastive_faithfulness,
        feature_circuit,
        node_patch_hooks,
        prune_by_influence,
    )
    from patching.edges import replace_query_words

    load_start = os.getloadavg()
    start_all = time.perf_counter()
    name = default_model()
    model = load_cross_encoder(name, device="cpu")
    if SCIFACT.exists():
        train_col = load_collection(SCIFACT, split="train")
        eval_col = load_collection(SCIFACT, split="test")
        data = "shared SciFact: train split for training, test split held out"
    else:
        train_col = eval_col = load_collection("demo")
        data = "demo SciFact quick set split by query (no train split embedded)"
    train_q = train_col.query_ids(args.train_queries)
    held_q = [q for q in eval_col.query_ids() if q not in set(train_q)][: args.eval_queries]
    train_pairs = train_col.candidates(depth=args.depth, query_ids=train_q)
    eval_pairs = eval_col.candidates(depth=args.depth, query_ids=held_q[:4])
    result = {
        "benchmark": "feature_circuits",
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "model": name,
        "data": data,
        "sites": [UP, DOWN],
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "load_average_start": load_start,
    }
    up, up_info = train(model, train_pairs, eval_pairs, UP, args)
    down, down_info = train(model, train_pairs, eval_pairs, DOWN, args)
    result["saes"] = [up_info, down_info]
    print("saes", json.dumps(result["saes"]), flush=True)

    items = [
        eval_col.pair(q, d) for q in held_q for d in eval_col.relevant(q) if d in eval_col.docs
    ]
    filler = args.filler or model.tokenizer.mask_token or "a"
    pairs, skipped = replace_query_words(
        model.tokenizer, items, max_length=args.max_length, filler=filler, qrels=eval_col.qrels
    )
    keep = list(range(len(pairs.pair_ids)))
    if not args.all_pairs:  # the behaviour to explain: the query's words raise the score
        with torch.no_grad():
            margin = model.score(pairs.clean) - model.score(pairs.corrupted)
        keep = (margin > 0).nonzero().flatten().tolist()
    keep = keep[: args.pairs]
    clean, corrupted = pairs.clean[keep], pairs.corrupted[keep]
    result["pairs"] = {
        "ids": [pairs.pair_ids[i] for i in keep],
        "filler": filler,
        "candidates": len(pairs.pair_ids),
        "selection": "all" if args.all_pairs else "s(clean) > s(corrupted)",
    }

    saes = {UP: up, DOWN: down}
    base = baseline_nodes(model, corrupted, saes)
    d_up, d_down = up.cfg.d_sae, down.cfg.d_sae

    def exact_effects(nodes, n_nodes, s_clean):
        out = []
        for node in nodes:
            keep = torch.ones(n_nodes, dtype=torch.bool)
            keep[node] = False
            masks = {
                UP: (keep[:d_up], bool(keep[d_up])),
                DOWN: (keep[d_up + 1 : d_up + 1 + d_down], bool(keep[-1])),
            }
            with torch.no_grad():
                s = model.score(clean, hooks=node_patch_hooks(model, saes, base, masks))
            out.append(s_clean - float(s.sum()))
        return torch.tensor(out)

    methods = {}
    for method in ("atp", "ig"):
        circuit, seconds = timed(
            lambda method=method: feature_circuit(
                model,
                clean,
                up,
                down,
                corrupted=corrupted,
                n_down=args.down_nodes,
                method=method,
                n_steps=args.ig_steps,
            )
        )
        effect = circuit.node_effects()
        n = circuit.n_nodes
        top = effect.abs().argsort(descending=True)[: args.exact_nodes].tolist()
        exact, t_exact = timed(lambda c=circuit, t=top: exact_effects(t, c.n_nodes, c.clean))
        budgets = sorted({max(1, int(f * n)) for f in args.budgets})  # at most f of the nodes
        kept = prune_by_influence(effect, args.influence)
        sizes = [*budgets, len(kept)]
        curve, t_curve = timed(
            lambda c=circuit, b=sizes: contrastive_faithfulness(
                model, clean, corrupted, up, down, c, b
            )
        )
        split, t_split = timed(
            lambda c=circuit, b=budgets: contrastive_faithfulness(
                model, clean, corrupted, up, down, c, b, per_site=True
            )
        )
        at_1pct = [r for r in curve[:-1] + split if r["fraction_of_nodes"] <= 0.01 + 1e-12]
        methods[method] = {
            "seconds": seconds,
            "nodes": n,
            "clean": circuit.clean,
            "corrupted": circuit.baseline,
            "completeness_error": circuit.completeness_error(),
            "replacement_score": circuit.replacement_score(),
            "completeness_score": circuit.completeness_score(),
            "kept_at_influence": len(kept),
            "faithfulness_at_influence": curve[-1]["faithfulness"],
            "faithfulness": curve[:-1],
            "faithfulness_per_site": split,
            "best_faithfulness_within_1pct": max(r["faithfulness"] for r in at_1pct),
            "best_within_1pct_per_site": max(
                r["faithfulness"] for r in split if r["fraction_of_nodes"] <= 0.01 + 1e-12
            ),
            "target_met": max(r["faithfulness"] for r in at_1pct) >= 0.8,
            "top_nodes": [
                {"node": circuit.node_label(i), "estimate": float(effect[i]), "exact": float(x)}
                for i, x in zip(top[:10], exact[:10])
            ],
            "vs_exact_patching": {
                "nodes": len(top),
                **agreement(effect[top], exact),
                "relative_error_of_sum": float(
                    (effect[top].sum() - exact.sum()).abs() / exact.abs().sum()
                ),
            },
            "exact_patching_seconds": t_exact,
            # every node's effect exactly (one forward each) vs the method's one call
            "exact_all_nodes_over_method_time": t_exact / len(top) * n / seconds,
            "faithfulness_seconds": t_curve + t_split,
        }
        brief = {k: v for k, v in methods[method].items() if k not in ("faithfulness", "top_nodes")}
        print(method, json.dumps(brief), flush=True)
    result["methods"] = methods
    result["total_seconds"] = time.perf_counter() - start_all
    result["load_average_end"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(args.out)


if __name__ == "__main__":
    main()
