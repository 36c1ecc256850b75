"""Head-patching sweep (every layer x head, all positions): batched vs one forward per cell.

``patching.patch_sweep`` (rows = cells, each row starting at its cell's layer, chunked to a memory
budget) against ``patching.patch_sweep_reference`` (one full forward per cell, MechIR's loop) on

* the shared SciFact cross-encoder (6 layers x 12 heads, d_model 384) with real TFC1 pairs, at
  its training length (160 tokens) and at 64 tokens, and
* a random BERT-large-shaped cross-encoder (24 layers x 16 heads, d_model 1024) on a short input.

Runs are interleaved (batched, reference, repeated) in one process, so load from other processes
affects both alike; the speedup is the median of the per-repeat ratios, times are medians. Peak
memory is the rise of the process' peak resident set (``VmHWM``, reset before each run through
``/proc/self/clear_refs``) over its size before the run.
For BERT-large the reference is timed on ``--large-ref-heads`` heads per layer and its time per
pair extrapolated to all cells (each of its forwards is the same full forward, whatever the cell).
Writes ``benchmarks/results/patching_<device>.json``.

    python benchmarks/bench_patching.py [--repeats 3] [--threads 1] [--skip-large]
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import importlib.metadata
import json
import os
import platform
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from assets import SCIFACT, SHARED_MODEL  # benchmarks/ is on the path of a script run

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------- memory
def _status_kb(key: str) -> int:
    text = Path("/proc/self/status").read_text()
    match = re.search(rf"^{key}:\s+(\d+) kB", text, re.M)
    return int(match.group(1)) if match else -1


def _release() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def measure(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    """``(result, seconds, peak MiB above the resident size before the call)``."""
    _release()
    before = _status_kb("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        resettable = True
    except OSError:
        resettable = False
    t0 = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - t0
    peak = _status_kb("VmHWM") if resettable else -1
    return out, seconds, (peak - before) / 1024 if resettable and before >= 0 else float("nan")


def environment(load_before: tuple[float, ...], note: str | None = None) -> dict[str, Any]:
    """Versions, CPU and torch threads, load averages before and now (for the JSON reports)."""
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformer_lens": importlib.metadata.version("transformer-lens"),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
    }
    if note:
        env["note"] = note
    return env


# ---------------------------------------------------------------------- models and pairs
def shared_setup(max_length: int, n_pairs: int):
    from mechir import load_cross_encoder
    from mechir.data import load_collection
    from patching import PairBuilder

    model = load_cross_encoder(SHARED_MODEL, device="cpu")
    collection = load_collection(SCIFACT, split="quick")
    qid = collection.query_ids()[0]
    items = collection.candidates(depth=n_pairs, query_ids=[qid])
    builder = PairBuilder(model.tokenizer, max_length=max_length)
    pairs = builder.build(items, "tfc1", qrels=collection.qrels).batch(model.tokenizer)
    return model, pairs


def large_setup(seq_len: int, n_pairs: int):
    from transformers import BertConfig, BertForSequenceClassification

    from mechir import cross_encoder_batch_from_tokens, load_cross_encoder
    from patching import AlignedPairs

    config = BertConfig(
        vocab_size=30522,
        hidden_size=1024,
        num_hidden_layers=24,
        num_attention_heads=16,
        intermediate_size=4096,
        num_labels=1,
        architectures=["BertForSequenceClassification"],
    )
    torch.manual_seed(0)
    hf = BertForSequenceClassification(config).eval()
    model = load_cross_encoder(hf, tokenizer=object(), device="cpu")
    del hf
    gen = torch.Generator().manual_seed(0)
    n_query = 6
    n_doc = seq_len - n_query - 3
    queries = torch.randint(1000, 30000, (n_pairs, n_query), generator=gen).tolist()
    docs = torch.randint(1000, 30000, (n_pairs, n_doc), generator=gen).tolist()
    corrupted = [d[:-1] + [1037] for d in docs]  # last token -> filler "a", lengths kept
    ids = dict(cls_token_id=101, sep_token_id=102, pad_token_id=0, max_length=seq_len)
    clean = cross_encoder_batch_from_tokens(queries, docs, **ids)
    corr = cross_encoder_batch_from_tokens(queries, corrupted, **ids)
    return model, AlignedPairs.from_batches(clean, corr)


# ---------------------------------------------------------------------- one benchmark
def bench(name: str, model, pairs, repeats: int, ref_heads_per_layer: int | None) -> dict:
    from patching import head_target, patch_sweep, patch_sweep_reference, rows_per_chunk

    cfg = model.cfg
    n_cells = cfg.n_layers * cfg.n_heads
    if ref_heads_per_layer is None or ref_heads_per_layer >= cfg.n_heads:
        ref_heads = None
        ref_cells = n_cells
    else:
        step = cfg.n_heads // ref_heads_per_layer
        ref_heads = [
            (layer, (layer + k * step) % cfg.n_heads)
            for layer in range(cfg.n_layers)
            for k in range(ref_heads_per_layer)
        ]
        ref_cells = len(ref_heads)
    fast_target = head_target()
    ref_target = head_target(heads=ref_heads)
    n = len(pairs)
    width = int(pairs.clean.input_ids.shape[1])
    rows = {"batched": [], "reference": []}
    fast = ref = None
    with torch.no_grad():
        patch_sweep(model, pairs[:1], head_target(heads=[(0, 0)]))  # warm-up
    for r in range(repeats):
        fast, t_fast, m_fast = measure(lambda: patch_sweep(model, pairs, fast_target))
        ref, t_ref, m_ref = measure(lambda: patch_sweep_reference(model, pairs, ref_target))
        rows["batched"].append({"seconds": t_fast, "peak_mib": m_fast})
        rows["reference"].append({"seconds": t_ref, "peak_mib": m_ref})
        print(
            f"[{name}] repeat {r + 1}/{repeats}: batched {t_fast / n:.2f} s/pair "
            f"(+{m_fast:.0f} MiB), reference {t_ref / n * n_cells / ref_cells:.2f} s/pair "
            f"(+{m_ref:.0f} MiB)",
            flush=True,
        )
    assert fast is not None and ref is not None
    done = ~ref.patched.isnan()
    diff = float((fast.patched[done] - ref.patched[done]).abs().max())
    metric_diff = float((fast.metric()[done] - ref.metric()[done]).nan_to_num().abs().max())
    scale = n_cells / ref_cells  # reference time per pair for all cells
    fast_pp = statistics.median(x["seconds"] for x in rows["batched"]) / n
    ref_pp = statistics.median(x["seconds"] for x in rows["reference"]) / n * scale
    ratios = [
        r["seconds"] * scale / b["seconds"] for b, r in zip(rows["batched"], rows["reference"])
    ]
    return {
        "model": name,
        "n_layers": cfg.n_layers,
        "n_heads": cfg.n_heads,
        "d_model": cfg.d_model,
        "seq_len": width,
        "pairs": n,
        "cells_per_pair": n_cells,
        "batched_rows_per_chunk": rows_per_chunk(model, width),
        "reference_cells_timed_per_pair": ref_cells,
        "reference_extrapolated": ref_cells != n_cells,
        "batched_s_per_pair": fast_pp,
        "reference_s_per_pair": ref_pp,
        "speedup": statistics.median(ratios),
        "speedup_per_repeat": ratios,
        "speedup_of_medians": ref_pp / fast_pp,
        "batched_peak_mib": statistics.median(x["peak_mib"] for x in rows["batched"]),
        "reference_peak_mib": statistics.median(x["peak_mib"] for x in rows["reference"]),
        "max_abs_diff_score": diff,
        "max_abs_diff_metric": metric_diff,
        "cells_compared": int(done.sum()),
        "runs": rows,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch default)")
    ap.add_argument("--shared-pairs", type=int, default=2)
    ap.add_argument("--shared-max-lengths", type=int, nargs="+", default=[160, 64])
    ap.add_argument("--large-pairs", type=int, default=1)
    ap.add_argument("--large-seq-len", type=int, default=24)
    ap.add_argument("--large-ref-heads", type=int, default=2, help="reference heads per layer")
    ap.add_argument("--skip-shared", action="store_true")
    ap.add_argument("--skip-large", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    results = []
    load_before = os.getloadavg()
    if not args.skip_shared:
        if SHARED_MODEL.exists() and SCIFACT.exists():
            for max_length in args.shared_max_lengths:
                model, pairs = shared_setup(max_length, args.shared_pairs)
                name = f"minilm-l6-ce-scifact (shared), max_length {max_length}"
                results.append(bench(name, model, pairs, args.repeats, None))
                del model
        else:
            print(f"skipping the shared model: {SHARED_MODEL} not found")
    if not args.skip_large:
        model, pairs = large_setup(args.large_seq_len, args.large_pairs)
        results.append(
            bench("random BERT-large shape", model, pairs, args.repeats, args.large_ref_heads)
        )
    report = {
        "benchmark": "head patching sweep (all layers x heads, all positions), per pair",
        "device": "cpu",
        "gpu": "not available in this environment"
        if not torch.cuda.is_available()
        else torch.cuda.get_device_name(),
        "environment": environment(
            load_before, "CPU shared with other processes; runs interleaved, medians reported"
        ),
        "settings": vars(args),
        "results": results,
    }
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / "patching_cpu.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    for r in results:
        print(
            f"{r['model']}: batched {r['batched_s_per_pair']:.2f} s/pair, reference "
            f"{r['reference_s_per_pair']:.2f} s/pair, speedup {r['speedup']:.1f}x, "
            f"peak +{r['batched_peak_mib']:.0f} / +{r['reference_peak_mib']:.0f} MiB, "
            f"max diff {r['max_abs_diff_score']:.1e}"
        )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
