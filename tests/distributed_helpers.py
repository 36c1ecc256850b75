"""Helpers of the multi-process tests: free ports, spawning a gloo group of CPU processes, and
the library computations whose 2-process results must equal the single-process ones."""

from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from tests.helpers import DOCUMENTS, QUERIES, WORDS, tiny_hf_model, tiny_tokenizer


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_env(rank: int, world: int, port: int) -> dict[str, str]:
    """The variables torchrun sets for one process of a single-node run."""
    return {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "RANK": str(rank),
        "WORLD_SIZE": str(world),
        "LOCAL_RANK": str(rank),
        "LOCAL_WORLD_SIZE": str(world),
        "OMP_NUM_THREADS": "1",
    }


def library_inputs(tmp: Path, device: str = "cpu") -> tuple[Any, list, Any]:
    """``(model, pairs, aligned)``: a tiny cross-encoder, 11 random pairs of 5 queries and 4
    aligned TFC1 pairs (the same on every process: fixed seeds)."""
    from mechir import load_cross_encoder
    from mechir.data import Pair
    from patching import AlignedPairs, PairBuilder

    tok = tiny_tokenizer(tmp)
    model = load_cross_encoder(tiny_hf_model(0), tokenizer=tok, device=device)
    rng = random.Random(0)
    pairs = [
        Pair(
            f"q{i % 5}",
            f"d{i}",
            " ".join(rng.choices(WORDS, k=3)),
            " ".join(rng.choices(WORDS, k=rng.randint(3, 20))),
        )
        for i in range(11)
    ]
    builder = PairBuilder(tok, max_length=64, choose="first")
    built = [
        builder.tfc1(q, d, pair_id=f"p{i}", grade=g)
        for i, (q, d, g) in enumerate(zip(QUERIES, DOCUMENTS, [0, 1, 0, 2]))
    ]
    return model, pairs, AlignedPairs.from_pairs(built, tok)


def library_results(model: Any, pairs: list, aligned: Any) -> dict[str, Any]:
    """``score_pairs``, ``rerank``, NIG means and two patching sweeps (sharded when a process
    group is initialised)."""
    from mechir.attribution import mean_neuron_attributions, pair_batches
    from mechir.evaluation import rerank, score_pairs
    from patching import head_target, patch_sweep, resid_target

    out: dict[str, Any] = {
        "scores": score_pairs(model, pairs, batch_size=3, progress=False),
        "run": rerank(model, pairs, batch_size=4, progress=False),
    }
    groups = {"q0": "b", "q1": "a", "q2": "b", "q3": "b", "q4": "c"}
    means = mean_neuron_attributions(
        model,
        pair_batches(model, pairs, group_of=lambda p: groups[p.qid], batch_size=2, max_length=64),
        n_steps=3,
        path="activation",
    )
    out["nig"] = {
        "keys": means.means.keys(),
        "counts": means.means.counts,
        "layers": means.layers,
        "means": {k: means.mean(k) for k in means.means.keys()},
        "std": {k: means.means[k].std for k in means.means.keys()},
        "completeness": means.completeness.mean,
        "completeness_count": means.completeness.count,
    }
    for name, target in (
        ("heads_by_position", head_target(by="position")),
        ("resid_by_part", resid_target(by="part")),
    ):
        r = patch_sweep(model, aligned, target, batch_size=7)
        out[name] = {
            "patched": r.patched,
            "clean": r.clean,
            "corrupted": r.corrupted,
            "coords": r.coords,
            "pair_ids": r.pair_ids,
        }
    return out


def library_worker(rank: int, world: int, port: int, out_dir: str, device: str = "cpu") -> None:
    """One process of the group: initialise from torchrun's variables, compute, save."""
    os.environ.update(torchrun_env(rank, world, port))
    torch.set_num_threads(1)
    from mechir import distributed

    device = distributed.init_from_env(device)
    assert distributed.is_initialized() and distributed.world_size() == world
    with tempfile.TemporaryDirectory() as tmp:
        model, pairs, aligned = library_inputs(Path(tmp), str(device))
        results = library_results(model, pairs, aligned)
    results["device"] = str(device)
    results["rank"] = distributed.rank()
    results["objects"] = distributed.all_gather_objects({"rank": rank})
    results["uneven"] = distributed.gather_in_order(
        torch.tensor([float(i) for i in distributed.shard_indices(5)]).reshape(-1, 1) * 10, 5
    )
    one = distributed.shard_indices(1)  # rank 1 has nothing to contribute
    results["one"] = distributed.gather_in_order(torch.ones(1, 2) if one else None, 1)
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    import torch.distributed as dist

    dist.destroy_process_group()


ROOT = Path(__file__).resolve().parents[1]


def torchrun(nproc: int, module: str, argv: list[str]) -> subprocess.Popen:
    """``torchrun --standalone --nproc_per_node nproc -m module argv`` from the project root,
    one thread per process (stdout and stderr piped)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            "-m",
            module,
            *argv,
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def rank_pid(launcher: subprocess.Popen, rank: int) -> int | None:
    """The PID of the worker of ``rank`` started by a torchrun process (None before it runs)."""
    import psutil

    for child in psutil.Process(launcher.pid).children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank):
                return child.pid
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return None


def kill_rank_when_stored(
    launcher: subprocess.Popen, shard: Path, lines: int, *, rank: int = 1, timeout: float = 300
) -> int | None:
    """SIGKILL the worker of ``rank`` as soon as its ``shard`` holds ``lines`` lines (polled);
    its PID, or None when the run ended (or ``timeout`` passed) first."""
    import signal
    import time

    deadline = time.monotonic() + timeout
    while launcher.poll() is None and time.monotonic() < deadline:
        if shard.exists() and shard.read_bytes().count(b"\n") >= lines:
            pid = rank_pid(launcher, rank)
            assert pid is not None, f"no worker of rank {rank} under torchrun {launcher.pid}"
            os.kill(pid, signal.SIGKILL)
            return pid
        time.sleep(0.005)
    return None
