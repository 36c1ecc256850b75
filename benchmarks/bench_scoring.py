"""Scoring throughput (pairs/s) and achieved GFLOP/s beside this machine's measured matmul rate:
HookedCrossEncoder without hooks (fused attention), with the explicit attention path (a no-op hook
on every ``hook_pattern``), with a direction-ablation hook, and under bfloat16 autocast, against
Hugging Face ``*ForSequenceClassification`` with eager and with sdpa attention on the same inputs;
for the BERT-like families also the same model with TransformerLens's own attention forward in
place of :class:`mechir.models.encoder.EncoderAttention` (with and without the hook).

The matmul rate is measured in the same run, interleaved with the variants: the two matmuls of
the feed-forward layer at the batch's shape (``[tokens, d_model] x [d_model, d_mlp]`` and back).
GFLOP/s counts the dense work of a forward pass of the BERT-block families (the padded batch):
per layer ``2 T (4 d^2 + 2 d d_mlp) + 4 B L^2 d`` (T = B L tokens).

Runs are interleaved (matmul, HF, hooked, ..., repeated) and medians reported, so that load from
other processes (and this machine's drifting speed) affects all alike; the load averages before,
during and after are recorded. bfloat16's error against float32 (max and mean absolute score
difference) is reported beside its speed; a torch.profiler summary (top operators by self time)
of the hook-free and the ablated forward pass is written too. Writes
``benchmarks/results/scoring_<device>.json``.

    python benchmarks/bench_scoring.py [--model DIR] [--pairs 64] [--batch-size 32] [--repeats 5]
        [--threads 1]

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


def forward_flops(cfg, batch: int, length: int) -> float:
    """Dense FLOPs of one forward pass of a BERT-block encoder on ``batch`` rows of ``length``."""
    d, tokens = cfg.d_model, batch * length
    per_layer = 2 * tokens * (4 * d * d + 2 * d * cfg.d_mlp) + 4 * batch * length * length * d
    return float(cfg.n_layers * per_layer)


def profile_summary(fn, top: int = 8) -> list[dict]:
    """The ``top`` operators of one call of ``fn`` by self CPU time (share of the total)."""
    with torch.profiler.profile() as prof:
        fn()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    ranked = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    return [
        {"op": e.key, "self_share": e.self_cpu_time_total / total, "calls": e.count} for e in ranked
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=default_model())
    ap.add_argument("--pairs", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=160)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (CPU)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--shape", choices=sorted(SHAPES), help="a random checkpoint of this shape")
    ap.add_argument("--no-profile", action="store_true", help="skip the torch.profiler summary")
    ap.add_argument("--skip", nargs="*", default=[], help="variants not to time (by name)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.shape:
        args.model = str(random_checkpoint(args.shape, Path(tempfile.mkdtemp()) / args.shape))

    from transformer_lens.components import Attention

    from mechir import load_cross_encoder
    from mechir.hooks import direction_ablation_hooks
    from mechir.models.encoder import EncoderAttention

    cuda = args.device.startswith("cuda")
    model = load_cross_encoder(args.model, device=args.device)
    hf = hf_model(args.model).to(args.device).eval()
    try:
        hf_sdpa = hf_model(args.model, "sdpa").to(args.device).eval()
    except (ValueError, ImportError):  # a family without Hugging Face sdpa attention
        hf_sdpa = None
    pairs = quick_set().candidates(depth=20)[: args.pairs]
    batch = model.encode(
        [p.query for p in pairs], [p.document for p in pairs], max_length=args.max_length
    )
    chunks = list(batch.chunks(args.batch_size))
    ablate = direction_ablation_hooks(model, directions="query_to_document")
    n_layers = model.cfg.n_layers
    watch = [(f"blocks.{i}.attn.hook_pattern", lambda a, hook: None) for i in range(n_layers)]

    def hf_score(net, c) -> torch.Tensor:
        if model.family.kind == "encoder-decoder":  # MonoT5: logit(true) - logit(false), step 1
            start = torch.full((len(c), 1), net.config.decoder_start_token_id, device=args.device)
            logits = net(
                input_ids=c.input_ids, attention_mask=c.attention_mask, decoder_input_ids=start
            ).logits[:, 0]
            relevant, non_relevant = model.answer_ids
            return logits[:, relevant] - logits[:, non_relevant]
        return net(
            input_ids=c.input_ids, token_type_ids=c.token_type_ids, attention_mask=c.attention_mask
        ).logits[:, 0]

    def run_hf(net=hf):
        def run() -> torch.Tensor:
            with torch.no_grad():
                return torch.cat([hf_score(net, c.to(args.device)).float().cpu() for c in chunks])

        return run

    def run_hooked(hooks=None, autocast=None) -> torch.Tensor:
        return torch.cat([model.score(c, hooks=hooks, autocast=autocast) for c in chunks])

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

    bert_blocks = isinstance(model.blocks[0].attn, EncoderAttention)
    length = batch.input_ids.shape[1]
    # the feed-forward layer's two matmuls at the batch's shape, as often as the model has layers
    tokens = min(args.batch_size, len(batch)) * length
    ffn_shapes = (
        (torch.randn(tokens, model.cfg.d_model), torch.randn(model.cfg.d_model, model.cfg.d_mlp)),
        (torch.randn(tokens, model.cfg.d_mlp), torch.randn(model.cfg.d_mlp, model.cfg.d_model)),
    )
    ffn_shapes = tuple((a.to(args.device), b.to(args.device)) for a, b in ffn_shapes)
    matmul_flops = len(chunks) * n_layers * 4.0 * tokens * model.cfg.d_model * model.cfg.d_mlp

    def run_matmuls() -> None:
        for _ in range(len(chunks) * n_layers):
            for a, b in ffn_shapes:
                a @ b

    variants = {
        "ffn_matmuls": run_matmuls,
        "hf_eager": run_hf(),
        **({"hf_sdpa": run_hf(hf_sdpa)} if hf_sdpa is not None else {}),
        "hooked_no_hooks": run_hooked,
        "hooked_explicit_attention": lambda: run_hooked(watch),
        "hooked_direction_ablation": lambda: run_hooked(ablate),
        "hooked_bf16_autocast": lambda: run_hooked(autocast=torch.bfloat16),
        "hooked_bf16_autocast_direction_ablation": lambda: run_hooked(
            ablate, autocast=torch.bfloat16
        ),
    }
    if bert_blocks:  # the same model with TransformerLens's own attention forward, side by side
        variants["hooked_tl_attention"] = with_attention(Attention, run_hooked)
        variants["hooked_tl_attention_direction_ablation"] = with_attention(
            Attention, lambda: run_hooked(ablate)
        )
    variants = {k: v for k, v in variants.items() if k not in args.skip}
    load = {"before": os.getloadavg()}
    for fn in variants.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {k: [] for k in variants}
    load["during"] = []
    for _ in range(args.repeats):
        for name, fn in variants.items():
            if cuda:
                torch.cuda.synchronize()
            t = time.perf_counter()
            fn()
            if cuda:
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t)
        load["during"].append(os.getloadavg())
    load["after"] = os.getloadavg()
    fp32 = run_hooked()
    reference = run_hf()()
    bf16 = run_hooked(autocast=torch.bfloat16)
    fp32_ablated, bf16_ablated = run_hooked(ablate), run_hooked(ablate, torch.bfloat16)
    med = {k: statistics.median(v) for k, v in times.items()}
    matmul_rate = matmul_flops / med["ffn_matmuls"] / 1e9
    flops = sum(forward_flops(model.cfg, len(c), length) for c in chunks) if bert_blocks else None
    achieved = {k: flops / v / 1e9 for k, v in med.items() if k != "ffn_matmuls"} if flops else None

    def error(low: torch.Tensor, exact: torch.Tensor) -> dict:
        diff = (low - exact).abs()
        return {
            "max_abs": float(diff.max()),
            "mean_abs": float(diff.mean()),
            "score_std": float(exact.std()),
        }

    profile = None
    if not args.no_profile and not cuda:
        one = chunks[0]
        profile = {
            "hooked_no_hooks": profile_summary(lambda: model.score(one)),
            "hooked_direction_ablation": profile_summary(lambda: model.score(one, hooks=ablate)),
            "hf_eager": profile_summary(lambda: run_hf()()),
        }
    result = {
        "benchmark": "scoring throughput",
        "model": f"random {args.shape} (bench_scoring --shape)" if args.shape else str(args.model),
        "device": args.device,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "load_average_1_5_15min": load,
        "note": "CPU shared with other jobs: ratios are side by side in one run (interleaved "
        "medians); absolute rates drift with the load",
        "pairs": len(pairs),
        "batch_size": args.batch_size,
        "max_length": args.max_length,
        "padded_length": length,
        "repeats": args.repeats,
        "median_seconds": med,
        "pairs_per_second": {k: len(pairs) / v for k, v in med.items() if k != "ffn_matmuls"},
        "matmul_gflops_per_second": matmul_rate,
        "forward_gflop_per_pair": flops / len(pairs) / 1e9 if flops else None,
        "achieved_gflops_per_second": achieved,
        "fraction_of_matmul_rate": (
            {k: v / matmul_rate for k, v in achieved.items()} if achieved else None
        ),
        "time_over_flop_bound_at_matmul_rate": (
            {k: v * matmul_rate * 1e9 / flops for k, v in med.items() if k != "ffn_matmuls"}
            if flops
            else None
        ),
        "hooked_over_hf_time": med["hooked_no_hooks"] / med["hf_eager"],
        **(
            {"hooked_over_hf_sdpa_time": med["hooked_no_hooks"] / med["hf_sdpa"]}
            if "hf_sdpa" in med
            else {}
        ),
        "explicit_over_fused_time": med["hooked_explicit_attention"] / med["hooked_no_hooks"],
        "skipped_variants": args.skip,
        "ablation_over_hooked_time": med["hooked_direction_ablation"] / med["hooked_no_hooks"],
        "ablation_over_hf_time": med["hooked_direction_ablation"] / med["hf_eager"],
        **(
            {
                "tl_attention_over_encoder_attention_time": med["hooked_tl_attention"]
                / med["hooked_no_hooks"],
                "tl_attention_over_encoder_attention_time_ablation": med[
                    "hooked_tl_attention_direction_ablation"
                ]
                / med["hooked_direction_ablation"],
            }
            if "hooked_tl_attention" in med and "hooked_tl_attention_direction_ablation" in med
            else {}
        ),
        "max_abs_score_diff_hooked_vs_hf": float((fp32 - reference).abs().max()),
        "bf16_autocast_error_vs_fp32": {
            "no_hooks": error(bf16, fp32),
            "direction_ablation": error(bf16_ablated, fp32_ablated),
        },
        "profile_top_ops_one_chunk": profile,
        "targets": {
            "hook_free_fraction_of_matmul_rate": 0.8,
            "ablation_fraction_of_matmul_rate": 0.7,
            "time_over_flop_bound": 1.3,
        },
        "gpu": "not available in this environment" if args.device == "cpu" else args.device,
    }
    tag = f"{args.shape}_" if args.shape else ""
    out = ROOT / "benchmarks" / "results" / f"scoring_{tag}{args.device.split(':')[0]}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
