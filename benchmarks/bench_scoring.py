"""Scoring throughput (pairs/s): HookedCrossEncoder without hooks, with a direction-ablation hook,
and plain Hugging Face ``BertForSequenceClassification`` (eager attention) on the same inputs;
for the BERT-like families also the same model with TransformerLens's own attention forward in
place of :class:`mechir.models.encoder.EncoderAttention` (with and without the hook).

Runs are interleaved (HF, hooked, hooked+ablation, ..., repeated) and medians reported, so that
load from other processes (and this machine's drifting speed) affects all alike. Writes
``benchmarks/results/scoring_<device>.json``.

    python benchmarks/bench_scoring.py [--model DIR] [--pairs 256] [--batch-size 32] [--repeats 5]

``--shape deberta-v3-base`` (or ``monot5-base``: Hugging Face's ``T5ForConditionalGeneration``,
``logit(true) - logit(false)`` at the first decoder step) measures a random checkpoint of that
shape instead (a family whose weights are not on the machine) and writes
``scoring_<shape>_<device>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from assets import SHAPES, default_model, hf_model, quick_set, random_checkpoint

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=default_model())
    ap.add_argument("--pairs", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=160)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--shape", choices=sorted(SHAPES), help="a random checkpoint of this shape")
    args = ap.parse_args()
    if args.shape:
        args.model = str(random_checkpoint(args.shape, Path(tempfile.mkdtemp()) / args.shape))

    from transformer_lens.components import Attention

    from mechir import load_cross_encoder
    from mechir.hooks import direction_ablation_hooks
    from mechir.models.encoder import EncoderAttention

    model = load_cross_encoder(args.model, device=args.device)
    hf = hf_model(args.model).to(args.device).eval()
    pairs = quick_set().candidates(depth=20)[: args.pairs]
    batch = model.encode(
        [p.query for p in pairs], [p.document for p in pairs], max_length=args.max_length
    )
    chunks = list(batch.chunks(args.batch_size))
    ablate = direction_ablation_hooks(model, directions="query_to_document")

    def hf_score(c) -> torch.Tensor:
        if model.family.kind == "encoder-decoder":  # MonoT5: logit(true) - logit(false), step 1
            start = torch.full((len(c), 1), hf.config.decoder_start_token_id, device=args.device)
            logits = hf(
                input_ids=c.input_ids, attention_mask=c.attention_mask, decoder_input_ids=start
            ).logits[:, 0]
            relevant, non_relevant = model.answer_ids
            return logits[:, relevant] - logits[:, non_relevant]
        return hf(
            input_ids=c.input_ids, token_type_ids=c.token_type_ids, attention_mask=c.attention_mask
        ).logits[:, 0]

    def run_hf() -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([hf_score(c.to(args.device)).float().cpu() for c in chunks])

    def run_hooked(hooks=None) -> torch.Tensor:
        return torch.cat([model.score(c, hooks=hooks) for c in chunks])

    def with_attention(cls: type, fn):
        """``fn`` with every block's attention computed by ``cls``'s forward (same module)."""

        def run() -> torch.Tensor:
            kept = [block.attn.__class__ for block in model.blocks]
            for block in model.blocks:
                block.attn.__class__ = cls
            try:
                return fn()
            finally:
                for block, k in zip(model.blocks, kept):
                    block.attn.__class__ = k

        return run

    variants = {
        "hf_eager": run_hf,
        "hooked_no_hooks": run_hooked,
        "hooked_direction_ablation": lambda: run_hooked(ablate),
    }
    if isinstance(model.blocks[0].attn, EncoderAttention):  # the BERT-like families
        # the same model with TransformerLens's own attention forward, side by side
        variants["hooked_tl_attention"] = with_attention(Attention, run_hooked)
        variants["hooked_tl_attention_direction_ablation"] = with_attention(
            Attention, lambda: run_hooked(ablate)
        )
    for fn in variants.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.repeats):
        for name, fn in variants.items():
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            t = time.perf_counter()
            fn()
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t)
    max_diff = float((run_hooked() - run_hf()).abs().max())
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "benchmark": "scoring throughput",
        "model": f"random {args.shape} (bench_scoring --shape)" if args.shape else str(args.model),
        "device": args.device,
        "cpu": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "pairs": len(pairs),
        "batch_size": args.batch_size,
        "max_length": args.max_length,
        "repeats": args.repeats,
        "median_seconds": med,
        "pairs_per_second": {k: len(pairs) / v for k, v in med.items()},
        "hooked_over_hf_time": med["hooked_no_hooks"] / med["hf_eager"],
        "ablation_over_hooked_time": med["hooked_direction_ablation"] / med["hooked_no_hooks"],
        **(
            {
                "tl_attention_over_encoder_attention_time": med["hooked_tl_attention"]
                / med["hooked_no_hooks"],
                "tl_attention_over_encoder_attention_time_ablation": med[
                    "hooked_tl_attention_direction_ablation"
                ]
                / med["hooked_direction_ablation"],
            }
            if "hooked_tl_attention" in med
            else {}
        ),
        "target_hooked_over_hf_time": 1.25,
        "max_abs_score_diff_hooked_vs_hf": max_diff,
        "gpu": "not available in this environment" if args.device == "cpu" else args.device,
    }
    tag = f"{args.shape}_" if args.shape else ""
    out = ROOT / "benchmarks" / "results" / f"scoring_{tag}{args.device.split(':')[0]}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
