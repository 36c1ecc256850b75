"""Benchmark QK-circuit SVDs and streaming attention statistics (CPU).

1. All-heads SVD of ``W_QK = W_Q W_K^T`` for BERT-base (12 x 12 heads, d_model 768) and
   BERT-large (24 x 16 heads, d_model 1024) shapes, random weights, d_head 64:
   - ``mechir.circuits.factored_svd`` (thin QR of both factors + SVD of the 64 x 64 core, all heads
     in one batched call);
   - TransformerLens ``FactoredMatrix.svd()`` (SVDs of both factors + core);
   - materialising each ``d_model x d_model`` matrix and calling ``torch.linalg.svd``. This is
     slow (seconds per head), so it is timed on a sample of heads and extrapolated to all heads
     (``per_head_s * n_heads``); the sample also checks that the spectra agree.
2. Attention statistics of every (pair, layer, head) for a BERT-base-shaped random cross-encoder
   (and, for scale, the plain forward pass ``model.score`` without statistics):
   ``mechir.matching.attention_statistics`` (patterns reduced inside the forward pass) vs
   ``run_with_cache`` of all ``hook_pattern``s per chunk followed by the same reduction (the
   statistics are the same). Timed interleaved in one process; peak resident memory above the
   level at the start of a warm run is sampled in a fresh subprocess per method.

Timings are medians of repeats (the machine is shared), with ``--threads`` torch threads.
Writes ``benchmarks/results/circuits_cpu.json``.

    python benchmarks/bench_circuits.py            # full run
    python benchmarks/bench_circuits.py --quick    # fewer repeats and sampled heads
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore", category=DeprecationWarning)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mechir.circuits import QKSVD, factored_svd, qk_alignment_from_svd  # noqa: E402
from mechir.matching import (  # noqa: E402
    STATISTICS,
    attention_statistics,
    exact_match_mask,
    pattern_statistics,
)

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from transformer_lens import FactoredMatrix  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "circuits_cpu.json"
SHAPES = {
    "bert-base": dict(n_layers=12, n_heads=12, d_model=768, d_head=64),
    "bert-large": dict(n_layers=24, n_heads=16, d_model=1024, d_head=64),
}


def timed(fn, repeats: int) -> tuple[float, list[float], object]:
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times, out


# ---------------------------------------------------------------------------- 1. SVD
def bench_svd(name: str, shape: dict, repeats: int, sample_heads: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    L, H, dm, dh = shape["n_layers"], shape["n_heads"], shape["d_model"], shape["d_head"]
    W_Q = torch.randn(L, H, dm, dh, generator=gen) * 0.02
    W_K = torch.randn(L, H, dm, dh, generator=gen) * 0.02
    with torch.no_grad():
        fm = FactoredMatrix(W_Q, W_K.transpose(-2, -1))
        U, S, V = factored_svd(fm)
        fast_times, tl_times = [], []
        for _ in range(repeats):  # interleaved, so that both see the same machine load
            fast_times.append(timed(lambda: factored_svd(fm), 1)[0])
            # a fresh FactoredMatrix each time: TL caches the SVD on the instance
            tl_times.append(timed(FactoredMatrix(W_Q, W_K.transpose(-2, -1)).svd, 1)[0])
        fast_s, tl_s = statistics.median(fast_times), statistics.median(tl_times)
        heads = [(i % L, (i * 7) % H) for i in range(sample_heads)]

        def materialised():
            return [torch.linalg.svd(W_Q[a, b] @ W_K[a, b].T) for a, b in heads]

        mat_s, mat_times, full = timed(materialised, min(3, repeats))
        err = max(
            float((S[a, b] - s[:dh]).abs().max() / s[0]) for (a, b), (_, s, _) in zip(heads, full)
        )
        align = qk_alignment_from_svd(QKSVD(U, S, V))["alignment"].to_numpy()
        trace = (W_Q * W_K).sum((-2, -1)).reshape(-1).numpy()
        align_err = float(abs(align - trace).max() / abs(trace).max())
    n_heads = L * H
    per_head = mat_s / len(heads)
    return {
        "shape": name,
        **shape,
        "heads": n_heads,
        "factored_qr_s": fast_s,
        "factored_qr_times_s": fast_times,
        "transformer_lens_factored_svd_s": tl_s,
        "transformer_lens_times_s": tl_times,
        "materialised_sampled_heads": len(heads),
        "materialised_per_head_s": per_head,
        "materialised_all_heads_s_extrapolated": per_head * n_heads,
        "speedup_vs_materialised": per_head * n_heads / fast_s,
        "speedup_vs_transformer_lens": tl_s / fast_s,
        "max_rel_singular_value_error_vs_materialised": err,
        "max_rel_alignment_error_vs_trace": align_err,
    }


# ---------------------------------------------------------------------------- 2. statistics
def bert_base_model():
    from transformers import BertConfig, BertForSequenceClassification

    from mechir.models.encoder import hooked_cross_encoder_from_hf

    torch.manual_seed(0)
    cfg = BertConfig(num_labels=1, architectures=["BertForSequenceClassification"])
    hf = BertForSequenceClassification(cfg).eval()
    hf.config._attn_implementation = "eager"
    return hooked_cross_encoder_from_hf(hf, None, device="cpu")


def stats_batch(n_pairs: int, seed: int = 0):
    from mechir import cross_encoder_batch_from_tokens

    gen = torch.Generator().manual_seed(seed)
    vocab = torch.arange(1000, 3000)
    queries, docs = [], []
    for _ in range(n_pairs):
        q = vocab[torch.randint(len(vocab), (10,), generator=gen)]
        n_doc = int(torch.randint(120, 240, (1,), generator=gen))
        d = torch.cat([q[:3], vocab[torch.randint(len(vocab), (n_doc,), generator=gen)]])
        queries.append(q.tolist())
        docs.append(d.tolist())
    return cross_encoder_batch_from_tokens(
        queries, docs, cls_token_id=101, sep_token_id=102, pad_token_id=0, max_length=256
    )


def cached_statistics(model, batch, batch_size: int) -> tuple[dict[str, torch.Tensor], int]:
    """``run_with_cache`` of every pattern per chunk, then the same reduction; also returns the
    size of one chunk's pattern cache in bytes."""
    n_layers = model.cfg.n_layers
    out: dict[str, list[torch.Tensor]] = {name: [] for name in STATISTICS}
    cache_bytes = 0
    for chunk in batch.chunks(batch_size):
        with torch.no_grad():
            _, cache = model.run_with_cache(
                chunk, names_filter=lambda n: n.endswith("hook_pattern")
            )
        match = exact_match_mask(chunk)
        per_layer = [
            pattern_statistics(cache[f"blocks.{layer}.attn.hook_pattern"], chunk, match)
            for layer in range(n_layers)
        ]
        for name in STATISTICS:
            out[name].append(torch.stack([s[name] for s in per_layer], dim=1))
        cache_bytes = max(cache_bytes, sum(t.numel() * t.element_size() for t in cache.values()))
    return {name: torch.cat(v) for name, v in out.items()}, cache_bytes


class PeakRSS:
    """Samples the resident set size (``/proc/self/statm``) in a thread; ``peak_mib`` is the
    largest value seen above the level at entry."""

    def __init__(self, interval_s: float = 0.002):
        self.interval_s, self.peak, self._stop = interval_s, 0, threading.Event()
        self._page = os.sysconf("SC_PAGE_SIZE")

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self._page

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(self.interval_s)

    def __enter__(self) -> PeakRSS:
        gc.collect()
        self.start = self.peak = self._rss()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_mib = (self.peak - self.start) / 2**20


def stats_runner(method: str, model, batch, batch_size: int):
    if method == "streaming":
        return lambda: attention_statistics(model, batch, batch_size=batch_size).values
    return lambda: cached_statistics(model, batch, batch_size)[0]


def stats_memory_worker(method: str, n_pairs: int, batch_size: int) -> dict:
    """One warm run, then one measured run of ``method`` in this (fresh) process."""
    model, batch = bert_base_model(), stats_batch(n_pairs)
    run = stats_runner(method, model, batch, batch_size)
    run()
    with PeakRSS() as rss:
        run()
    return {"method": method, "peak_rss_above_start_mib": rss.peak_mib}


def bench_stats(n_pairs: int, batch_size: int, repeats: int) -> dict:
    model, batch = bert_base_model(), stats_batch(n_pairs)
    out = {
        "model": "BERT-base shape (12 layers x 12 heads, d_model 768), random weights",
        "pairs": n_pairs,
        "batch_size": batch_size,
        "max_tokens": int(batch.lengths.max()),
        "mean_tokens": float(batch.lengths.float().mean()),
    }
    methods = ("streaming", "run_with_cache")
    runs = {m: stats_runner(m, model, batch, batch_size) for m in methods}
    results = {m: runs[m]() for m in methods}  # warm-up, and the results to compare
    runs["forward_only"] = lambda: model.score(batch, batch_size=batch_size)  # no statistics
    times: dict[str, list[float]] = {m: [] for m in runs}
    for _ in range(repeats):  # interleaved, so that all see the same machine load
        for m, run in runs.items():
            times[m].append(timed(run, 1)[0])
    out["max_abs_difference"] = max(
        float((results[methods[0]][k] - results[methods[1]][k]).nan_to_num().abs().max())
        for k in STATISTICS
    )
    _, cache_bytes = cached_statistics(model, batch[:batch_size], batch_size)
    for m in methods:
        cmd = [sys.executable, __file__, "--memory-worker", m, "--pairs", str(n_pairs)]
        cmd += ["--batch-size", str(batch_size), "--threads", str(torch.get_num_threads())]
        # a fixed mmap threshold makes glibc return every large block on free, so that the
        # resident size follows the live tensors (with the default dynamic threshold, blocks
        # freed by the warm run stay resident and hide the measured run's peak)
        env = os.environ | {"MALLOC_MMAP_THRESHOLD_": str(2**16)}
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
        memory = json.loads(proc.stdout.strip().splitlines()[-1])
        out[m] = {
            "median_s": statistics.median(times[m]),
            "times_s": times[m],
            "peak_rss_above_start_mib": memory["peak_rss_above_start_mib"],
            "kept_bytes": sum(v.numel() * v.element_size() for v in results[m].values()),
        }
    out["run_with_cache"]["pattern_cache_mib_per_chunk"] = cache_bytes / 2**20
    out["forward_only"] = {"median_s": statistics.median(times["forward_only"])}
    out["forward_only"]["times_s"] = times["forward_only"]
    out["time_ratio_cache_over_streaming"] = (
        out["run_with_cache"]["median_s"] / out["streaming"]["median_s"]
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats and heads")
    parser.add_argument("--pairs", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: on a shared machine several processes with 2 spinning "
        "OpenMP threads each slow every one of them down many times over)",
    )
    parser.add_argument("--memory-worker", choices=["streaming", "run_with_cache"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_worker:
        print(json.dumps(stats_memory_worker(args.memory_worker, args.pairs, args.batch_size)))
        return
    repeats = 3 if args.quick else 5
    sample = 4 if args.quick else 8
    load_before = os.getloadavg()
    report = {
        "device": "cpu",
        "GPU": "not available in this environment",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "load_average_1_5_15_min_at_start": load_before,
        "note": "shared machine (other processes running): medians of repeats; the materialised "
        "SVD is timed on a sample of heads and extrapolated to all heads",
        "svd": [bench_svd(n, s, repeats, sample) for n, s in SHAPES.items()],
        "attention_statistics": bench_stats(args.pairs, args.batch_size, repeats),
    }
    report["load_average_1_5_15_min_at_end"] = os.getloadavg()
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
