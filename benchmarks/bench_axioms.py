"""Lu et al. (2025)'s head and path patching over 100 diagnostic pairs, timed.

Pairs: the axioms study's TFC1 diagnostic pairs (``patching.axioms``: a random query content
word appended vs as many "a" fillers, ``max_length`` 160) of the SciFact quick set's BM25 top-20
candidates, judged queries in order (``../shared``'s, else the embedded demo's: see
``benchmarks/assets.py``). Timed, one after the other in one process:

* head -> [CLS] path patching of every head (``patching.semantic_bm25.cls_path_patch``);
* head patching, the exact top-10 heads by mean metric, guided by attribution patching
  (``patch_top_cells(head_target(), k=10, average=True)``);
* head patching, every layer x head exact (``patch_sweep(head_target())``), on the first
  ``--sweep-pairs`` pairs (its time per pair extrapolated to all pairs, labelled so), and
  whether guided patching on those pairs finds the sweep's top 10.

Models: the shared 6-layer MiniLM cross-encoder (SciFact), and a randomly initialised 12-layer
MiniLM-shaped BERT (d_model 384, 12 heads, d_mlp 1536, the MiniLM tokenizer): no 12-layer
checkpoint is available offline, so the 12-layer row measures time only (its random scores give
pairs with tiny clean - corrupted gaps). Writes ``benchmarks/results/axioms_cpu.json`` with the
load average before and after each measurement (the machine is shared).

    python benchmarks/bench_axioms.py [--pairs 100] [--threads 2] [--skip-12]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import time
from pathlib import Path

import torch
from assets import default_model, quick_set  # benchmarks/ is on the path of a script run

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]


def tfc1_pairs(model, n_pairs: int, max_length: int, seed: int = 0):
    """The axioms study's TFC1 pairs (default options) of the quick set's candidates."""
    from patching import PairBuilder, TermStatistics
    from patching.axioms import AxiomBuilder

    collection = quick_set()
    stats = TermStatistics.from_documents(collection.docs.values())
    builder = AxiomBuilder(
        PairBuilder(model.tokenizer, max_length=max_length, stats=stats, seed=seed)
    )
    items = collection.candidates(depth=20, query_ids=collection.query_ids())
    built = builder.build(items, "TFC1", qrels=collection.qrels, limit=n_pairs)
    return built.aligned(model.tokenizer)


def random_minilm_12(tokenizer_dir: str):
    """A randomly initialised 12-layer MiniLM-shaped BERT cross-encoder (seed 0)."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from mechir import load_cross_encoder
    from mechir.demo import resolve_model

    tok = AutoTokenizer.from_pretrained(resolve_model(tokenizer_dir))
    config = BertConfig(
        vocab_size=tok.vocab_size, hidden_size=384, num_hidden_layers=12, num_attention_heads=12,
        intermediate_size=1536, max_position_embeddings=512, num_labels=1,
    )  # fmt: skip
    torch.manual_seed(0)
    hf = BertForSequenceClassification(config).eval()
    return load_cross_encoder(hf, tokenizer=tok, device="cpu")


def timed(label: str, fn):
    before = os.getloadavg()
    t0 = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - t0
    after = os.getloadavg()
    print(f"  {label}: {seconds:.1f} s (load {before[0]:.1f} -> {after[0]:.1f})", flush=True)
    return out, {"seconds": seconds, "load_before": list(before), "load_after": list(after)}


def bench(name: str, model, pairs, k: int, sweep_pairs: int) -> dict:
    from patching import head_target, patch_sweep, patch_top_cells
    from patching.semantic_bm25 import cls_path_patch

    cfg = model.cfg
    n = len(pairs)
    print(f"[{name}] {n} pairs x {pairs.clean.input_ids.shape[1]} positions", flush=True)
    path, t_path = timed(
        "head -> CLS path patching, every head", lambda: cls_path_patch(model, pairs)
    )
    # a random model's pairs barely differ: rank over every pair with any gap then
    included = int((path.delta.abs() >= 1e-3).sum())
    min_delta = 1e-3 if included >= n // 2 else 1e-7
    guided, t_guided = timed(f"head patching, guided exact top-{k}", lambda: patch_top_cells(
        model, pairs, head_target(), k=k, average=True, min_delta=min_delta,
        progress=False))  # fmt: skip
    sub = pairs[:sweep_pairs]
    sweep, t_sweep = timed(f"head patching, every head, first {len(sub)} pairs", lambda: (
        patch_sweep(model, sub, head_target(), progress=False)))  # fmt: skip
    sub_guided = patch_top_cells(
        model, sub, head_target(), k=k, average=True, min_delta=min_delta, progress=False
    )
    order = sweep.mean(min_delta).reshape(-1).abs().nan_to_num(-1.0).argsort(descending=True)
    sweep_top = {(i // cfg.n_heads, i % cfg.n_heads) for i in order[:k].tolist()}
    guided_top = {tuple(int(x) for x in c) for c in sub_guided.top_labels(0)}
    per_pair = t_sweep["seconds"] / len(sub)
    return {
        "model": name,
        "n_layers": cfg.n_layers,
        "n_heads": cfg.n_heads,
        "d_model": cfg.d_model,
        "pairs": n,
        "pairs_with_delta_at_least_1e-3": included,
        "min_delta": min_delta,
        "seq_len": int(pairs.clean.input_ids.shape[1]),
        "cls_path_every_head": t_path | {"rows": n * cfg.n_layers * cfg.n_heads},
        "head_guided_top_k": t_guided
        | {
            "k": k,
            "exact_rows": int(guided.n_rows),
            "rows_of_full_sweep": int(guided.n_cells_total),
        },
        "head_sweep_every_head": t_sweep
        | {
            "pairs_timed": len(sub),
            "seconds_per_pair": per_pair,
            "extrapolated_seconds_for_all_pairs": per_pair * n,
            "guided_top_k_on_these_pairs_equals_sweep_top_k": sweep_top == guided_top,
            "top_k_overlap": len(sweep_top & guided_top),
        },
        "head_and_path_seconds_guided": t_guided["seconds"] + t_path["seconds"],
        "head_and_path_seconds_full_sweep_extrapolated": per_pair * n + t_path["seconds"],
        "top_path_heads": [
            f"{i // cfg.n_heads}/{i % cfg.n_heads}"
            for i in path.mean(min_delta)
            .reshape(-1)
            .abs()
            .nan_to_num(-1.0)
            .argsort(descending=True)[:5]
        ],
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", type=int, default=100)
    p.add_argument("--max-length", type=int, default=160)
    p.add_argument("--k", type=int, default=10)
    p.add_argument(
        "--sweep-pairs", type=int, default=20, help="pairs of the full head sweep (extrapolated)"
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--skip-12", action="store_true", help="only the shared 6-layer model")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "axioms_cpu.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from mechir import load_cross_encoder

    name = default_model()
    results = []
    model = load_cross_encoder(name, device="cpu")
    pairs = tfc1_pairs(model, args.pairs, args.max_length)
    results.append(
        bench(f"{Path(name).name} (6 layers, SciFact)", model, pairs, args.k, args.sweep_pairs)
    )
    if not args.skip_12:
        model12 = random_minilm_12(name)
        pairs12 = tfc1_pairs(model12, args.pairs, args.max_length)
        results.append(
            bench("random 12-layer MiniLM-shaped BERT", model12, pairs12, args.k, args.sweep_pairs)
        )
    record = {
        "benchmark": "Lu et al. 2025 head patching and head -> CLS path patching over TFC1 "
        "diagnostic pairs",
        "device": "cpu",
        "pairs": f"axioms study TFC1, scifact quick BM25 top-20, max_length {args.max_length}",
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformer_lens": importlib.metadata.version("transformer-lens"),
            "cpu_count": os.cpu_count(),
            "torch_threads": args.threads,
            "note": "CPU shared with other processes: see each row's load averages",
        },
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
