"""Running mechir under ``torchrun``: process-group state, sharding and gathering.

A plain ``python`` run has no process group: every function here then describes a world of one
process (rank 0 of 1), :func:`sharding` is False and the library runs exactly as before. A world
of one behaves the same with and without a process group: the gathering functions make the
same checks (rows per rank, picklable objects) and return the same fresh copies. Under
``torchrun`` (or any launcher that sets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``),
:func:`init_from_env` starts the group (gloo on CPU, nccl with ``cuda:{LOCAL_RANK}`` on CUDA) and
library calls (:func:`mechir.evaluation.score_pairs`, :func:`~mechir.evaluation.rerank`,
:func:`mechir.attribution.accumulate.mean_neuron_attributions`, :func:`patching.patch_sweep`)
split their pairs across the ranks and return the same result on every rank.

Sharding is strided: rank ``r`` of ``w`` takes items ``r, r + w, r + 2w, ...`` (balanced when
the input is sorted by length or cost); :func:`gather_in_order` puts the pieces back in input
order. Inside ``with local():`` library calls do not shard (the studies use it when each rank
works on its own units).
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime
import os
import pickle
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import torch
from jaxtyping import Shaped
from torch import Tensor

T = TypeVar("T")

_LOCAL: contextvars.ContextVar[bool] = contextvars.ContextVar("mechir_local", default=False)


# ---------------------------------------------------------------------- state
def _dist() -> Any:
    """``torch.distributed`` when it is usable and initialised, else None."""
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def is_initialized() -> bool:
    """Whether a torch.distributed process group is initialised."""
    return _dist() is not None


def rank() -> int:
    """This process's global rank (0 without a process group)."""
    d = _dist()
    return d.get_rank() if d is not None else 0


def world_size() -> int:
    """Number of processes in the group (1 without a process group)."""
    d = _dist()
    return d.get_world_size() if d is not None else 1


def local_rank() -> int:
    """This process's rank on its node (``LOCAL_RANK`` set by torchrun; 0 otherwise)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """True on rank 0 (and in every single-process run)."""
    return rank() == 0


def launched() -> bool:
    """Whether the environment comes from a distributed launcher (torchrun sets ``RANK`` and
    ``WORLD_SIZE``)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def sharding() -> bool:
    """Whether library calls split their work across ranks now: a group of more than one
    process is initialised and we are not inside :func:`local`."""
    return world_size() > 1 and not _LOCAL.get()


@contextlib.contextmanager
def local() -> Iterator[None]:
    """Library calls inside run on this rank's inputs only (no sharding, no collectives)."""
    token = _LOCAL.set(True)
    try:
        yield
    finally:
        _LOCAL.reset(token)


def init_from_env(
    device: str | torch.device | None = None,
    *,
    backend: str | None = None,
    timeout_s: float = 3600.0,
) -> torch.device | None:
    """Start the process group from torchrun's environment; return this rank's device.

    Without a launcher's environment nothing is started and ``device`` is returned as given
    (None: the caller's default). Under a launcher: ``device=None`` picks ``cuda:{LOCAL_RANK}``
    when CUDA is available, else the CPU; a bare ``"cuda"`` becomes ``cuda:{LOCAL_RANK}``. The
    backend is nccl for CUDA devices and gloo otherwise, unless ``backend`` says.
    Calling it again returns the device without re-initialising.

    Raises:
        ValueError: ``RANK`` and ``WORLD_SIZE`` are set but ``MASTER_ADDR`` or ``MASTER_PORT``
            is not (the group cannot meet), or a local rank has no GPU.
    """
    if not launched():
        return None if device is None else torch.device(device)
    missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(v)]
    if missing and not is_initialized():
        raise ValueError(
            f"RANK and WORLD_SIZE are set but {' and '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not: start the run with torchrun (it sets "
            "them all), set them, or unset RANK and WORLD_SIZE to run as one process"
        )
    lr = local_rank()
    if device is None:
        dev = torch.device(f"cuda:{lr}" if torch.cuda.is_available() else "cpu")
    else:
        dev = torch.device(device)
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device(f"cuda:{lr}")
    if dev.type == "cuda":
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(
                f"local rank {lr} wants {dev} but this node has {torch.cuda.device_count()} "
                "GPU(s); start at most that many processes per node (--nproc_per_node)"
            )
        torch.cuda.set_device(dev)
    if not is_initialized():
        import torch.distributed as dist

        dist.init_process_group(
            backend or ("nccl" if dev.type == "cuda" else "gloo"),
            timeout=datetime.timedelta(seconds=timeout_s),
        )
    return dev


def barrier() -> None:
    """Wait for every rank (no-op without a process group)."""
    d = _dist()
    if d is not None:
        d.barrier()


# ---------------------------------------------------------------------- sharding
def shard_indices(n: int, *, rank_: int | None = None, world: int | None = None) -> list[int]:
    """The indices of ``n`` items this rank works on: ``rank, rank + world, ...``."""
    r = rank() if rank_ is None else rank_
    w = world_size() if world is None else world
    if not 0 <= r < w:
        raise ValueError(f"rank {r} out of range for a world of {w} process(es)")
    return list(range(r, n, w))


def shard(items: Sequence[T]) -> list[T]:
    """This rank's share of ``items`` (see :func:`shard_indices`)."""
    return [items[i] for i in shard_indices(len(items))]


def _comm_device() -> torch.device:
    """Where collective tensors must live: the current CUDA device for nccl, else the CPU."""
    d = _dist()
    if d is not None and d.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_gather_objects(obj: T) -> list[T]:
    """Every rank's ``obj`` (picklable), in rank order, unpickled copies (without a process
    group too: ``[copy of obj]``, so an object that cannot be pickled fails alike)."""
    d = _dist()
    if d is None:
        return [pickle.loads(pickle.dumps(obj))]
    out: list[Any] = [None] * d.get_world_size()
    d.all_gather_object(out, obj)
    return out


def all_gather_tensors(tensor: Shaped[Tensor, "n ..."] | None) -> list[Tensor]:
    """Every rank's tensor (lengths along dim 0 may differ; ``None`` = no rows, shape taken from
    another rank), in rank order, on the CPU, as new tensors. Padded to the longest and
    all-gathered; without a process group ``[copy of tensor]`` (``[torch.empty(0)]`` for None,
    as a group whose ranks all have no rows gives)."""
    d = _dist()
    if d is None:
        return [torch.empty(0) if tensor is None else tensor.detach().cpu().clone()]
    meta = (None, None) if tensor is None else (tuple(tensor.shape), tensor.dtype)
    metas = all_gather_objects(meta)
    known = [m for m in metas if m[0] is not None]
    if not known:
        return [torch.empty(0) for _ in metas]
    tail, dtype = known[0][0][1:], known[0][1]
    for shape, dt in known:
        if shape[1:] != tail or dt != dtype:
            raise ValueError(
                f"ranks gather tensors of different trailing shapes or dtypes: {shape[1:]} "
                f"{dt} vs {tail} {dtype}"
            )
    sizes = [0 if m[0] is None else m[0][0] for m in metas]
    longest = max(max(sizes), 1)
    device = _comm_device()
    mine = torch.zeros((longest, *tail), dtype=dtype, device=device)
    if tensor is not None and len(tensor):
        mine[: len(tensor)] = tensor.detach().to(device)
    parts = [torch.empty_like(mine) for _ in sizes]
    d.all_gather(parts, mine)
    return [p[:s].cpu() for p, s in zip(parts, sizes)]


def gather_in_order(local_part: Shaped[Tensor, "k ..."] | None, n: int) -> Shaped[Tensor, "n ..."]:
    """Reassemble the per-rank results of a strided shard (:func:`shard_indices`) of ``n``
    items in input order: ``out[r + i * world] = part_r[i]`` (a new CPU tensor; with or
    without a process group).

    Raises:
        ValueError: a rank's part does not have one row per item of its shard.
    """
    parts = all_gather_tensors(local_part)
    w = len(parts)
    out = torch.empty((n, *parts[0].shape[1:]), dtype=parts[0].dtype)
    for r, part in enumerate(parts):
        expected = len(range(r, n, w))
        if len(part) != expected:
            raise ValueError(f"rank {r} returned {len(part)} rows for its {expected} items")
        if expected:
            out[r::w] = part
    return out


def map_sharded(fn: Callable[[list[T]], Tensor], items: Sequence[T]) -> Tensor:
    """``fn(items)`` computed as ``fn`` over each rank's share (run under :func:`local`), the
    ``[len(share), ...]`` results gathered in input order on every rank. ``fn`` must return one
    row per item, independently of the other items."""
    mine = shard(items)
    with local():
        out = fn(mine) if mine else None
    return gather_in_order(out, len(items))


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """The sum of ``tensor`` over ranks (a new, detached tensor on ``tensor``'s device; a copy
    of it in a world of one, with or without a process group)."""
    d = _dist()
    if d is None:
        return tensor.detach().clone()
    buf = tensor.detach().to(_comm_device(), copy=True)
    d.all_reduce(buf)
    return buf.to(tensor.device)


# ---------------------------------------------------------------------- progress and logs
class _ScaledBar:
    """A tqdm bar on rank 0 that counts rank 0's progress times the world size (the shards are
    balanced, so this estimates the aggregate); nothing on the other ranks."""

    def __init__(self, total: int, desc: str, unit: str, disable: bool, **kwargs: Any):
        from tqdm.auto import tqdm

        self.scale = world_size() if sharding() else 1
        self.total = total
        self.bar = tqdm(
            total=total, desc=desc, unit=unit, disable=disable or not is_main(), **kwargs
        )

    def update(self, n: int = 1) -> None:
        left = self.total - self.bar.n
        self.bar.update(min(n * self.scale, left))

    def set_postfix_str(self, text: str, refresh: bool = True) -> None:
        self.bar.set_postfix_str(text, refresh=refresh)

    def close(self) -> None:
        self.bar.close()

    def __enter__(self) -> _ScaledBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def progress_bar(
    total: int, *, desc: str = "", unit: str = "it", disable: bool = False, **kwargs: Any
) -> _ScaledBar:
    """One progress bar for the whole job, shown on rank 0 only (see :class:`_ScaledBar`)."""
    return _ScaledBar(total, desc, unit, disable, **kwargs)


def prefix() -> str:
    """``"[rank r/w] "`` under a process group of several ranks, else ``""``."""
    w = world_size()
    return f"[rank {rank()}/{w}] " if w > 1 else ""


def log(message: str, *, main_only: bool = False, file: Any = None) -> None:
    """Print ``message`` (to stderr) prefixed with the rank; ``main_only``: on rank 0 only."""
    if main_only and not is_main():
        return
    print(prefix() + message, file=file or sys.stderr, flush=True)


__all__ = [
    "all_gather_objects",
    "all_gather_tensors",
    "all_reduce_sum",
    "barrier",
    "gather_in_order",
    "init_from_env",
    "is_initialized",
    "is_main",
    "launched",
    "local",
    "local_rank",
    "log",
    "map_sharded",
    "prefix",
    "progress_bar",
    "rank",
    "shard",
    "shard_indices",
    "sharding",
    "world_size",
]
