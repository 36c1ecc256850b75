"""GPU figures in one run: scoring throughput (fp32, bf16, vs Hugging Face eager), NIG kernel vs
naive loop vs captum, patching sweep vs one forward per cell, each checked against the CPU.

Meant for ``benchmarks/gpu_check.sh`` on a CUDA machine (it also runs on the CPU with small
sizes, to check the script). Writes ``benchmarks/results/gpu_<device>.json``.

    python benchmarks/bench_gpu.py [--device cuda] [--pairs 1000] [--nig-pairs 4] [--nig-steps 16]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from assets import default_model, hf_model, quick_set

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]


def timed(fn: Callable[[], Any], device: str, repeats: int = 1) -> tuple[float, Any]:
    """Fastest wall time of ``repeats`` calls (CUDA synchronised) and the last result."""
    best, out = float("inf"), None
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best, out


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float().cpu() - b.float().cpu()).abs().max())


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """``max |a - b| / max |b|``."""
    a, b = a.float().cpu(), b.float().cpu()
    return float((a - b).abs().max() / b.abs().max())


def scoring(args: argparse.Namespace, pairs: list, cpu_model: Any) -> dict[str, Any]:
    """Pre-encoded pairs (tokenisation not timed), the same sub-batches for every model."""

    from mechir import load_cross_encoder

    out: dict[str, Any] = {"pairs": len(pairs), "batch_size": args.batch_size}
    batch = cpu_model.encode([p.query for p in pairs], [p.document for p in pairs], max_length=160)
    bs = args.batch_size
    fp32 = load_cross_encoder(args.model, device=args.device)
    fp32.score(batch[:bs])  # warm-up
    t, s32 = timed(lambda: fp32.score(batch, batch_size=bs), args.device, args.repeats)
    out["hooked_fp32_pairs_per_s"] = len(pairs) / t
    n_cpu = min(len(pairs), 64)
    out["max_abs_diff_fp32_vs_cpu"] = max_diff(s32[:n_cpu], cpu_model.score(batch[:n_cpu]))
    bf16 = load_cross_encoder(args.model, device=args.device, dtype=torch.bfloat16)
    bf16.score(batch[:bs])
    t, s16 = timed(lambda: bf16.score(batch, batch_size=bs), args.device, args.repeats)
    out["hooked_bf16_pairs_per_s"] = len(pairs) / t
    out["max_abs_diff_bf16_vs_fp32"] = max_diff(s16, s32)
    hf = hf_model(args.model)
    hf = hf.to(args.device).eval()

    def hf_scores() -> torch.Tensor:
        res = []
        with torch.inference_mode():
            for chunk in batch.chunks(bs):
                b = chunk.to(args.device)
                logits = hf(b.input_ids, b.attention_mask, b.token_type_ids).logits
                res.append(logits[:, 0].float().cpu())
        return torch.cat(res)

    hf_scores()
    t, shf = timed(hf_scores, args.device, args.repeats)
    out["hf_eager_fp32_pairs_per_s"] = len(pairs) / t
    out["hooked_over_hf_time"] = out["hf_eager_fp32_pairs_per_s"] / out["hooked_fp32_pairs_per_s"]
    out["max_abs_diff_hooked_vs_hf"] = max_diff(s32, shf)
    return out


def nig(args: argparse.Namespace, pairs: list, cpu_model: Any) -> dict[str, Any]:
    """Activation-path NIG (riemann_right, the input as activation baseline), the setting in
    which captum's ``LayerIntegratedGradients`` computes the same integral (as bench_nig.py)."""
    from mechir import load_cross_encoder
    from mechir.attribution import (
        neuron_integrated_gradients,
        neuron_integrated_gradients_reference,
    )

    sys.path.insert(0, str(ROOT / "benchmarks"))
    model = load_cross_encoder(args.model, device=args.device)
    sub = pairs[: args.nig_pairs]
    batch = model.encode([p.query for p in sub], [p.document for p in sub], max_length=160)
    kw = dict(
        path="activation",
        method="riemann_right",
        n_steps=args.nig_steps,
        baseline="pad",
        activation_baseline="input",
    )
    t_kernel, fast = timed(lambda: neuron_integrated_gradients(model, batch, **kw), args.device)
    one = batch[:1]
    t_ref, ref = timed(lambda: neuron_integrated_gradients_reference(model, one, **kw), args.device)
    cpu = neuron_integrated_gradients(cpu_model, batch.to("cpu"), **kw)
    first = fast.per_neuron()[:1].float().cpu()
    out: dict[str, Any] = {
        "pairs": len(sub),
        "steps": args.nig_steps,
        "path": "activation",
        "kernel_seconds_per_pair": t_kernel / len(sub),
        "naive_seconds_per_pair": t_ref,
        "naive_over_kernel": t_ref / (t_kernel / len(sub)),
        "max_rel_diff_kernel_vs_naive": rel_diff(first, ref.per_neuron()),
        "max_rel_diff_kernel_vs_cpu": rel_diff(fast.per_neuron(), cpu.per_neuron()),
        "completeness_error": fast.completeness_error(),
    }
    try:
        from bench_nig import captum_layer_ig

        from mechir.attribution.baselines import baseline_batch

        base = baseline_batch(model, one, "pad")
        layers = range(model.cfg.n_layers)
        t_cap, cap = timed(
            lambda: captum_layer_ig(model, one, base, layers, args.nig_steps), args.device
        )
        out["captum_seconds_per_pair"] = t_cap
        out["captum_over_kernel"] = t_cap / (t_kernel / len(sub))
        out["max_rel_diff_kernel_vs_captum"] = rel_diff(first, cap)
    except Exception as err:  # captum missing or its API moved: say so, keep the rest
        out["captum"] = f"skipped: {type(err).__name__}: {err}"
    return out


def patching(args: argparse.Namespace, cpu_model: Any) -> dict[str, Any]:
    from mechir import load_cross_encoder
    from patching import AlignedPairs, PairBuilder, head_target, patch_sweep, patch_sweep_reference

    model = load_cross_encoder(args.model, device=args.device)
    builder = PairBuilder(model.tokenizer, max_length=160, choose="first")

    col = quick_set()
    built = []
    for p in col.candidates(depth=20):
        try:
            built.append(builder.tfc1(p.query, p.document, pair_id=f"{p.qid}/{p.docid}"))
        except ValueError:
            continue
        if len(built) == args.patch_pairs:
            break
    pairs = AlignedPairs.from_pairs(built, model.tokenizer)
    target = head_target()
    t_fast, fast = timed(lambda: patch_sweep(model, pairs.to(args.device), target), args.device)
    t_ref, ref = timed(
        lambda: patch_sweep_reference(model, pairs.to(args.device), target), args.device
    )
    cpu = patch_sweep(cpu_model, pairs, target)
    return {
        "pairs": len(pairs),
        "cells_per_pair": int(fast.patched[0].numel()),
        "sweep_seconds": t_fast,
        "per_cell_seconds": t_ref,
        "per_cell_over_sweep": t_ref / t_fast,
        "max_abs_diff_sweep_vs_per_cell": max_diff(fast.patched, ref.patched),
        "max_abs_diff_vs_cpu": max_diff(fast.patched, cpu.patched),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=default_model())
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--pairs", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--nig-pairs", type=int, default=4)
    ap.add_argument("--nig-steps", type=int, default=16)
    ap.add_argument("--patch-pairs", type=int, default=2)
    ap.add_argument("--sections", default="scoring,nig,patching")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from mechir import load_cross_encoder

    cpu_model = load_cross_encoder(args.model, device="cpu")
    pairs = quick_set().candidates(depth=20)[: args.pairs]
    record: dict[str, Any] = {
        "benchmark": "GPU check: scoring, NIG, patching (each against the CPU)",
        "model": args.model,
        "device": args.device,
        "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else "not used",
        "torch": torch.__version__,
    }
    for name, fn in (
        ("scoring", lambda: scoring(args, pairs, cpu_model)),
        ("nig", lambda: nig(args, pairs, cpu_model)),
        ("patching", lambda: patching(args, cpu_model)),
    ):
        if name not in args.sections.split(","):
            continue
        start = time.perf_counter()
        record[name] = fn()
        record[name]["section_seconds"] = time.perf_counter() - start
        print(name, json.dumps(record[name], indent=1), flush=True)
    device = args.device.split(":")[0]
    path = Path(args.out or ROOT / "benchmarks" / "results" / f"gpu_{device}.json")
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(path)


if __name__ == "__main__":
    main()
