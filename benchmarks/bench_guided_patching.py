"""Guided exact top-k patching (``patching.patch_top_cells``) against the full exact sweep.

On the patching study's TFC1 pairs of the SciFact cross-encoder (``../shared``'s, else its embedded
demo copy: ``benchmarks/assets.py``; the first judged quick queries' BM25 candidates,
``PairBuilder`` with the study's defaults: random query content word, appended, filler "a";
``max_length`` 160), for the head sweep (every layer x head) and the
head x part sweep: wall time of ``patch_top_cells(k=10)`` (attribution patching of every cell,
then exact patching of the cells it cannot rule out) and of ``patch_sweep`` (every cell exact),
and per pair whether the top-10 cells by |exact effect| are the same set (and the same order).
Runs are interleaved (sweep, guided per safety margin ``--rtol``, repeated) in one process with
1 torch thread; times are medians, the speed-up the median of per-repeat ratios. Writes
``benchmarks/results/guided_patching_<device>.json``.

    python benchmarks/bench_guided_patching.py [--pairs 10] [--depth 5] [--repeats 1] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
from assets import default_model, quick_set  # benchmarks/ is on the path of a script run

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]


def study_pairs(model, n_pairs: int, max_length: int, depth: int, seed: int):
    """The study's TFC1 pairs: judged quick queries in order, BM25 top-``depth`` each."""
    from patching import AlignedPairs, PairBuilder

    collection = quick_set()
    builder = PairBuilder(model.tokenizer, max_length=max_length, choose="random", seed=seed)
    built_pairs = []
    for qid in collection.query_ids():
        items = collection.candidates(depth=depth, query_ids=[qid])
        built = builder.build(items, "tfc1", qrels=collection.qrels, errors="skip")
        built_pairs.extend(built.pairs)
        if len(built_pairs) >= n_pairs:
            break
    return AlignedPairs.from_pairs(built_pairs[:n_pairs], model.tokenizer).to(model.cfg.device)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def top_k(effects: torch.Tensor, k: int) -> list[list[int]]:
    """Flat indices of the k largest |effects| per pair, largest first."""
    return effects.abs().nan_to_num(-1.0).topk(k, dim=1).indices.tolist()


def bench_target(
    name: str, model, pairs, target, k: int, rtols: list[float], repeats: int, device: str
) -> list[dict]:
    """One full sweep and one guided run per ``rtol`` in each repeat; a row per ``rtol``."""
    from patching import patch_sweep, patch_top_cells

    n = len(pairs)
    times: dict[str, list[float]] = {"sweep": []} | {f"guided {r}": [] for r in rtols}
    full, guided = None, {}
    for rep in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        full = patch_sweep(model, pairs, target, progress=False)
        sync(device)
        times["sweep"].append(time.perf_counter() - t0)
        for rtol in rtols:
            t0 = time.perf_counter()
            guided[rtol] = patch_top_cells(model, pairs, target, k=k, rtol=rtol, progress=False)
            sync(device)
            times[f"guided {rtol}"].append(time.perf_counter() - t0)
        print(f"[{name}] repeat {rep + 1}/{repeats}: " + ", ".join(
            f"{key} {v[-1]:.1f} s" for key, v in times.items()), flush=True)  # fmt: skip
    assert full is not None
    effects = full.patched.reshape(n, -1).double() - full.corrupted.double()[:, None]
    want = top_k(effects, k)
    kth = effects.abs().nan_to_num(-1.0).topk(k + 1, dim=1).values
    rows = []
    for rtol, g in guided.items():
        got = g.top.tolist()
        same_set = [set(a) == set(b) for a, b in zip(want, got)]
        done = g.verified.reshape(n, -1)
        exact = g.exact.reshape(n, -1).double()
        ratios = [s / t for s, t in zip(times["sweep"], times[f"guided {rtol}"])]
        rows.append(
            {
                "target": name,
                "k": k,
                "rtol": rtol,
                "pairs": n,
                "cells_per_pair": int(effects.shape[1] - effects[0].isnan().sum()),
                "sweep_s": statistics.median(times["sweep"]),
                "guided_s": statistics.median(times[f"guided {rtol}"]),
                "speedup": statistics.median(ratios),
                "speedup_per_repeat": ratios,
                "top_k_same_set_fraction": sum(same_set) / n,
                "top_k_same_order_fraction": sum(a == b for a, b in zip(want, got)) / n,
                "pairs_with_different_top_k": [
                    pairs.pair_ids[i] for i in range(n) if not same_set[i]
                ],
                "exact_rows_guided": g.n_rows,
                "exact_rows_per_pair": g.n_rows / n,
                "exact_rows_sweep": g.n_cells_total,
                "verified_fraction": g.n_rows / g.n_cells_total,
                "certified_fraction": float(g.certified.double().mean()),
                "max_abs_diff_verified_vs_sweep": float((exact[done] - effects[done]).abs().max()),
                "median_gap_kth_to_next": float((kth[:, k - 1] - kth[:, k]).median()),
                "max_attribution_error_seen": float(g.attribution_error.max()),
            }
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=10)
    ap.add_argument("--depth", type=int, default=5, help="BM25 candidates per query")
    ap.add_argument("--max-length", type=int, default=160)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--rtol", type=float, nargs="+", default=[0.5], help="safety margins")
    ap.add_argument("--model", default=default_model(), help="directory, or 'demo'")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: default)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0, help="the study's term-choice seed")
    ap.add_argument("--targets", nargs="+", default=["heads", "heads x part"])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    from bench_patching import environment

    from mechir import load_cross_encoder
    from patching import head_target

    model = load_cross_encoder(args.model, device=args.device)
    pairs = study_pairs(model, args.pairs, args.max_length, args.depth, args.seed)
    targets = {"heads": head_target(), "heads x part": head_target(by="part")}
    load_before = os.getloadavg()
    results = [
        row
        for name in args.targets
        for row in bench_target(
            name, model, pairs, targets[name], args.k, args.rtol, args.repeats, args.device
        )
    ]
    report = {
        "benchmark": "patch_top_cells (guided exact top-k) vs patch_sweep (full exact sweep)",
        "device": args.device,
        "model": f"{'demo' if args.model == 'demo' else Path(args.model).name} "
        "(minilm-l6-ce-scifact: ../shared's, or the demo's compact copy; 6 layers x 12 heads)",
        "pairs": f"TFC1, scifact quick, depth {args.depth}, max_length {args.max_length}",
        "pair_ids": list(pairs.pair_ids),
        "seq_len": int(pairs.clean.input_ids.shape[1]),
        "settings": "patch_top_cells defaults (atol=0, window=2, spread=1, step=ceil(k/5), "
        "gradient=corrupted); rtol per row",
        "environment": environment(load_before),
        "results": results,
    }
    device = "gpu" if args.device.startswith("cuda") else "cpu"
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"guided_patching_{device}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    for r in results:
        print(
            f"{r['target']} rtol {r['rtol']}: sweep {r['sweep_s']:.1f} s, "
            f"guided {r['guided_s']:.1f} s "
            f"({r['speedup']:.1f}x), same top-{r['k']} on {r['top_k_same_set_fraction']:.0%} "
            f"of {r['pairs']} pairs, {r['verified_fraction']:.0%} of cells verified"
        )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
