"""Scoring throughput near the hardware (issue 34): pairs/s and achieved TFLOP/s as a fraction of
the device's nominal peak, for reranker shapes x batch sizes x precisions x attention paths,
against Hugging Face eager and sdpa on the same inputs.

Rows (each a median of ``--repeats`` timed forward passes of one batch, after one warm-up):

* shapes: ``minilm-l6`` (the demo cross-encoder's shape, 160 tokens), ``bert-base`` and
  ``bert-large`` (256 tokens), ``qwen3-0.6b`` (Qwen3-Reranker-0.6B's shape, 256 tokens); random
  weights (the speed does not depend on the values), the demo model's tokenizer for the BERT
  shapes, the tests' byte-level tokenizer for Qwen3;
* batch sizes ``--batch-sizes`` (default 64 256 1024 2048);
* precisions: ``fp32``, ``tf32`` (fp32 with TF32 matmuls: ``torch.set_float32_matmul_precision
  ("high")``, restored after), ``bf16`` (``torch.autocast``, for mechir's ``score(autocast=...)``
  and Hugging Face alike);
* variants: ``hooked_fused`` (no hooks: fused ``scaled_dot_product_attention``),
  ``hooked_explicit`` (a no-op hook on every ``hook_pattern``: the explicit softmax),
  ``hooked_direction_ablation`` (needs the explicit path), ``hf_eager``, ``hf_sdpa``.

FLOPs are the dense work of the padded batch (encoder: ``2 T (4 d^2 + 2 d d_mlp) + 4 B L^2 d``
per layer; decoder: the same with grouped key/value widths and a gated MLP, full ``L^2``
attention counted); peaks are the datasheet's dense figures for the recognised devices (H100,
H200, A100), else null. A row that runs out of memory or past ``--budget-s`` says so. On a CPU
it runs too (small sizes, to check the script). Writes
``benchmarks/results/gpu_throughput_<device>.json``.

    python benchmarks/bench_gpu_throughput.py [--device cuda] [--shapes minilm-l6 bert-base ...]
        [--batch-sizes 64 256 1024 2048] [--precisions fp32 tf32 bf16] [--budget-s 420]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from assets import default_model, quick_set

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

#: (hidden, layers, heads, d_mlp, tokens) of the BERT-block shapes.
ENCODER_SHAPES: dict[str, tuple[int, int, int, int, int]] = {
    "minilm-l6": (384, 6, 12, 1536, 160),
    "bert-base": (768, 12, 12, 3072, 256),
    "bert-large": (1024, 24, 16, 4096, 256),
}
DECODER_TOKENS = 256
#: Nominal dense peaks, TFLOP/s (NVIDIA datasheets; SXM parts), by precision.
PEAKS: dict[str, dict[str, float]] = {
    "H200": {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4},
    "H100": {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4},
    "A100": {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0},
}


def device_peaks(device: str) -> dict[str, float] | None:
    if not device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name(torch.device(device))
    return next((p for key, p in PEAKS.items() if key in name), None)


def build_encoder(shape: str, directory: Path) -> Path:
    """A random BERT cross-encoder of ``shape`` with the demo model's tokenizer."""
    import transformers

    from mechir.demo import resolve_model

    d, layers, heads, d_mlp, tokens = ENCODER_SHAPES[shape]
    tokenizer = transformers.AutoTokenizer.from_pretrained(resolve_model(default_model()))
    config = transformers.BertConfig(
        vocab_size=len(tokenizer), hidden_size=d, num_hidden_layers=layers,
        num_attention_heads=heads, intermediate_size=d_mlp, max_position_embeddings=512,
        num_labels=1, architectures=["BertForSequenceClassification"],
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.BertForSequenceClassification(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def flops(cfg: Any, rows: int, length: int, decoder: bool) -> float:
    """Dense FLOPs of one forward pass (see the module docstring)."""
    d, t = cfg.d_model, rows * length
    q_width = cfg.n_heads * cfg.d_head
    kv_width = (getattr(cfg, "n_key_value_heads", None) or cfg.n_heads) * cfg.d_head
    mlp = (3 if decoder else 2) * d * cfg.d_mlp
    per_layer = 2 * t * (2 * d * q_width + 2 * d * kv_width + mlp)
    per_layer += 4 * rows * length * length * q_width
    return float(cfg.n_layers * per_layer)


def inputs(model: Any, shape: str, rows: int) -> Any:
    """``rows`` pairs filling the shape's token count (the quick set's pairs, repeated)."""
    if shape == "qwen3-0.6b":
        words = "the cat sat on a mat while dogs ran quickly through wet green fields".split()
        queries = [" ".join(words[i % 9 : i % 9 + 5]) for i in range(rows)]
        documents = [" ".join((words * 40)[i % 13 : i % 13 + 400]) for i in range(rows)]
        return model.encode(queries, documents, max_length=DECODER_TOKENS)
    pairs = quick_set().candidates(depth=20)
    pairs = [pairs[i % len(pairs)] for i in range(rows)]
    return model.encode(
        [p.query for p in pairs], [p.document for p in pairs], max_length=ENCODER_SHAPES[shape][4]
    )


@contextlib.contextmanager
def precision(name: str):
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high" if name == "tf32" else "highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def hf_scorer(net: Any, batch: Any, device: str, bf16: bool, yes_no: Any) -> Any:
    """Hugging Face's score of ``batch`` (decoder: ``logit(yes) - logit(no)`` at the last
    position, the vocabulary head at that position only), under bf16 autocast if asked."""

    def run() -> torch.Tensor:
        ctx = (
            torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
            if bf16
            else contextlib.nullcontext()
        )
        with torch.no_grad(), ctx:
            if yes_no is not None:
                out = net(
                    input_ids=batch.input_ids, attention_mask=batch.attention_mask, logits_to_keep=1
                )
                logits = out.logits[:, -1]
                return logits[:, yes_no[0]] - logits[:, yes_no[1]]
            return net(
                input_ids=batch.input_ids,
                token_type_ids=batch.token_type_ids,
                attention_mask=batch.attention_mask,
            ).logits[:, 0]

    return run


def hooked_scorer(model: Any, batch: Any, hooks: Any, autocast: Any) -> Any:
    return lambda: model.score(batch, hooks=hooks, autocast=autocast)


def timed_median(fn: Any, repeats: int, cuda: bool) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def measure_shape(
    args: argparse.Namespace, shape: str, directory: Path, peaks: Any, deadline: float
) -> list[dict[str, Any]]:
    """Every row of one shape (see the module docstring)."""
    import transformers

    from mechir import load_cross_encoder
    from mechir.hooks import direction_ablation_hooks

    cuda = args.device.startswith("cuda")
    decoder = shape == "qwen3-0.6b"
    model = load_cross_encoder(directory, device=args.device)
    hf_class = (
        transformers.Qwen3ForCausalLM if decoder else transformers.BertForSequenceClassification
    )
    hf = {
        impl: hf_class.from_pretrained(directory, attn_implementation=impl).to(args.device).eval()
        for impl in ("eager", "sdpa")
    }
    n = model.cfg.n_layers
    watch = [(f"blocks.{i}.attn.hook_pattern", lambda a, hook: None) for i in range(n)]
    ablate = (
        direction_ablation_hooks(model, attending="document", attended="query")
        if decoder
        else direction_ablation_hooks(model, directions="query_to_document")
    )
    full = inputs(model, shape, max(args.batch_sizes)).to(args.device)
    yes_no = model.answer_ids if decoder else None
    rows: list[dict[str, Any]] = []
    for prec in args.precisions:
        autocast = torch.bfloat16 if prec == "bf16" else None
        for size in args.batch_sizes:
            batch = full[:size]
            length = batch.input_ids.shape[1]
            variants = {
                "hooked_fused": hooked_scorer(model, batch, None, autocast),
                "hooked_explicit": hooked_scorer(model, batch, watch, autocast),
                "hooked_direction_ablation": hooked_scorer(model, batch, ablate, autocast),
                "hf_eager": hf_scorer(hf["eager"], batch, args.device, prec == "bf16", yes_no),
                "hf_sdpa": hf_scorer(hf["sdpa"], batch, args.device, prec == "bf16", yes_no),
            }
            work = flops(model.cfg, size, length, decoder)
            for name, fn in variants.items():
                row = {"shape": shape, "precision": prec, "batch_size": size}
                row |= {"tokens": length, "variant": name}
                if time.perf_counter() > deadline:
                    rows.append(row | {"status": "skipped (time budget)"})
                    continue
                try:
                    with precision(prec):
                        seconds = timed_median(fn, args.repeats, cuda)
                except torch.OutOfMemoryError:
                    rows.append(row | {"status": "out of memory"})
                    torch.cuda.empty_cache()
                    continue
                tflops = work / seconds / 1e12
                rows.append(
                    row
                    | {
                        "status": "measured",
                        "seconds": seconds,
                        "pairs_per_second": size / seconds,
                        "tflops": tflops,
                        "fraction_of_peak": tflops / peaks[prec] if peaks else None,
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--shapes", nargs="+", default=[*ENCODER_SHAPES, "qwen3-0.6b"])
    ap.add_argument("--batch-sizes", nargs="+", type=int, default=[64, 256, 1024, 2048])
    ap.add_argument("--precisions", nargs="+", default=["bf16", "fp32", "tf32"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--budget-s", type=float, default=420.0, help="stop starting rows after this")
    args = ap.parse_args()
    cuda = args.device.startswith("cuda")
    peaks = device_peaks(args.device)
    deadline = time.perf_counter() + args.budget_s
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for shape in args.shapes:
            directory = Path(tmp) / shape
            directory.mkdir()
            if shape == "qwen3-0.6b":
                from bench_decoder import build

                build(directory)
            else:
                build_encoder(shape, directory)
            rows += measure_shape(args, shape, directory, peaks, deadline)
            if cuda:
                torch.cuda.empty_cache()
    result = {
        "benchmark": "scoring throughput near the hardware (issue 34)",
        "device": args.device,
        "device_name": torch.cuda.get_device_name(0) if cuda else "cpu",
        "torch": torch.__version__,
        "nominal_peaks_tflops": peaks,
        "repeats": args.repeats,
        "budget_s": args.budget_s,
        "rows": rows,
    }
    out = ROOT / "benchmarks" / "results" / f"gpu_throughput_{args.device.split(':')[0]}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
