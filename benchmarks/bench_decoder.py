"""Decoder LLM reranker on CPU: peak RSS at load against the weights file, and hooked scoring
vs Hugging Face at 256 tokens (issue 21, item 3).

No 0.5-0.6B reranker checkpoint is available offline, so the model is a **random-init Qwen3
of Qwen3-Reranker-0.6B's shape** (28 layers, d_model 1024, 16 query / 8 key-value heads of 128,
d_mlp 3072, vocabulary 151,936, tied embeddings, QK-norm), saved locally in fp32 with the tiny
byte-level BPE tokenizer of the tests (``tests/families/builders.py``; only ids < 480 occur).
Timings do not depend on the weights' values.

1. Load (a fresh subprocess): ``load_cross_encoder(dir)``; peak RSS during the call (sampled
   every 2 ms: the child's ``ru_maxrss`` starts at its parent's high-water mark, so it is
   recorded but not used) minus the RSS before the call, against the size of
   ``model.safetensors``.
2. Scoring: Hugging Face ``Qwen3ForCausalLM`` (eager and sdpa attention, ``logits_to_keep=1``
   so that it computes the vocabulary head at the last position only, as the hooked model's
   2-row yes/no head does) vs ``model.score`` without hooks and with a document->query
   direction ablation; interleaved runs, medians. Every prompt is exactly ``--max-length``
   tokens (no padding), so HF's last position is the last real token.

    python benchmarks/bench_decoder.py [--pairs 4] [--batch-size 4] [--repeats 3]

Writes ``benchmarks/results/decoder_cpu.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

QWEN3_06B = dict(
    hidden_size=1024,
    intermediate_size=3072,
    num_hidden_layers=28,
    num_attention_heads=16,
    num_key_value_heads=8,
    head_dim=128,
    vocab_size=151936,
    max_position_embeddings=40960,
    rope_theta=1_000_000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
)


def build(directory: Path) -> Path:
    """Save a random Qwen3-0.6B-shaped yes/no reranker (fp32) with the tests' chat tokenizer."""
    import transformers

    from tests.families.builders import chat_bpe_tokenizer

    config = transformers.Qwen3Config(**QWEN3_06B)
    config.architectures = ["Qwen3ForCausalLM"]
    torch.manual_seed(0)
    model = transformers.Qwen3ForCausalLM(config)
    model.save_pretrained(directory)
    chat_bpe_tokenizer().save_pretrained(directory)
    del model
    return directory


def measure_load(directory: str) -> None:
    """(Run in a fresh process.) Print the RSS growth of one ``load_cross_encoder`` call."""
    import psutil

    from mechir import load_cross_encoder

    process = psutil.Process()
    before = process.memory_info().rss
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    sampled = [before]
    done = threading.Event()

    def sample() -> None:  # ru_maxrss keeps the parent's high-water mark across fork + exec
        while not done.is_set():
            sampled.append(process.memory_info().rss)
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t = time.perf_counter()
    model = load_cross_encoder(directory, device="cpu")
    seconds = time.perf_counter() - t
    done.set()
    sampler.join()
    sampled.append(process.memory_info().rss)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    n_params = sum(p.numel() for p in model.parameters())
    print(json.dumps({
        "rss_before_bytes": before, "peak_rss_before_bytes": peak_before,
        "peak_rss_after_bytes": peak, "sampled_peak_rss_bytes": max(sampled),
        "rss_after_bytes": sampled[-1], "load_seconds": seconds, "parameters": n_params,
    }))  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", default=None, help="reuse a checkpoint built by an earlier run")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (the load is measured on CPU)")
    ap.add_argument("--measure-load", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure_load:
        measure_load(args.measure_load)
        return

    tmp = None
    if args.dir and (Path(args.dir) / "config.json").exists():
        directory = Path(args.dir)
    else:
        tmp = tempfile.TemporaryDirectory()
        directory = build(Path(args.dir or tmp.name))
    weights = sum(f.stat().st_size for f in directory.glob("*.safetensors"))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run(
        [sys.executable, __file__, "--measure-load", str(directory)],
        capture_output=True, text=True, check=True, env=env,
    )  # fmt: skip
    load = json.loads(out.stdout.strip().splitlines()[-1])
    # the sampled peak (every 2 ms): ru_maxrss of the child starts at the parent's high-water mark
    growth = load["sampled_peak_rss_bytes"] - load["rss_before_bytes"]

    import transformers

    from mechir import load_cross_encoder
    from mechir.hooks import direction_ablation_hooks

    model = load_cross_encoder(str(directory), device=args.device)
    hf = {
        impl: transformers.Qwen3ForCausalLM.from_pretrained(directory, attn_implementation=impl)
        .to(args.device)
        .eval()
        for impl in ("eager", "sdpa")
    }
    words = "the cat sat on a mat while dogs ran quickly through wet green fields".split()
    queries = [" ".join(words[i : i + 5]) for i in range(args.pairs)]
    documents = [" ".join((words * 40)[i : i + 400]) for i in range(args.pairs)]
    batch = model.encode(queries, documents, max_length=args.max_length).to(args.device)
    assert bool(batch.attention_mask.bool().all()), "every prompt must fill max_length"
    assert batch.input_ids.shape[1] == args.max_length
    yes, no = model.answer_ids  # (relevant, non-relevant)
    chunks = list(batch.chunks(args.batch_size))
    ablate = direction_ablation_hooks(model, attending="document", attended="query", layers="all")

    def run_hf(impl: str):
        def run() -> torch.Tensor:
            out = []
            with torch.no_grad():
                for c in chunks:
                    logits = hf[impl](
                        input_ids=c.input_ids, attention_mask=c.attention_mask, logits_to_keep=1
                    ).logits[:, -1]
                    out.append(logits[:, yes] - logits[:, no])
            return torch.cat(out)

        return run

    def run_hooked(hooks=None) -> torch.Tensor:
        return torch.cat([model.score(c, hooks=hooks) for c in chunks])

    variants = {
        "hf_eager": run_hf("eager"),
        "hf_sdpa": run_hf("sdpa"),
        "hooked_no_hooks": run_hooked,
        "hooked_direction_ablation": lambda: run_hooked(ablate),
    }
    for fn in variants.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.repeats):
        for name, fn in variants.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    max_diff = float((run_hooked() - run_hf("eager")()).abs().max())
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "benchmark": "decoder reranker: load memory and scoring vs Hugging Face",
        "model": "random-init Qwen3ForCausalLM of Qwen3-Reranker-0.6B's shape (not real weights)",
        "config": QWEN3_06B,
        "device": args.device,
        "cpu": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "load": {
            "weights_file_bytes": weights,
            "weights_dtype": "float32",
            "load_dtype": "float32",
            **load,
            "peak_rss_growth_bytes": growth,
            "peak_rss_growth_over_weights_file": growth / weights,
        },
        "pairs": len(batch),
        "batch_size": args.batch_size,
        "tokens_per_pair": args.max_length,
        "repeats": args.repeats,
        "median_seconds": med,
        "times_seconds": times,
        "pairs_per_second": {k: len(batch) / v for k, v in med.items()},
        "hooked_over_hf_eager_time": med["hooked_no_hooks"] / med["hf_eager"],
        "hooked_over_hf_sdpa_time": med["hooked_no_hooks"] / med["hf_sdpa"],
        "ablation_over_hooked_time": med["hooked_direction_ablation"] / med["hooked_no_hooks"],
        "target_hooked_over_hf_time": 1.25,
        "max_abs_score_diff_hooked_vs_hf_eager": max_diff,
        "gpu": torch.cuda.get_device_name(0) if args.device == "cuda" else "not used",
    }
    path = ROOT / "benchmarks" / "results" / f"decoder_{args.device}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
