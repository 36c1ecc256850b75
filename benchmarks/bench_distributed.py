"""Data-parallel scaling with torch.distributed: one rerank and one NIG mean on 1, 2, ... processes.

For each process count the script spawns a process group (gloo on the CPU with one thread per
process; nccl with one GPU per process for ``--device cuda``), loads the shared cross-encoder on
every rank and times, between barriers (model loading and process start-up excluded):

- ``score_pairs`` over the SciFact quick set (50 queries x BM25 top-20 = 1,000 pairs), sharded
  across the ranks and gathered in input order; nDCG@10 of the resulting run;
- ``mean_neuron_attributions`` (input-path NIG, all layers) over 16 pairs x 16 steps, sharded by
  batch and all-reduced.

Results of every process count are compared with the single-process ones (max absolute
difference). Writes ``benchmarks/results/distributed_<device>.json``.

    python benchmarks/bench_distributed.py [--procs 1,2] [--pairs 1000] [--nig-pairs 16]
    python benchmarks/bench_distributed.py --device cuda --procs 1,2,4,8   # one GPU per process
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp
from assets import SCIFACT, SHARED_MODEL  # benchmarks/ is on the path of a script run

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(rank: int, world: int, port: int, cfg: dict[str, Any], out: str) -> None:
    """One rank: initialise from torchrun-style variables, time the two jobs between barriers."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(cfg["threads"])
    from mechir import distributed, load_cross_encoder
    from mechir.attribution import mean_neuron_attributions, pair_batches
    from mechir.data import load_collection
    from mechir.evaluation import evaluate, score_pairs

    device = distributed.init_from_env(cfg["device"])
    dtype = getattr(torch, cfg["dtype"])
    model = load_cross_encoder(cfg["model"], device=device, dtype=dtype)
    col = load_collection(SCIFACT, split="quick")
    pairs = col.candidates(depth=20)[: cfg["pairs"]]
    nig_pairs = pairs[: cfg["nig_pairs"]]
    result: dict[str, Any] = {"device": str(device)}

    distributed.barrier()
    start = time.perf_counter()
    scores = score_pairs(model, pairs, batch_size=cfg["batch_size"], max_length=160, progress=False)
    distributed.barrier()
    result["rerank_seconds"] = time.perf_counter() - start

    start = time.perf_counter()
    means = mean_neuron_attributions(
        model,
        pair_batches(model, nig_pairs, batch_size=cfg["nig_batch"], max_length=160),
        n_steps=cfg["nig_steps"],
    )
    distributed.barrier()
    result["nig_seconds"] = time.perf_counter() - start
    if distributed.is_main():
        run: dict[str, dict[str, float]] = {}
        for p, s in zip(pairs, scores.tolist()):
            run.setdefault(p.qid, {})[p.docid] = s
        result["ndcg10"] = evaluate(run, col.qrels).aggregate["nDCG@10"]
        result["scores"] = scores
        result["nig_mean"] = means.mean("all")
        result["nig_count"] = means.count("all")
        torch.save(result, out)
    if distributed.is_initialized():
        import torch.distributed as dist

        dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(SHARED_MODEL))
    ap.add_argument("--procs", default="1,2", help="process counts, e.g. 1,2 or 1,2,4,8")
    ap.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (nccl, a GPU per rank)")
    ap.add_argument("--dtype", default="float32", help="float32 or bfloat16")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--pairs", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--nig-pairs", type=int, default=16)
    ap.add_argument("--nig-steps", type=int, default=16)
    ap.add_argument("--nig-batch", type=int, default=2, help="pairs per NIG call (the shard unit)")
    ap.add_argument("--repeats", type=int, default=1, help="interleaved runs; fastest kept")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    procs = [int(p) for p in args.procs.split(",")]
    if procs[0] != 1:
        procs = [1, *procs]  # the single-process run is the reference
    if args.device.startswith("cuda") and max(procs) > torch.cuda.device_count():
        raise SystemExit(
            f"{max(procs)} processes need {max(procs)} GPUs; found {torch.cuda.device_count()}"
        )
    cfg = {
        "model": args.model,
        "device": args.device,
        "dtype": args.dtype,
        "threads": args.threads,
        "pairs": args.pairs,
        "batch_size": args.batch_size,
        "nig_pairs": args.nig_pairs,
        "nig_steps": args.nig_steps,
        "nig_batch": args.nig_batch,
    }
    load_before = os.getloadavg()
    runs: dict[int, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):  # interleaved: 1, 2, 1, 2, ...; fastest kept
            for n in procs:
                out = str(Path(tmp) / f"world{n}.pt")
                wall = time.perf_counter()
                mp.spawn(worker, args=(n, _free_port(), cfg, out), nprocs=n, join=True)
                r = torch.load(out, weights_only=False)
                r["wall_seconds_with_startup"] = time.perf_counter() - wall
                print(
                    f"repeat {repeat}, {n} process(es): rerank {r['rerank_seconds']:.1f} s, "
                    f"NIG {r['nig_seconds']:.1f} s",
                    flush=True,
                )
                if n in runs:
                    r["all_rerank_seconds"] = runs[n]["all_rerank_seconds"] + [r["rerank_seconds"]]
                    r["all_nig_seconds"] = runs[n]["all_nig_seconds"] + [r["nig_seconds"]]
                    r["rerank_seconds"] = min(r["all_rerank_seconds"])
                    r["nig_seconds"] = min(r["all_nig_seconds"])
                else:
                    r["all_rerank_seconds"] = [r["rerank_seconds"]]
                    r["all_nig_seconds"] = [r["nig_seconds"]]
                runs[n] = r
    ref = runs[1]
    table = []
    for n, r in runs.items():
        table.append(
            {
                "processes": n,
                "rerank_seconds": round(r["rerank_seconds"], 2),
                "rerank_pairs_per_second": round(args.pairs / r["rerank_seconds"], 2),
                "rerank_speedup": round(ref["rerank_seconds"] / r["rerank_seconds"], 3),
                "nig_seconds": round(r["nig_seconds"], 2),
                "nig_speedup": round(ref["nig_seconds"] / r["nig_seconds"], 3),
                "all_rerank_seconds": [round(x, 2) for x in r["all_rerank_seconds"]],
                "all_nig_seconds": [round(x, 2) for x in r["all_nig_seconds"]],
                "wall_seconds_with_startup": round(r["wall_seconds_with_startup"], 1),
                "ndcg10": r["ndcg10"],
                "max_abs_score_diff_vs_1": float((r["scores"] - ref["scores"]).abs().max()),
                "max_abs_nig_mean_diff_vs_1": float((r["nig_mean"] - ref["nig_mean"]).abs().max()),
                "nig_pairs_counted": r["nig_count"],
            }
        )
    device = "cpu" if args.device == "cpu" else "cuda"
    record = {
        "benchmark": "torch.distributed data parallel (score_pairs and NIG mean)",
        "model": args.model,
        "device": args.device,
        "gpu": torch.cuda.get_device_name(0) if device == "cuda" else "not used",
        "dtype": args.dtype,
        "cpu": platform.machine(),
        "cores": os.cpu_count(),
        "threads_per_process": args.threads,
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "pairs": args.pairs,
        "batch_size": args.batch_size,
        "max_length": 160,
        "nig": {
            "pairs": args.nig_pairs,
            "steps": args.nig_steps,
            "path": "input",
            "pairs_per_call": args.nig_batch,
        },
        "timing": "between barriers after model loading; process start-up excluded; "
        f"fastest of {args.repeats} interleaved repeats",
        "runs": table,
    }
    path = Path(args.out or ROOT / "benchmarks" / "results" / f"distributed_{device}.json")
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(table, indent=2))
    print(path)


if __name__ == "__main__":
    main()
