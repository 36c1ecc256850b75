"""All-edge EAP-IG against exact per-edge patching (issue 22), side by side on the same pairs.

On the SciFact cross-encoder (``../shared``'s, else the embedded demo copy: ``benchmarks/
assets.py``) and relevant quick-set pairs (first judged queries, their relevant BM25 candidates)
whose query content words are replaced by the tokenizer's mask token (``--filler``; the circuit
study's corruption, :func:`patching.edges.replace_query_words`), ``max_length`` 160, one
torch thread, per pair in turn:

* **EAP-IG** of every edge (``--n-steps``: riemann_left steps, and ``auto``; also EAP): wall
  time;
* **exact, batched**: every edge patched alone with :func:`patching.edges.single_edge_scores`
  (rows join at their receiver's block): wall time, and the reference values;
* **exact, naive loop**: one patched forward per edge (:func:`patching.edges.patch_edges` with
  one edge, the pair and its corrupted row), timed on ``--naive-sample`` random edges and
  extrapolated to every edge (stated as such in the JSON), the baseline of the speed-up.

Accuracy: Spearman between EAP-IG and exact effects over every edge (per pair, and of the
mean over pairs), the overlap of the top-1% edges, and the faithfulness of the top-1% circuits
(MIB's f over the pairs' mean score, every other edge patched) of EAP-IG, EAP and exact.
Targets (issue 22): >= 100x faster than the per-edge loop; EAP-IG's top 1% reaching >= 90% of
the exact top 1%'s faithfulness.

``--memory``: peak resident memory of EAP-IG on groups of 1, 2, 4 pairs at 160 tokens (each in a
fresh process), for the SciFact model and a random BERT-large-shaped one (24 layers, d 1024, 16
heads), to say how many pairs one group may hold in 24 GB.

    python benchmarks/bench_edges.py [--pairs 4] [--n-steps 8 auto] [--filler a] [--naive-sample 60]
    python benchmarks/bench_edges.py --memory
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
from assets import default_model, quick_set  # benchmarks/ is on the path of a script run

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def bench_pairs(model, n_pairs: int, max_length: int, filler: str | None = None):
    """Relevant quick-set pairs of the first judged queries, query words replaced (by the
    tokenizer's mask token unless ``filler`` is given)."""
    from patching.edges import replace_query_words

    collection = quick_set()
    items = []
    for qid in collection.query_ids():
        judged = collection.qrels.get(str(qid), {})
        items += [
            p
            for p in collection.candidates(depth=20, query_ids=[qid])
            if judged.get(str(p.docid), 0) > 0
        ]
        if len(items) >= n_pairs:
            break
    filler = filler or getattr(model.tokenizer, "mask_token", None) or "a"
    pairs, _ = replace_query_words(
        model.tokenizer, items[:n_pairs], max_length=max_length, filler=filler,
        qrels=collection.qrels,
    )  # fmt: skip
    return pairs


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    from scipy import stats

    return float(stats.spearmanr(a.numpy(), b.numpy())[0])


def run_timing(args: argparse.Namespace) -> dict:
    from mechir import load_cross_encoder
    from patching.edges import edge_attribution, edge_graph, patch_edges
    from patching.edges.circuits import faithfulness_curve

    torch.set_num_threads(1)
    model_name = args.model or default_model()
    model = load_cross_encoder(model_name, device=args.device)
    pairs = bench_pairs(model, args.pairs, args.max_length, args.filler).to(args.device)
    settings = [s if s == "auto" else int(s) for s in args.n_steps]
    label = {s: f"eap_ig_{s}" for s in settings}
    graph = edge_graph(model)
    n = len(pairs)
    rows = []
    ig_all: dict = {s: [] for s in settings}
    eap_all, exact_all = [], []
    gen = torch.Generator().manual_seed(0)
    for i in range(n):
        one = pairs[[i]]
        igs, t_igs = {}, {}
        for setting in settings:
            igs[setting], t_igs[setting] = timed(
                edge_attribution, model, one, method="eap_ig", n_steps=setting, graph=graph
            )
        ig, t_ig = igs[settings[0]], t_igs[settings[0]]
        eap, t_eap = timed(edge_attribution, model, one, method="eap", graph=graph)
        exact, t_exact = timed(edge_attribution, model, one, method="exact", graph=graph)
        sample = torch.randperm(graph.n_edges, generator=gen)[: args.naive_sample].tolist()
        start = time.perf_counter()
        naive = [float(patch_edges(model, one, edges=[e], graph=graph)[0]) for e in sample]
        t_naive_sample = time.perf_counter() - start
        naive_effect = torch.tensor(naive) - exact.clean[0]
        t_naive = t_naive_sample / len(sample) * graph.n_edges
        k = max(1, int(0.01 * graph.n_edges))
        top_ig = set(ig.top(k).tolist())
        top_ex = set(exact.top(k).tolist())
        row = {
            "pair": one.pair_ids[0],
            "clean": float(exact.clean[0]),
            "corrupted": float(exact.corrupted[0]),
            "eap_ig_s": t_ig,
            "eap_s": t_eap,
            "exact_batched_s": t_exact,
            "naive_per_edge_s": t_naive_sample / len(sample),
            "naive_all_edges_s_extrapolated": t_naive,
            "speedup_vs_naive": t_naive / t_ig,
            "speedup_vs_batched_exact": t_exact / t_ig,
            "naive_matches_batched_exact": float(
                (naive_effect - exact.pair_scores[0, sample]).abs().max()
            ),
            "spearman_eap_ig_exact": spearman(ig.pair_scores[0], exact.pair_scores[0]),
            "spearman_eap_exact": spearman(eap.pair_scores[0], exact.pair_scores[0]),
            "top1pct_overlap_eap_ig_exact": len(top_ig & top_ex) / k,
            "eap_ig_error": float(ig.error[0]),
            "eap_ig_embedding_completeness": float(ig.embedding_completeness[0]),
        }
        for setting in settings[1:]:
            other = igs[setting]
            name = label[setting]
            row[f"{name}_s"] = t_igs[setting]
            row[f"{name}_points"] = int(other.n_points[0])
            row[f"speedup_vs_naive_{name}"] = t_naive / t_igs[setting]
            row[f"spearman_{name}_exact"] = spearman(other.pair_scores[0], exact.pair_scores[0])
            row[f"{name}_error"] = float(other.error[0])
            row[f"{name}_embedding_completeness"] = float(other.embedding_completeness[0])
        rows.append(row)
        print(json.dumps(row), flush=True)
        for setting in settings:
            ig_all[setting].append(igs[setting])
        eap_all.append(eap)
        exact_all.append(exact)
    runs_by_name = {"eap_ig": ig_all[settings[0]], "eap": eap_all, "exact": exact_all}
    runs_by_name |= {label[s]: ig_all[s] for s in settings[1:]}
    mean = {
        name: torch.cat([r.pair_scores for r in runs]).mean(0)
        for name, runs in runs_by_name.items()
    }
    curves = {}
    budgets = (0.01, 0.05, 0.1)
    for name, scores in mean.items():
        ranking = torch.argsort(scores.abs(), descending=True, stable=True)
        curve, t_curve = timed(
            faithfulness_curve, model, pairs, scores=ranking, budgets=budgets, graph=graph,
            label=name,
        )  # fmt: skip
        curves[name] = {
            "budgets": list(budgets),
            "n_edges": curve.n_edges,
            "faithfulness": curve.faithfulness.tolist(),
            "seconds": t_curve,
        }

    def share(name: str, i: int) -> float | None:
        exact_f = curves["exact"]["faithfulness"][i]
        return None if abs(exact_f) < 1e-3 else curves[name]["faithfulness"][i] / exact_f

    k = curves["exact"]["n_edges"][0]
    summary = {
        "median_speedup_vs_naive": float(
            torch.tensor([r["speedup_vs_naive"] for r in rows]).median()
        ),
        "median_speedup_vs_batched_exact": float(
            torch.tensor([r["speedup_vs_batched_exact"] for r in rows]).median()
        ),
        "spearman_mean_eap_ig_exact": spearman(mean["eap_ig"], mean["exact"]),
        "spearman_mean_eap_exact": spearman(mean["eap"], mean["exact"]),
        "top1pct_overlap_mean": len(
            set(torch.argsort(mean["eap_ig"].abs(), descending=True)[:k].tolist())
            & set(torch.argsort(mean["exact"].abs(), descending=True)[:k].tolist())
        )
        / k,
        "faithfulness": {name: c["faithfulness"] for name, c in curves.items()},
        "eap_ig_share_of_exact_faithfulness": {
            f"{b:.0%}": share("eap_ig", i) for i, b in enumerate(budgets)
        },
        "eap_share_of_exact_faithfulness": {
            f"{b:.0%}": share("eap", i) for i, b in enumerate(budgets)
        },
    }
    for setting in settings[1:]:
        name = label[setting]
        summary[f"median_speedup_vs_naive_{name}"] = float(
            torch.tensor([r[f"speedup_vs_naive_{name}"] for r in rows]).median()
        )
        summary[f"spearman_mean_{name}_exact"] = spearman(mean[name], mean["exact"])
        summary[f"{name}_share_of_exact_faithfulness"] = {
            f"{b:.0%}": share(name, i) for i, b in enumerate(budgets)
        }
    return {
        "benchmark": "bench_edges",
        "model": model_name,
        "device": args.device,
        "threads": torch.get_num_threads(),
        "pairs": n,
        "max_length": args.max_length,
        "lengths": pairs.lengths.tolist(),
        "edges": graph.n_edges,
        "n_steps": args.n_steps,
        "filler": args.filler or getattr(model.tokenizer, "mask_token", None) or "a",
        "naive_sample": args.naive_sample,
        "per_pair": rows,
        "curves": curves,
        "summary": summary,
        "machine": platform.platform(),
        "torch": torch.__version__,
        "note": "naive per-edge loop timed on a random sample of edges per pair and "
        "extrapolated to every edge; every other time measured in full, in the same process",
    }


# ---------------------------------------------------------------------- memory
#: per model, runs of (pairs in the group, EAP-IG steps): every pair's path points run in one
#: gradient pass (``max_batch = pairs * steps``), so the group is the memory unit
MEMORY_RUNS = {
    "scifact-minilm": [(1, 8), (2, 8), (4, 8)],
    "bert-large": [(1, 2), (2, 2), (1, 4)],
}


def _memory_child(kind: str, group: int, n_steps: int, length: int) -> None:
    """In a fresh process: load the model, then EAP-IG on ``group`` pairs of ``length`` tokens;
    print the peak RSS before and after (MiB)."""
    import tempfile

    torch.set_num_threads(1)
    from mechir import load_cross_encoder
    from patching.edges import edge_attribution

    if kind == "bert-large":
        from transformers import BertConfig, BertForSequenceClassification

        from tests.helpers import tiny_tokenizer

        config = BertConfig(
            vocab_size=64, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
            intermediate_size=4096, max_position_embeddings=512, num_labels=1,
        )  # fmt: skip
        hf = BertForSequenceClassification(config).eval()
        tok = tiny_tokenizer(Path(tempfile.mkdtemp()))
        model = load_cross_encoder(hf, tokenizer=tok, device="cpu")
        del hf
    else:
        model = load_cross_encoder(default_model(), device="cpu")
    ids = torch.randint(5, 60 if kind == "bert-large" else 2000, (group, length))
    from mechir.parts import cross_encoder_batch_from_tokens
    from patching import AlignedPairs

    q = [row[:10].tolist() for row in ids]
    d = [row[10 : length - 3].tolist() for row in ids]
    common = dict(cls_token_id=2 if kind == "bert-large" else 101,
                  sep_token_id=3 if kind == "bert-large" else 102, pad_token_id=0,
                  max_length=length)  # fmt: skip
    clean = cross_encoder_batch_from_tokens(q, d, **common)
    corrupted = cross_encoder_batch_from_tokens([[5] * 10 for _ in q], d, **common)
    pairs = AlignedPairs.from_batches(clean, corrupted)
    import gc
    import threading

    gc.collect()
    page = os.sysconf("SC_PAGE_SIZE")

    def rss_mib() -> float:  # the current resident set (not the high-water mark)
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * page / 2**20

    before, peak, done = rss_mib(), [0.0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss_mib())
            time.sleep(0.005)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    start = time.perf_counter()
    edge_attribution(
        model, pairs, method="eap_ig", n_steps=n_steps, max_batch=group * n_steps,
        memory_budget=2**40,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    done.set()
    thread.join()
    print(json.dumps({"before_mib": before, "peak_mib": max(peak[0], before), "seconds": seconds}))


def run_memory(args: argparse.Namespace) -> dict:
    out = {"benchmark": "bench_edges --memory", "length": args.max_length, "rows": []}
    out["note"] = (
        "peak resident memory (CPU; current RSS sampled every 5 ms during the call) of "
        "edge_attribution(eap_ig) on one group of pairs, each run in a fresh process after "
        "loading the model; every pair's path points in one gradient pass"
    )
    for kind, runs in MEMORY_RUNS.items():
        for group, n_steps in runs:
            cmd = [sys.executable, __file__, "--memory-child", kind, str(group), str(n_steps)]
            cmd += ["--max-length", str(args.max_length)]
            env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
            res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
            line = [x for x in res.stdout.splitlines() if x.startswith("{")]
            if res.returncode or not line:
                raise RuntimeError(f"{kind} x {group}: {res.stderr[-2000:]}")
            row = {"model": kind, "pairs": group, "n_steps": n_steps, "max_batch": group * n_steps}
            row |= json.loads(line[-1])
            row["eap_ig_mib"] = row["peak_mib"] - row["before_mib"]
            out["rows"].append(row)
            print(json.dumps(row), flush=True)
        peak = {
            (r["pairs"], r["n_steps"]): r["peak_mib"] for r in out["rows"] if r["model"] == kind
        }
        steps = runs[0][1]
        (g0, _), (g1, _) = runs[0], runs[1]
        per_pair = (peak[(g1, steps)] - peak[(g0, steps)]) / (g1 - g0)
        fixed = peak[(g0, steps)] - per_pair * g0
        info = {"steps": steps, "per_pair_mib": per_pair, "fixed_mib": fixed}
        more = [(g, m) for g, m in runs if m != steps]
        if more:  # the same pairs with more steps: what one more gradient row per pair costs
            g, m = more[0]
            per_row = (peak[(g, m)] - peak[(g, steps)]) / (g * (m - steps))
            info["per_gradient_row_mib"] = per_row
            info["per_pair_mib_at_8_steps"] = per_pair + (8 - steps) * per_row
        per8 = info.get("per_pair_mib_at_8_steps", per_pair)
        info["pairs_per_group_in_24gib_at_8_steps"] = int((24 * 1024 - fixed) // per8)
        out[kind] = info
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None)
    p.add_argument("--pairs", type=int, default=4)
    p.add_argument(
        "--n-steps", nargs="+", default=["8", "auto"],
        help="EAP-IG settings (riemann_left steps, or auto); the first is the headline",
    )  # fmt: skip
    p.add_argument("--filler", default=None, help="default: the tokenizer's mask token")
    p.add_argument("--naive-sample", type=int, default=60)
    p.add_argument("--max-length", type=int, default=160)
    p.add_argument("--device", default="cpu")
    p.add_argument("--memory", action="store_true")
    p.add_argument("--memory-child", nargs=3, default=None, help=argparse.SUPPRESS)
    p.add_argument("--output", type=Path, default=None)
    args = p.parse_args()
    if args.memory_child:
        kind, group, n_steps = args.memory_child
        _memory_child(kind, int(group), int(n_steps), args.max_length)
        return
    result = run_memory(args) if args.memory else run_timing(args)
    name = "edges_memory_cpu.json" if args.memory else f"edges_{args.device.split(':')[0]}.json"
    path = args.output or ROOT / "benchmarks" / "results" / name
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(path)


if __name__ == "__main__":
    main()
