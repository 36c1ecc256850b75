"""Guided top-k patching (``patching.patch_top_cells``) against full exact sweeps: miss rate, speed.

On the patching study's TFC1 pairs of the SciFact cross-encoder (``../shared``'s, else its embedded
demo copy: ``benchmarks/assets.py``; the judged quick queries in order, BM25 top ``--depth`` each,
``PairBuilder`` with the study's defaults: random query content word, appended, filler "a";
``max_length`` 160; the first ``--pairs`` = 50), for every target kind (heads, heads x part,
resid_pre / attn_out / mlp_out by part and by position, queries and keys by part, attention
pattern rows, neurons; the per-position, pattern and neuron grids restricted as stated in
``targets()`` and in the JSON):

1. the full exact sweep (``patch_sweep``, timed) and both gradient rules' attribution estimates
   of every cell, once per target, cached under ``--cache`` and reused for every ``k``;
2. ``patch_top_cells(k)`` at its defaults for k in {1, 3, 5, 10, 20} (k below the number of
   cells), timed: per pair, whether its top k is the sweep's (the sorted |exact effects| of its k
   cells equal the sweep's k largest, within 1e-5: ties are not misses), how it ended (certified =
   every cell patched exactly; stopped by estimate; capped), and that no certified pair misses;
3. ``simulate_top_cells`` (the search replayed on the sweep's effects, no model runs) for a grid of
   safety margins ``--rtol-grid`` and spreads ``--spreads``, per pair and for the mean over pairs
   (``average=True``): the miss rate of each setting; its replay of the defaults is checked
   against the real runs of step 2.

Miss rate = pairs whose top k differs from the sweep's / pairs. 1 torch thread; the sweeps are
timed in step 1 (possibly an earlier process, under other load: the row counts are the load-free
cost), the guided runs in step 2. Results are written after every target to
``benchmarks/results/guided_patching_<device>.json``.

    python benchmarks/bench_guided_patching.py [--pairs 50] [--targets heads ...] [--cache DIR]
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

#: Layers of the per-position residual targets and heads of the pattern target (the full grids
#: cost 960 and 11,520 exact rows per pair: restricted, stated in the JSON).
POSITION_LAYERS = (0, 3)
PATTERN_HEADS = ("0/0", "3/0")
NEURON_STRIDE = 48  # neurons 0, 48, ..., 1488 of every layer: 32 per layer


def targets() -> dict[str, tuple]:
    """``{name: (target, restriction or None)}``, cheap targets first."""
    from patching import head_target, neuron_target, pattern_target, qk_target, resid_target

    out: dict[str, tuple] = {"heads": (head_target(), None)}
    for comp in ("resid_pre", "attn_out", "mlp_out"):
        out[f"{comp} x part"] = (resid_target(comp, by="part"), None)
    out["heads x part"] = (head_target(by="part"), None)
    out["neurons"] = (
        neuron_target({lay: range(0, 1536, NEURON_STRIDE) for lay in range(6)}),
        f"neurons 0, {NEURON_STRIDE}, ..., 1488 of each layer (32 of 1536 per layer)",
    )
    out["q x part"] = (qk_target("q", by="part"), None)
    out["k x part"] = (qk_target("k", by="part"), None)
    for comp in ("resid_pre", "attn_out", "mlp_out"):
        out[f"{comp} x position"] = (
            resid_target(comp, by="position", layers=POSITION_LAYERS),
            f"layers {', '.join(map(str, POSITION_LAYERS))} only",
        )
    out["pattern x query position"] = (
        pattern_target(heads=list(PATTERN_HEADS)),
        f"heads {', '.join(PATTERN_HEADS)} only",
    )
    return out


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


#: Input-path points whose estimates are cached: the replays choose subsets of them.
PATH_GRID = (0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875)
#: Path-point sets replayed (names in the JSON: the points, or "none").
PATH_SETS = ((), (0.5,), (0.25, 0.5, 0.75), PATH_GRID)


def sweep_and_estimates(model, pairs, name: str, target, cache: Path | None) -> dict:
    """The full exact sweep, and every cell's estimate by the corrupted- and mean-gradient rules
    and at each ``PATH_GRID`` point (``{"estimates": {rule: [pair, cell]}}``); cached on disk
    (the sweep and the estimates apart: the sweep is the expensive part)."""
    from patching import attribution_estimates, patch_sweep

    path = cache / f"{name.replace(' ', '_')}.pt" if cache else None
    out = None
    if path is not None and path.exists():
        out = torch.load(path)
        if out["pair_ids"] != list(pairs.pair_ids):
            out = None
    n = len(pairs)
    if out is None:
        t0 = time.perf_counter()
        full = patch_sweep(model, pairs, target, progress=False)
        sweep_s = time.perf_counter() - t0
        out = {
            "pair_ids": list(pairs.pair_ids),
            "effects": full.patched.reshape(n, -1).double() - full.corrupted.double()[:, None],
            "clean": full.clean.double(),
            "corrupted": full.corrupted.double(),
            "sweep_s": sweep_s,
            "sweep_load_average": os.getloadavg(),
        }
    rules = ["corrupted", "mean"] + [f"path:{a:g}" for a in PATH_GRID]
    if set(out.get("estimates", {})) != set(rules):
        t0 = time.perf_counter()
        est = attribution_estimates(model, pairs, target, path_points=PATH_GRID)
        out["estimates_s"] = time.perf_counter() - t0
        corrupted = out["corrupted"][:, None]
        out["estimates"] = {r: est[r].patched.reshape(n, -1).double() - corrupted for r in rules}
        for old in ("estimate_corrupted", "estimate_mean", "attribution_s"):  # earlier layout
            out.pop(old, None)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(out, path)
    return out


def interval(data: dict, points: tuple[float, ...], spread: float) -> tuple[torch.Tensor, ...]:
    """``patch_top_cells``'s interval: the corrupted-gradient estimate, and ``spread`` times its
    largest gap to the mean-gradient and the path-point estimates."""
    est = data["estimates"]
    centre = est["corrupted"]
    others = [est["mean"]] + [est[f"path:{a:g}"] for a in points]
    return centre, spread * torch.stack([(centre - o).abs() for o in others]).max(0).values


TIE_TOL = 1e-5  # |effects| closer than this are tied: choosing either is not a miss


def same_top(top: list[int], effects: torch.Tensor, k: int) -> bool:
    """The sweep's |effects| of ``top`` (flat cells, -1: none) are its own k largest."""
    k = min(k, int((~effects.isnan()).sum()))
    got = sorted(effects[[c for c in top if c >= 0]].abs().tolist(), reverse=True)
    want = effects.abs().nan_to_num(-1.0).topk(k).values.tolist()
    return len(got) == k and all(abs(a - b) <= TIE_TOL for a, b in zip(got, want))


def mean_unit(data: dict, est: torch.Tensor, width: torch.Tensor, min_delta: float) -> tuple:
    """``average=True``'s unit: the mean normalized metric of the sweep, its estimate and
    half-width (means over pairs with ``|clean - corrupted| >= min_delta``), each ``[1, cell]``."""
    delta = (data["clean"] - data["corrupted"])[:, None]
    keep = delta[:, 0].abs() >= min_delta
    d = delta[keep]
    return (
        (data["effects"][keep] / d).nanmean(0)[None],
        (est[keep] / d).nanmean(0)[None],
        (width[keep] / d.abs()).nanmean(0)[None],
    )


def replays(data: dict, ks: list[int], rtols: list[float], spreads: list[float]) -> list[dict]:
    """The miss rate of every (path-point set, spread, k, rtol), per pair and for the mean."""
    from patching import simulate_top_cells
    from patching.results import DEFAULT_MIN_DELTA

    effects = data["effects"]
    n_cells = int((~effects.isnan()).sum())
    rows = []
    for points in PATH_SETS:
        for spread in spreads:
            est, width = interval(data, points, spread)
            units = {
                "pair": (effects, est, width),
                "mean": mean_unit(data, est, width, DEFAULT_MIN_DELTA),
            }
            for unit, (eff, e, w) in units.items():
                for k in ks:
                    for rtol in rtols:
                        sim = simulate_top_cells(eff, e, w, k, rtol=rtol)
                        n_valid = n_cells if unit == "pair" else int((~eff.isnan()).sum())
                        rows.append(
                            {
                                "unit": unit,
                                "path_points": list(points),
                                "spread": spread,
                                "k": k,
                                "rtol": rtol,
                                "units": len(eff),
                                "missed": int(sim.missed.sum()),
                                "miss_rate": float(sim.missed.double().mean()),
                                "stopped_by_estimate": int(sim.stopped_by_estimate.sum()),
                                "certified": int(sim.certified.sum()),
                                "verified_fraction": float(sim.n_verified.sum()) / n_valid,
                            }
                        )
    return rows


def guided_runs(model, pairs, target, data: dict, ks: list[int]) -> list[dict]:
    """``patch_top_cells`` at its defaults for every k, against the sweep."""
    from patching import patch_top_cells, simulate_top_cells

    effects = data["effects"]
    n = len(pairs)
    rows_sweep = int((~effects.isnan()).sum())
    scale = max(1.0, float(data["clean"].abs().max()))
    rows = []
    for k in ks:
        t0 = time.perf_counter()
        g = patch_top_cells(model, pairs, target, k=k, progress=False)
        guided_s = time.perf_counter() - t0
        same = [same_top(g.top[p].tolist(), effects[p], k) for p in range(n)]
        certified, stopped = g.certified.tolist(), g.stopped_by_estimate.tolist()
        done = g.verified.reshape(n, -1)
        exact = g.exact.reshape(n, -1).double()
        sim = simulate_top_cells(
            effects, g.estimate.reshape(n, -1), g.uncertainty.reshape(n, -1), k
        )
        # the same replay on the run's own exact values where it has them: the sweep's differ
        # from them by float32 rounding (batched differently), which can flip a near-zero cell
        own = simulate_top_cells(
            effects.where(~done, exact), g.estimate.reshape(n, -1), g.uncertainty.reshape(n, -1), k
        )
        rows.append(
            {
                "k": k,
                "guided_s": guided_s,
                "speedup": data["sweep_s"] / guided_s,
                "exact_rows": g.n_rows,
                "exact_rows_per_pair": g.n_rows / n,
                "verified_fraction": g.n_rows / rows_sweep,
                "certified": sum(certified),
                "stopped_by_estimate": sum(stopped),
                "capped": int(g.capped.sum()),
                "missed": sum(not ok for ok in same),
                "miss_rate": sum(not ok for ok in same) / n,
                "missed_pairs": [pairs.pair_ids[p] for p in range(n) if not same[p]],
                "certified_but_missed": sum(c and not ok for c, ok in zip(certified, same)),
                "same_set_fraction": sum(
                    set(g.top[p].tolist())
                    == set(effects[p].abs().nan_to_num(-1.0).topk(k).indices.tolist())
                    for p in range(n)
                )
                / n,
                "max_abs_diff_verified_vs_sweep": float((exact[done] - effects[done]).abs().max()),
                "verified_within_1e-5_scaled": bool(
                    (exact[done] - effects[done]).abs().max() <= 1e-5 * scale
                ),
                "replay_same_verified_cells": sim.verified.tolist() == done.tolist(),
                "replay_same_top": sim.top.tolist() == g.top.tolist(),
                "replay_on_run_values_same_verified_cells": own.verified.tolist() == done.tolist(),
                "replay_on_run_values_same_top": own.top.tolist() == g.top.tolist(),
                "max_attribution_error_seen": float(g.attribution_error.max()),
            }
        )
        r = rows[-1]
        print(f"  k={k}: {guided_s:.1f} s ({r['speedup']:.1f}x), "
              f"{r['exact_rows_per_pair']:.1f} rows/pair, missed {r['missed']}/{n}, "
              f"certified {r['certified']}, stopped by estimate {r['stopped_by_estimate']}, "
              f"replay agrees {r['replay_same_top']}", flush=True)  # fmt: skip
    return rows


def summary(results: list[dict], rtols: list[float]) -> dict:
    """Totals over targets: misses of the real default runs, and of the replays per setting."""
    from patching.guided import DEFAULT_RTOL, DEFAULT_SPREAD

    runs = [r for t in results for r in t.get("runs", [])]
    out: dict = {
        "default_runs": len(runs),
        "default_runs_with_a_miss": sum(r["missed"] > 0 for r in runs),
        "default_missed_pairs": sum(r["missed"] for r in runs),
        "default_max_miss_rate": max((r["miss_rate"] for r in runs), default=None),
        "certified_but_missed": sum(r["certified_but_missed"] for r in runs),
        "replay_disagreements": sum(not r["replay_same_top"] for r in runs),
    }
    replay: dict = {}
    for row in (r for t in results for r in t["replay"]):
        if row["spread"] != DEFAULT_SPREAD:
            continue
        points = ",".join(f"{a:g}" for a in row["path_points"]) or "none"
        key = f"{row['unit']} | path points {points} | rtol {row['rtol']:g}"
        agg = replay.setdefault(key, {"missed": 0, "units": 0, "max_miss_rate": 0.0, "vf": []})
        agg["missed"] += row["missed"]
        agg["units"] += row["units"]
        agg["max_miss_rate"] = max(agg["max_miss_rate"], row["miss_rate"])
        agg["vf"].append(row["verified_fraction"])
    for agg in replay.values():
        agg["mean_verified_fraction"] = statistics.fmean(agg.pop("vf"))
    out[f"replays (spread {DEFAULT_SPREAD:g}; units = pairs or means, summed over targets, k)"] = (
        replay
    )
    out["default_rtol"] = DEFAULT_RTOL
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=50)
    ap.add_argument("--depth", type=int, default=5, help="BM25 candidates per query")
    ap.add_argument("--max-length", type=int, default=160)
    ap.add_argument("--k", type=int, nargs="+", default=[1, 3, 5, 10, 20])
    ap.add_argument("--rtol-grid", type=float, nargs="+",
                    default=[0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 5.0])  # fmt: skip
    ap.add_argument("--spreads", type=float, nargs="+", default=[1.0])
    ap.add_argument("--model", default=default_model(), help="directory, or 'demo'")
    ap.add_argument("--seed", type=int, default=0, help="the study's term-choice seed")
    ap.add_argument("--targets", nargs="+", default=None, help="names from targets()")
    ap.add_argument("--cache", default=str(ROOT / "benchmarks" / "out" / "guided_cache"))
    ap.add_argument("--no-runs", action="store_true", help="sweeps and replays only")
    ap.add_argument("--run-k", type=int, nargs="+", default=[10], help="k of the real runs")
    ap.add_argument("--run-all-k", nargs="*", default=["heads", "heads x part"],
                    help="targets whose real runs take every --k")  # fmt: skip
    ap.add_argument("--out", default=None)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from bench_patching import environment

    from mechir import load_cross_encoder
    from patching.guided import (
        DEFAULT_PATH_POINTS,
        DEFAULT_RTOL,
        DEFAULT_SPREAD,
        DEFAULT_WINDOW,
    )

    model = load_cross_encoder(args.model, device=args.device)
    pairs = study_pairs(model, args.pairs, args.max_length, args.depth, args.seed)
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"guided_patching_{args.device}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    rtols = sorted(set(args.rtol_grid) | {DEFAULT_RTOL})
    results: list[dict] = []
    for name, (target, restriction) in targets().items():
        if args.targets and name not in args.targets:
            continue
        data = sweep_and_estimates(model, pairs, name, target, Path(args.cache))
        cells = int((~data["effects"][0].isnan()).sum())
        ks = [k for k in args.k if k < data["effects"].shape[1]]
        print(f"{name}: {cells} cells (pair 0), sweep {data['sweep_s']:.0f} s", flush=True)
        entry = {
            "target": name,
            "restriction": restriction,
            "cells_per_pair": float((~data["effects"].isnan()).sum(1).double().mean()),
            "sweep_s": data["sweep_s"],
            "sweep_load_average": data.get("sweep_load_average"),
            "runs": []
            if args.no_runs
            else guided_runs(
                model,
                pairs,
                target,
                data,
                ks if name in args.run_all_k else [k for k in args.run_k if k in ks],
            ),  # fmt: skip
            "replay": replays(data, ks, rtols, args.spreads),
        }
        results.append(entry)
        report = {
            "benchmark": "patch_top_cells (guided top-k) vs patch_sweep (full exact sweep): "
            "miss rate and speed",
            "device": args.device,
            "model": f"{'demo' if args.model == 'demo' else Path(args.model).name} "
            "(minilm-l6-ce-scifact: ../shared's, or the demo's compact copy; 6 layers x 12 heads)",
            "pairs": f"TFC1, scifact quick, depth {args.depth}, max_length {args.max_length}, "
            f"{len(pairs)} pairs",
            "pair_ids": list(pairs.pair_ids),
            "seq_len": int(pairs.clean.input_ids.shape[1]),
            "defaults": {
                "rtol": DEFAULT_RTOL,
                "atol": 0.0,
                "window": DEFAULT_WINDOW,
                "spread": DEFAULT_SPREAD,
                "path_points": list(DEFAULT_PATH_POINTS),
                "step": "ceil(k/5)",
                "gradient": "corrupted",
            },
            "miss": "a pair's top k misses when the sorted |sweep effects| of its k cells differ "
            f"from the sweep's k largest by more than {TIE_TOL} (tied cells are not misses)",
            "timing": "sweep_s: the full sweep, timed once per target (cached, possibly by an "
            "earlier process); guided_s: patch_top_cells at defaults; speedup = sweep_s / "
            "guided_s; 1 torch thread on a shared 2-core machine (load averages below)",
            "environment": environment(load_before),
            "summary": summary(results, rtols),
            "results": results,
        }
        out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["summary"], indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
