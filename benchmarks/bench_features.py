"""Sparse features: activation collection, SAE training, attribution vs exact ablation, SAE vs PCA.

On the shared SciFact MiniLM cross-encoder (else the embedded demo copy), one middle-layer site
(``blocks.3.hook_resid_pre`` = the output of layer 2), side by side in one run:

* **collection**: pairs/s and activations/s of ``mechir.features.source.site_activations``
  (the hooked forward, stopped at the site) vs a plain Hugging Face forward collecting the same
  tensor with a PyTorch forward hook on ``bert.encoder.layer[2]`` (full forward, as HF runs it),
  and vs mechir's full hooked forward; the largest difference between the collected tensors;
* **step time**: seconds per SAELens training step at 1 and at 2 intra-op threads and of one
  evaluation, side by side (``train_sae`` trains on one thread by default);
* **training curve**: one TopK SAE per number of distinct training activations (``--curve``, the
  first rows = whole train queries' candidates), all with the same steps, each evaluated on
  held-out activations every ``--eval-every`` steps (wall time to ``--target-fvu``) and by the
  ranking-aware fidelity table on the held-out queries (FVU, score Spearman, Kendall tau, KL
  score, nDCG@10 change): the curve the issue asks for when CPU-scale data misses a target;
* **attribution**: attribution patching of the top ``--top-features`` features vs their exact
  single-feature ablation (error kept) on held-out relevant pairs: Pearson r and time ratio;
  integrated gradients (mean baselines, ``n_steps="auto"``): completeness error;
* **SAE vs PCA at equal L0**: the ranking-aware fidelity table on the held-out queries' candidates
  (the SAE of the largest curve point).

The load average before and after is recorded (the machine may be shared). ``--cache DIR``
keeps the collected activations in fp16 between runs; training checkpoints go to
``/tmp/mechir_bench_features``, one per setting (a rerun resumes them).

    python benchmarks/bench_features.py [--train-queries 90] [--eval-queries 24] [--steps 3000]
        [--cache /tmp/features_cache] [--out benchmarks/results/features_cpu.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from assets import SCIFACT, default_model, hf_model  # noqa: E402

SITE_LAYER = 3
SITE = f"blocks.{SITE_LAYER}.hook_resid_pre"


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def collection_bench(model, hf, pairs, max_length, batch_size):
    import torch

    from mechir.features.source import site_activations

    batches = [
        model.encode([p.query for p in pairs[i : i + batch_size]],
                     [p.document for p in pairs[i : i + batch_size]], max_length=max_length)
        for i in range(0, len(pairs), batch_size)
    ]  # fmt: skip
    rows = [0]

    def mechir_stop():
        rows[0] = sum(len(site_activations(model, b, SITE)) for b in batches)

    def mechir_full():
        for b in batches:
            with torch.no_grad():
                model.run_with_cache(b, names_filter=SITE)

    caught = []

    def hf_full():
        caught.clear()
        layer = hf.bert.encoder.layer[SITE_LAYER - 1]
        handle = layer.register_forward_hook(
            lambda m, i, o: caught.append((o[0] if isinstance(o, tuple) else o).detach())
        )
        try:
            with torch.no_grad():
                for b in batches:
                    hf(
                        input_ids=b.input_ids,
                        token_type_ids=b.token_type_ids,
                        attention_mask=b.attention_mask,
                    )
        finally:
            handle.remove()

    out = {}
    for name, fn in (
        ("mechir_stop_at_site", mechir_stop),
        ("mechir_full_forward", mechir_full),
        ("hf_forward_hook", hf_full),
    ):
        fn()  # warm-up
        _, seconds = timed(fn)
        out[name] = {"seconds": seconds, "pairs_per_s": len(pairs) / seconds}
    for v in out.values():
        v["activations_per_s"] = rows[0] / v["seconds"]
    # the same tensor: mechir's rows vs HF's at the real tokens
    diff = 0.0
    for b, h in zip(batches, caught):
        ours = site_activations(model, b, SITE)
        ref = h[ours.pair, ours.position].float().cpu()
        diff = max(diff, float((ours.acts - ref).abs().max()))
    out["max_abs_difference"] = diff
    out["rows"] = rows[0]
    out["speed_ratio_stop_vs_hf"] = (
        out["hf_forward_hook"]["seconds"] / out["mechir_stop_at_site"]["seconds"]
    )
    out["speed_ratio_full_vs_hf"] = (
        out["hf_forward_hook"]["seconds"] / out["mechir_full_forward"]["seconds"]
    )
    return out


def step_time_bench(train_rows, eval_rows, args):
    """Seconds per SAELens training step at 1 and 2 intra-op threads, and one evaluation, side
    by side on the same rows (why train_sae trains on one thread by default)."""
    from mechir.features.saes import training_config
    from mechir.features.source import RowStream
    from mechir.features.training import train_sae

    d = train_rows.shape[1]
    cfg = training_config(
        "topk", d_in=d, d_sae=args.d_sae_factor * d, site=SITE, k=args.k,
        normalize_activations="expected_average_only_in", device=args.device,
    )  # fmt: skip
    out = {"steps": args.timing_steps, "batch": args.train_batch}
    for threads in (1, 2):
        stream = RowStream(train_rows, batch_size=args.train_batch)
        run = lambda stream=stream, threads=threads: train_sae(  # noqa: E731
            cfg, stream, steps=args.timing_steps, batch_size=args.train_batch, lr=args.lr,
            norm_batches=1, threads=threads, progress=False,
        )  # fmt: skip
        _, seconds = timed(run)
        out[f"seconds_per_step_{threads}_threads"] = seconds / args.timing_steps
    stream = RowStream(train_rows, batch_size=args.train_batch)
    with_eval = lambda: train_sae(  # noqa: E731
        cfg, stream, steps=args.timing_steps, batch_size=args.train_batch, lr=args.lr,
        norm_batches=1, eval_acts=eval_rows, eval_every=args.timing_steps, progress=False,
    )  # fmt: skip
    _, seconds = timed(with_eval)
    out["seconds_per_evaluation"] = seconds - args.timing_steps * out["seconds_per_step_1_threads"]
    out["eval_rows"] = len(eval_rows)
    out["two_over_one_thread"] = (
        out["seconds_per_step_2_threads"] / out["seconds_per_step_1_threads"]
    )
    return out


def train_bench(train_rows, eval_rows, args, log_dir):
    """One TopK SAE per number of distinct training activations (the first ``n`` rows: whole
    queries' candidates, in collection order), all with the same steps and settings."""
    from mechir.features.saes import training_config
    from mechir.features.source import RowStream
    from mechir.features.training import train_sae

    d = train_rows.shape[1]
    curve, saes = [], {}
    for n in args.curve:
        n = min(n, len(train_rows))
        cfg = training_config(
            "topk",
            d_in=d,
            d_sae=args.d_sae_factor * d,
            site=SITE,
            k=args.k,
            normalize_activations="expected_average_only_in",
            device=args.device,
        )
        log = log_dir / f"train_{n}.jsonl"
        start = time.perf_counter()
        trained = train_sae(
            cfg,
            RowStream(train_rows[:n], batch_size=args.train_batch),
            steps=args.steps,
            batch_size=args.train_batch,
            lr=args.lr,
            lr_decay_steps=int(args.lr_decay * args.steps),
            dead_feature_window=args.dead_window,
            init_b_dec=args.init_b_dec,
            eval_acts=eval_rows,
            eval_every=args.eval_every,
            log=log,
            checkpoint=log_dir / f"checkpoint_{n}_{run_key(args)}",
            progress=False,
        )
        seconds = time.perf_counter() - start
        evals = [json.loads(line) for line in log.read_text().splitlines()]
        reached = next((e for e in evals if e["fvu"] <= args.target_fvu), None)
        curve.append(
            {
                "training_activations": n,
                "epochs": args.steps * args.train_batch / n,
                "seconds": seconds,
                "final": evals[-1],
                "evaluations": evals,
                "target_fvu": args.target_fvu,
                "step_reaching_target": reached["step"] if reached else None,
                "seconds_to_target": seconds * reached["step"] / args.steps if reached else None,
            }
        )
        saes[f"sae_{n}"] = trained.to(args.device)
        print("trained", n, json.dumps(curve[-1]["final"]), flush=True)
    return saes, curve


def run_key(args):
    """A short digest of the training settings (a checkpoint directory per setting)."""
    import hashlib

    keys = ("steps", "train_batch", "lr", "lr_decay", "k", "d_sae_factor", "dead_window",
            "init_b_dec", "eval_every", "eval_queries", "train_queries")  # fmt: skip
    text = json.dumps([getattr(args, k) for k in keys])
    return hashlib.sha1(text.encode()).hexdigest()[:10]


def cached_rows(cache, name, collect):
    """Activation rows from the fp16 cache ``cache/name.pt`` (collected and saved when absent),
    and the seconds collecting took (None when read from the cache)."""
    from mechir.features.source import load_rows, save_rows

    if cache is None:
        return timed(collect)
    path = cache / f"{name}.pt"
    if path.exists():
        return load_rows(path), None
    rows, seconds = timed(collect)
    cache.mkdir(parents=True, exist_ok=True)
    save_rows(rows, path)
    return rows, seconds


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train-queries", type=int, default=90)
    p.add_argument("--eval-queries", type=int, default=24)
    p.add_argument("--depth", type=int, default=20)
    p.add_argument("--max-length", type=int, default=160)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--collection-pairs", type=int, default=64)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--train-batch", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--lr-decay", type=float, default=0.2, help="fraction of steps decaying")
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--d-sae-factor", type=int, default=4)
    p.add_argument("--dead-window", type=int, default=None, help="steps (train_sae's default)")
    p.add_argument("--init-b-dec", default="mean", choices=("zeros", "mean"))
    p.add_argument("--eval-every", type=int, default=500)
    p.add_argument("--target-fvu", type=float, default=0.2)
    p.add_argument(
        "--curve", type=int, nargs="+", default=[4096, 16384, 65536, 262144],
        help="numbers of distinct training activations (the first rows: whole queries)",
    )  # fmt: skip
    p.add_argument("--timing-steps", type=int, default=40)
    p.add_argument("--top-features", type=int, default=50)
    p.add_argument("--attribution-pairs", type=int, default=8)
    p.add_argument("--threads", type=int, default=1, help="torch threads (model forwards)")
    p.add_argument("--cache", type=Path, default=None, help="fp16 activation cache directory")
    p.add_argument("--device", default="cpu", help="cpu or cuda (the model and the SAE)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/features_cpu.json")
    args = p.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    from mechir import load_cross_encoder
    from mechir.data import load_collection
    from mechir.features.attribution import (
        feature_ablation_effects,
        feature_attribution,
        node_means,
    )
    from mechir.features.fidelity import PCABaseline, fidelity_table
    from mechir.features.source import collect_activations
    from mechir.features.training import evaluate_sae

    name = default_model()
    model = load_cross_encoder(name, device=args.device)
    if SCIFACT.exists():
        train_col = load_collection(SCIFACT, split="train")
        eval_col = load_collection(SCIFACT, split="test")
        data = "shared SciFact: train split for training, test split held out"
    else:
        train_col = eval_col = load_collection("demo")
        data = "demo SciFact quick set split by query (no train split embedded)"
    train_q = train_col.query_ids(args.train_queries)
    held_q = [q for q in eval_col.query_ids() if q not in set(train_q)][: args.eval_queries]
    train_pairs = train_col.candidates(depth=args.depth, query_ids=train_q)
    eval_pairs = eval_col.candidates(depth=args.depth, query_ids=held_q)
    result = {
        "benchmark": "features",
        "device": args.device,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "model": name,
        "data": data,
        "site": SITE,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "gpu": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "not measured",
    }
    hf = hf_model(name).to(args.device)
    result["collection"] = collection_bench(
        model, hf, train_pairs[: args.collection_pairs], args.max_length, args.batch_size
    )
    print("collection", json.dumps(result["collection"]), flush=True)

    def collect(pairs):
        return collect_activations(
            model, pairs, SITE, pairs_per_forward=args.batch_size, max_length=args.max_length
        )

    key = f"{SITE}_d{args.depth}_l{args.max_length}"
    train, t_train = cached_rows(
        args.cache, f"train_{args.train_queries}q_{key}", lambda: collect(train_pairs)
    )
    held, t_held = cached_rows(
        args.cache, f"test_{args.eval_queries}q_{key}", lambda: collect(eval_pairs)
    )
    result["activations"] = {
        "train_pairs": len(train_pairs),
        "train_rows": len(train),
        "eval_pairs": len(eval_pairs),
        "eval_rows": len(held),
        "collect_seconds": None if t_train is None or t_held is None else t_train + t_held,
        "collect_rows_per_s": None if t_train is None else len(train) / t_train,
    }
    g = torch.Generator().manual_seed(0)
    eval_acts = held.acts[torch.randperm(len(held), generator=g)[:8192]]
    log_dir = Path("/tmp/mechir_bench_features")
    log_dir.mkdir(parents=True, exist_ok=True)
    result["step_time"] = step_time_bench(train.acts, eval_acts, args)
    print("step_time", json.dumps(result["step_time"]), flush=True)
    saes, curve = train_bench(train.acts, eval_acts, args, log_dir)
    result["training"] = curve

    largest = f"sae_{curve[-1]['training_activations']}"
    sae = saes[largest]
    l0 = evaluate_sae(sae, eval_acts)["l0"]
    pca = PCABaseline(train.acts, max(1, round(l0)), site=SITE)
    qrels = eval_col.qrels
    rows, t_fid = timed(lambda: fidelity_table(
        model, eval_pairs, {**saes, "pca": pca}, site=SITE, eval_acts=held.acts,
        mean=train.acts.mean(0), qrels=qrels, batch_size=args.batch_size,
        max_length=args.max_length))  # fmt: skip
    by_codec = {r["codec"]: r for r in rows}
    for point in curve:
        point["fidelity"] = by_codec[f"sae_{point['training_activations']}"]
    result["fidelity"] = {"rows": [by_codec[largest], by_codec["pca"]], "seconds": t_fid}
    sae_row, pca_row = by_codec[largest], by_codec["pca"]
    better = {
        "fvu": "lower",
        "score_fvu": "lower",
        "spearman": "higher",
        "kl_score": "higher",
        "kendall_tau": "higher",
        "top10_overlap": "higher",
    }
    result["fidelity"]["sae_better_than_pca"] = {
        k: (sae_row[k] < pca_row[k]) if way == "lower" else (sae_row[k] > pca_row[k])
        for k, way in better.items()
    }
    result["curve"] = [
        {"training_activations": c["training_activations"], "epochs": c["epochs"]}
        | {k: c["fidelity"][k] for k in ("fvu", "dead", "spearman", "kendall_tau",
                                         "kl_score", "ndcg10_change", "ndcg10_p")}
        for c in curve
    ]  # fmt: skip
    print("curve", json.dumps(result["curve"]), flush=True)
    print("fidelity", json.dumps(result["fidelity"]["rows"]), flush=True)

    rel = [eval_col.pair(q, d) for q in held_q for d in eval_col.relevant(q)
           if d in eval_col.docs][: args.attribution_pairs]  # fmt: skip
    batch = model.encode(
        [p.query for p in rel], [p.document for p in rel], max_length=args.max_length
    )
    atp, t_atp = timed(lambda: feature_attribution(model, batch, sae, method="atp"))
    top = atp.features.abs().sum(0).topk(args.top_features).indices.tolist()
    exact, t_exact = timed(lambda: feature_ablation_effects(model, batch, sae, top))
    est = atp.features[:, top]
    pearson = float(torch.corrcoef(torch.stack([est.flatten(), exact.flatten()]))[0, 1])
    fm, em = node_means(sae, train.acts[:20000])
    ig, t_ig = timed(
        lambda: feature_attribution(
            model, batch, sae, n_steps="auto", feature_baseline=fm, error_baseline=em
        )
    )
    result["attribution"] = {
        "pairs": len(rel), "top_features": len(top), "atp_vs_exact_pearson": pearson,
        "atp_seconds": t_atp, "exact_seconds": t_exact,
        "exact_over_atp_time": t_exact / t_atp,
        "ig_steps": ig.n_steps, "ig_seconds": t_ig,
        "ig_relative_completeness_error": ig.relative_completeness_error(),
        "ig_error_node_share": float((ig.error.abs() / ig.total.abs().clamp_min(1e-12)).mean()),
    }  # fmt: skip
    print("attribution", json.dumps(result["attribution"]), flush=True)
    result["load_average"] = {"before": load_before, "after": os.getloadavg()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(args.out)


if __name__ == "__main__":
    main()
