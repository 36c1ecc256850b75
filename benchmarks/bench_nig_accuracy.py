"""Neuron integrated gradients, time to accuracy: wall time to reach <= 1% / 5% error against a
high-resolution reference, for mechir ``n_steps="auto"``, mechir's fixed rules, the naive loop
with the paper's rule, and captum ``LayerConductance`` with its default rule.

Setting (issue 14): the shared cross-encoder, 4 SciFact pairs at 160 tokens, all 6 layers, input
path (neuron conductance), [PAD] query and document baseline, per-neuron attributions (summed
over positions). Error = ``max |a - a_ref| / max |a_ref|`` over all examples and neurons;
overlap = mean over examples of the top-0.5% (positive) selection shared with the reference.

The reference is midpoint cells on a grid of ``--ref-grid`` intervals with Richardson
extrapolation against the half grid (its own estimated error is in the JSON). Times to a
tolerance come from one measured run per implementation and rule: ``m_tol = m (err(m)/tol)^(1/p)``
with the order ``p`` measured from the run's nested half-step result (``err(m/2)``), and time
scaled linearly in steps (every implementation's cost is linear in its steps); the JSON marks
each figure ``measured`` (the run itself met the tolerance at about that cost) or
``extrapolated``. The naive loop computes exactly the batched kernel's ``riemann_right`` numbers
(checked here), so it shares that rule's errors and ``m_tol``.

    python benchmarks/bench_nig_accuracy.py [--ref-grid 1024] [--threads 1]
        [--device cpu] [--out benchmarks/results/nig_accuracy_<device>.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
TOLERANCES = (0.01, 0.05)


def error(a, ref) -> float:
    return float((a - ref).abs().max() / ref.abs().max())


def overlap(a, ref, percent: float = 0.5) -> float:
    from mechir.attribution import n_selected

    a, ref = a.flatten(1), ref.flatten(1)
    k = n_selected(a.shape[1], percent)
    top_a, top_r = a.topk(k, dim=1).indices, ref.topk(k, dim=1).indices
    return float((top_a[:, :, None] == top_r[:, None, :]).any(-1).float().mean())


def steps_to(tol: float, m: int, err_m: float, err_half: float) -> tuple[float, float]:
    """``(m_tol, order)`` from errors at ``m`` and ``m/2`` (order clamped to [0.5, 4])."""
    p = math.log2(err_half / err_m) if err_half > 0 and err_m > 0 else 1.0
    p = min(max(p, 0.5), 4.0)
    return m * (err_m / tol) ** (1 / p), p


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ref-grid", type=int, default=1024, help="reference grid intervals")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--paper-steps", type=int, default=50)
    ap.add_argument("--fixed-steps", type=int, default=16, help="midpoint, GL, trapezoid")
    ap.add_argument("--naive-steps", type=int, default=4)
    ap.add_argument("--captum-steps", type=int, nargs="+", default=[8, 16])
    ap.add_argument("--reference-cache", default=None, help="save/load the reference (.pt)")
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=160)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (then results/..._cuda.json)")
    ap.add_argument("--out", default=None, help="(benchmarks/results/nig_accuracy_<device>.json)")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    import bench_nig
    from bench_nig import SHARED_MODEL, build, captum_conductance

    from mechir.attribution import (
        neuron_integrated_gradients,
        neuron_integrated_gradients_reference,
    )

    bench_nig.SETTINGS["shared"] |= {"pairs": args.pairs, "max_length": args.max_length}
    model, batch, base = build("shared", args.device)
    batch, base = batch.to(args.device), base.to(args.device)
    if args.out is None:
        args.out = str(ROOT / f"benchmarks/results/nig_accuracy_{args.device.split(':')[0]}.json")
    layers = list(range(model.cfg.n_layers))
    nig = lambda **kw: neuron_integrated_gradients(model, batch, **kw)  # noqa: E731

    cache = Path(args.reference_cache) if args.reference_cache else None
    if cache is not None and cache.exists():
        fine, coarse, ref_s = torch.load(cache)
    else:
        ref_run, ref_s = timed(lambda: nig(method="riemann_middle", n_steps=args.ref_grid // 2))
        fine, coarse = ref_run.per_neuron(), ref_run.coarse
        if cache is not None:
            torch.save((fine, coarse, ref_s), cache)
    ref = (4 * fine - coarse) / 3

    rows = []
    report = {
        "setting": {
            "model": f"minilm-l6-ce-scifact ({'shared' if SHARED_MODEL.exists() else 'demo copy'})",
            "device": args.device, "pairs": len(batch),
            "max_length": int(batch.input_ids.shape[1]), "layers": layers, "path": "input",
            "baseline": "pad", "neurons": "post", "per_neuron": "summed over positions",
        },
        "reference": {
            "rule": f"riemann_middle cells on {args.ref_grid} intervals + Richardson",
            "wall_s": round(ref_s, 1),
            "estimated_relative_error": float((fine - ref).abs().max() / ref.abs().max()),
        },
        "machine": {
            "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "torch_threads": args.threads, "load_average": os.getloadavg(),
            "torch": torch.__version__,
        },
        "rows": rows,
    }  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        out.write_text(json.dumps(report, indent=2) + "\n")

    def row(impl, rule, steps, seconds, a, half=None, half_steps=None, **extra):
        r = {"implementation": impl, "rule": rule, "steps": steps, "wall_s": round(seconds, 2)}
        r["error"] = error(a, ref)
        r["top0.5%_overlap"] = overlap(a, ref)
        if half is not None:
            r["error_half_steps"] = error(half, ref)
            for tol in TOLERANCES:
                m_tol, p = steps_to(tol, half_steps * 2, r["error"], r["error_half_steps"])
                r["order"] = round(p, 2)
                r[f"steps_to_{tol:g}"] = math.ceil(m_tol)
                r[f"time_to_{tol:g}_s"] = round(seconds * m_tol / steps, 2)
                r[f"time_to_{tol:g}_kind"] = "measured" if r["error"] <= tol else "extrapolated"
        r |= extra
        rows.append(r)
        print(json.dumps(r), flush=True)
        save()
        return r

    for rtol in (0.05, 0.01):
        res, s = timed(lambda rtol=rtol: nig(n_steps="auto", rtol=rtol))
        row(
            "mechir auto", f"rtol={rtol}", int(res.n_steps), s, res.per_neuron(),
            path_points=res.n_points.tolist(),
            estimated_error=float(res.relative_error().max()),
        )  # fmt: skip
    for method, m in [
        ("riemann_right", args.paper_steps),
        ("riemann_left", args.paper_steps),
        ("riemann_middle", args.fixed_steps),
        ("gauss_legendre", args.fixed_steps),
        ("riemann_trapezoid", args.fixed_steps + 1),
    ]:
        res, s = timed(lambda method=method, m=m: nig(method=method, n_steps=m))
        half_steps = res.meta["coarse_n_steps"]
        row(
            "mechir fixed", method, m, s, res.per_neuron(), res.coarse, half_steps,
            path_points=int(res.n_points[0]),
            estimated_error=float(res.relative_error().max()),
        )  # fmt: skip
        if method == "riemann_right":
            paper = rows[-1]
    m = args.naive_steps
    naive, s = timed(
        lambda: neuron_integrated_gradients_reference(
            model, batch, method="riemann_right", n_steps=m
        )
    )
    same = nig(method="riemann_right", n_steps=m, error_estimate=False).per_neuron()
    naive_row = {
        "implementation": "naive loop (reference)", "rule": "riemann_right", "steps": m,
        "wall_s": round(s, 2), "seconds_per_step": round(s / m, 2),
        "max_rel_diff_vs_batched": error(naive.per_neuron(), same),
        "error": paper["error"], "top0.5%_overlap": paper["top0.5%_overlap"],
        "error_note": f"the batched riemann_right numbers at {args.paper_steps} steps (same math)",
    }  # fmt: skip
    for tol in TOLERANCES:
        naive_row[f"steps_to_{tol:g}"] = paper[f"steps_to_{tol:g}"]
        naive_row[f"time_to_{tol:g}_s"] = round(s / m * paper[f"steps_to_{tol:g}"], 1)
        naive_row[f"time_to_{tol:g}_kind"] = "extrapolated"
    rows.append(naive_row)
    print(json.dumps(naive_row), flush=True)
    save()
    try:
        import captum  # noqa: F401

        runs = {}
        for m in args.captum_steps:
            a, s = timed(
                lambda m=m: captum_conductance(
                    model, batch, base, layers, m, method=None, internal_batch_size=32
                )
            )
            runs[m] = (a, s)
        m_hi, m_lo = max(runs), min(runs)
        row("captum LayerConductance", "gausslegendre (default)", m_hi, runs[m_hi][1],
            runs[m_hi][0], runs[m_lo][0], m_lo,
            error_at_steps={k: error(v[0], ref) for k, v in runs.items()})  # fmt: skip
    except ImportError:
        print("captum not installed: pip install captum (the bench extra)", flush=True)

    speedups = {}
    for tol in TOLERANCES:
        mine = next(r for r in rows if r["rule"] == f"rtol={tol}")["wall_s"]
        for r in rows:
            if f"time_to_{tol:g}_s" in r:
                speedups[f"{r['implementation']} {r['rule']} / auto, {tol:g}"] = round(
                    r[f"time_to_{tol:g}_s"] / mine, 1
                )
    report["speedup_time_to_tolerance_vs_auto"] = speedups
    report["load_average_end"] = os.getloadavg()
    save()
    print(json.dumps(speedups, indent=2))


if __name__ == "__main__":
    main()
