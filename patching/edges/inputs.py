"""Clean inputs, the source of patched contributions, and the lockstep runs that read them.

A source is one of:

* ``"token"``: a corrupted batch aligned token for token with the clean one (same width, parts,
  token types and attention mask: :class:`patching.AlignedPairs`, or any two batches that pass
  its checks);
* ``"part"``: a corrupted batch aligned *by part* (e.g. a swapped document of another length):
  at every point each sender's source contribution is its mean over the corrupted input's tokens
  of the same part, broadcast to the clean input's tokens of that part (every part a clean input
  has must have a token in its corrupted input);
* ``"mean"``: per part, the mean of each sender's contribution over every real token of that
  part in the clean batch (mean ablation; the same source for every pair);
* ``"zero"``: no contribution.

With ``"token"`` and ``"part"`` the corrupted rows run in the same batch as the rows that read
them (:class:`Lockstep`), so their contributions at each point are at hand without being stored
for the whole pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor

from mechir import distributed
from mechir.interface import HookedReranker
from mechir.parts import PARTS, CrossEncoderBatch
from patching.edges.engine import (
    N_PARTS,
    Point,
    PointHandler,
    cat_batches,
    embed,
    part_onehot,
    take_rows,
    tracked_walk,
)
from patching.perturbations import AlignedPairs

SourceKind = Literal["token", "part", "mean", "zero"]
Align = Literal["token", "part"]
CorruptedLike = CrossEncoderBatch | Literal["mean", "zero"] | None


@dataclass
class EdgeInputs:
    """Checked inputs of an edge computation (build with :func:`edge_inputs`).

    Attributes:
        clean: the clean batch (on the model's device).
        corrupted: the corrupted batch (``"token"``/``"part"``), else None.
        kind: the source kind (module doc).
        pair_ids, grades: per pair, from :class:`AlignedPairs` when given.
        means: ``"mean"``: per point, ``[S, 5, d]`` per-part mean contributions (filled by
            :func:`mean_contributions`).
    """

    clean: CrossEncoderBatch
    corrupted: CrossEncoderBatch | None
    kind: str
    pair_ids: list[str]
    grades: list[int | None]
    means: dict[Point, Tensor] | None = None

    def __len__(self) -> int:
        return len(self.clean)

    def pad_token_id(self, model: HookedReranker) -> int:
        return int(getattr(model.embed, "pad_token_id", 0) or 0)


def edge_inputs(
    model: HookedReranker,
    clean: CrossEncoderBatch | AlignedPairs,
    corrupted: CorruptedLike = None,
    *,
    align: Align = "token",
) -> EdgeInputs:
    """Check and gather the inputs of an edge computation (errors say what to pass)."""
    device = model.cfg.device
    pair_ids: list[str] | None = None
    grades: list[int | None] | None = None
    if isinstance(clean, AlignedPairs):
        pair_ids, grades = list(clean.pair_ids), list(clean.grades)
        if corrupted is None:
            corrupted = clean.corrupted
        clean = clean.clean
    if not isinstance(clean, CrossEncoderBatch):
        raise ValueError(
            f"clean must be a CrossEncoderBatch (model.encode(...)) or AlignedPairs, got "
            f"{type(clean).__name__}"
        )
    if len(clean) == 0:
        raise ValueError("no pairs given: pass at least one (query, document) pair")
    n = len(clean)
    pair_ids = pair_ids or [str(i) for i in range(n)]
    grades = grades or [None] * n
    clean = clean.to(device)
    if isinstance(corrupted, str):
        if corrupted not in ("mean", "zero"):
            raise ValueError(
                f"unknown corrupted={corrupted!r}: pass a corrupted batch (or AlignedPairs), "
                "'mean' or 'zero'"
            )
        return EdgeInputs(clean, None, corrupted, pair_ids, grades)
    if corrupted is None:
        raise ValueError(
            "no corrupted input: pass AlignedPairs, a corrupted batch aligned with the clean "
            "one, or corrupted='mean' / 'zero'"
        )
    if not isinstance(corrupted, CrossEncoderBatch):
        raise ValueError(
            f"corrupted must be a CrossEncoderBatch, 'mean' or 'zero', got "
            f"{type(corrupted).__name__}"
        )
    if len(corrupted) != n:
        raise ValueError(
            f"{n} clean pairs but {len(corrupted)} corrupted ones: pass one corrupted input per "
            "clean pair"
        )
    corrupted = corrupted.to(device)
    if align == "token":
        _check_token_aligned(clean, corrupted, pair_ids)
        return EdgeInputs(clean, corrupted, "token", pair_ids, grades)
    if align == "part":
        _check_part_aligned(clean, corrupted, pair_ids)
        return EdgeInputs(clean, corrupted, "part", pair_ids, grades)
    raise ValueError(f"unknown align={align!r}: use 'token' or 'part'")


def _check_token_aligned(
    clean: CrossEncoderBatch, corrupted: CrossEncoderBatch, pair_ids: list[str]
) -> None:
    if clean.input_ids.shape != corrupted.input_ids.shape:
        raise ValueError(
            f"clean batch {tuple(clean.input_ids.shape)} and corrupted batch "
            f"{tuple(corrupted.input_ids.shape)} differ in shape: they must align token for "
            "token (build them with PairBuilder), or pass align='part' to align them by part"
        )
    for name in ("parts", "token_type_ids", "attention_mask"):
        differs = (getattr(clean, name) != getattr(corrupted, name)).any(-1)
        if bool(differs.any()):
            bad = [pair_ids[i] for i in differs.nonzero()[:, 0].tolist()]
            raise ValueError(
                f"pairs {bad[:5]} are not aligned token for token: clean and corrupted {name} "
                "differ; build them with PairBuilder, or pass align='part' to align them by part"
            )


def _check_part_aligned(
    clean: CrossEncoderBatch, corrupted: CrossEncoderBatch, pair_ids: list[str]
) -> None:
    has_clean = torch.stack([(clean.parts == int(p)).any(-1) for p in PARTS], -1)
    has_corr = torch.stack([(corrupted.parts == int(p)).any(-1) for p in PARTS], -1)
    missing = (has_clean & ~has_corr).any(-1)
    if bool(missing.any()):
        i = int(missing.nonzero()[0, 0])
        names = [p.name.lower() for p, m in zip(PARTS, (has_clean & ~has_corr)[i]) if m]
        raise ValueError(
            f"pair {pair_ids[i]!r} cannot be aligned by part: its corrupted input has no "
            f"{', '.join(names)} token(s); every part of the clean input needs one"
        )


# ---------------------------------------------------------------------- the "mean" source
class _MeanHandler(PointHandler):
    """Accumulates per-part sums of every contribution at every point."""

    def __init__(self, onehot: Tensor, sums: dict[Point, Tensor], n_layers: int):
        self.onehot, self.sums, self.n_layers = onehot, sums, n_layers

    def _add(self, point: Point, c: Tensor) -> None:
        s = torch.einsum("rspd,rpk->skd", c, self.onehot).double()
        self.sums[point] = self.sums[point] + s if point in self.sums else s

    def pre(self, layer: int, contributions: Tensor) -> None:
        self._add(("pre", layer), contributions)

    def mid(self, layer: int, contributions: Tensor) -> None:
        self._add(("mid", layer), contributions)

    def final(self, contributions: Tensor) -> None:
        self._add(("final", self.n_layers), contributions)


def mean_contributions(model: HookedReranker, inputs: EdgeInputs, rows: int) -> dict[Point, Tensor]:
    """Per point, ``[S, 5, d]``: each sender's mean contribution over the real tokens of each part
    of the clean batch (walks over it in chunks of ``rows``; with a process group, each rank
    walks its share and the sums are all-reduced)."""
    sums: dict[Point, Tensor] = {}
    counts = torch.zeros(N_PARTS, dtype=torch.float64)
    n = len(inputs)
    mine = distributed.shard_indices(n) if distributed.sharding() else list(range(n))
    with torch.no_grad():
        for start in range(0, len(mine), rows):
            chunk = take_rows(inputs.clean, torch.tensor(mine[start : start + rows]))
            onehot = part_onehot(chunk.parts, N_PARTS)
            counts += onehot.sum((0, 1)).double().cpu()
            handler = _MeanHandler(onehot, sums, model.cfg.n_layers)
            tracked_walk(model, embed(model, chunk), chunk, handler)
    if distributed.sharding():
        counts = distributed.all_reduce_sum(counts)
        if not sums:  # a rank without pairs: zeros of the right shapes
            sums = _zero_sums(model, inputs)
        sums = {point: distributed.all_reduce_sum(v) for point, v in sorted(sums.items())}
    device = inputs.clean.device
    scale = counts.clamp(min=1).to(device)[None, :, None]
    return {point: (v / scale).to(model.cfg.dtype) for point, v in sums.items()}


def _zero_sums(model: HookedReranker, inputs: EdgeInputs) -> dict[Point, Tensor]:
    cfg = model.cfg
    out = {}
    for layer in range(cfg.n_layers):
        before = 1 + layer * (cfg.n_heads + 1)
        out[("pre", layer)] = torch.zeros(before, N_PARTS, cfg.d_model, dtype=torch.float64)
        mid = before + cfg.n_heads
        out[("mid", layer)] = torch.zeros(mid, N_PARTS, cfg.d_model, dtype=torch.float64)
    total = 1 + cfg.n_layers * (cfg.n_heads + 1)
    out[("final", cfg.n_layers)] = torch.zeros(total, N_PARTS, cfg.d_model, dtype=torch.float64)
    return {k: v.to(inputs.clean.device) for k, v in out.items()}


# ---------------------------------------------------------------------- lockstep runs
class Lockstep:
    """Current rows (each reading the source of one pair of a group) and the group's source rows,
    run as one batch: rows ``0..n-1`` are current, the rest are the source's.

    Contributions (``c``) are ``[rows, S, pos, d]`` (:class:`patching.edges.engine.
    Contributions`). The source's are never broadcast to every position when they are part
    means: products with them are taken per part.

    Args:
        inputs: the checked inputs.
        pairs: the group's pair indices.
        row_pair: ``[n]`` for every current row, its pair's position in ``pairs``.
    """

    def __init__(self, model: HookedReranker, inputs: EdgeInputs, pairs: Tensor, row_pair: Tensor):
        self.model, self.inputs = model, inputs
        self.kind = inputs.kind
        device = inputs.clean.device
        self.row_pair = row_pair.to(device)
        self.n = len(row_pair)
        self.m = len(pairs)
        self.identity = bool(torch.equal(row_pair.cpu(), torch.arange(len(pairs))))
        group = take_rows(inputs.clean, pairs)
        current = take_rows(group, row_pair)
        with torch.no_grad():
            x_clean = embed(model, group)
        x_current = x_clean[self.row_pair]
        self.current = current
        if self.kind in ("token", "part"):
            assert inputs.corrupted is not None
            source = take_rows(inputs.corrupted, pairs)
            pad = inputs.pad_token_id(model)
            self.rows = cat_batches([current, source], pad)
            width = self.rows.input_ids.shape[1]
            self.source_onehot = part_onehot(_pad_parts(source.parts, width), N_PARTS)
            with torch.no_grad():
                x_source = embed(model, source)
            self.x0 = torch.cat([_pad(x_current, width), _pad(x_source, width)])
            self.width = width
        else:
            self.rows, self.x0, self.width = current, x_current, current.input_ids.shape[1]
        #: ``[n, width]`` parts of the current rows (PAD beyond their own width)
        self.current_parts = _pad_parts(current.parts, self.width)
        self.onehot5 = part_onehot(self.current_parts, N_PARTS)

    # ------------------------------------------------------------------ the source
    def _source_rows(self, c: Tensor) -> Tensor:
        """Token source: each current row's source row, ``[n, S, pos, d]``."""
        src = c[self.n : self.n + self.m]
        return src if self.identity else src[self.row_pair]

    def _part_means(self, point: Point, c: Tensor) -> Tensor:
        """``"mean"``/``"part"``: ``[n, S, 5, d]`` per-part source contributions of each row."""
        s = c.shape[1]
        if self.kind == "mean":
            assert self.inputs.means is not None
            means = self.inputs.means[point][:s]
            return means[None].expand(self.n, *means.shape)
        src = c[self.n : self.n + self.m]
        counts = self.source_onehot.sum(1).clamp(min=1)  # [m, 5]
        means = torch.einsum("mspd,mpk->mskd", src, self.source_onehot) / counts[:, None, :, None]
        return means if self.identity else means[self.row_pair]

    def diffs(self, point: Point, c: Tensor) -> Float[Tensor, "n S pos d"]:
        """``source - current`` contribution of every sender, for every current row."""
        cur = c[: self.n]
        if self.kind == "token":
            return self._source_rows(c) - cur
        if self.kind == "zero":
            return -cur
        means = self._part_means(point, c)
        return torch.einsum("nskd,npk->nspd", means, self.onehot5) - cur

    def source_x0(self) -> Float[Tensor, "n pos d"]:
        """The source's embedding output for the current rows (the far end of EAP-IG's path)."""
        c = self.x0[:, None]
        return (self.diffs(("pre", 0), c) + c[: self.n])[:, 0]

    # ------------------------------------------------------------------ products
    def apply_masks(self, point: Point, c: Tensor, masks: Tensor) -> Float[Tensor, "n pos J d"]:
        """``sum_s masks[n, j, s, k] (source - current)_s`` on the positions of part ``k`` (every
        position when ``K`` = 1), summed over ``k``: the deltas of ``J`` receivers."""
        n, s, pos, d = self.n, c.shape[1], c.shape[2], c.shape[3]
        j, k = masks.shape[1], masks.shape[3]
        m = masks.to(c.dtype)
        flat = m.permute(0, 1, 3, 2).reshape(n, j * k, s)
        out = -torch.bmm(flat, c[:n].reshape(n, s, pos * d))  # [n, J*K, pos*d]
        if self.kind == "token":
            src = c[self.n : self.n + self.m]
            for pair in range(self.m):
                rows = (self.row_pair == pair).nonzero()[:, 0]
                if len(rows):
                    prod = flat[rows].reshape(-1, s) @ src[pair].reshape(s, pos * d)
                    out[rows] += prod.view(len(rows), j * k, pos * d)
        out = out.view(n, j, k, pos, d)
        if k == 1:
            delta = out[:, :, 0]
        else:
            delta = torch.einsum("njkpd,npk->njpd", out, self.onehot5)
        if self.kind in ("mean", "part"):
            means = self._part_means(point, c)
            if k == 1:
                t = torch.einsum("njs,nsqd->njqd", m[..., 0], means)
            else:
                t = torch.einsum("njsk,nskd->njkd", m, means)
            delta = delta + torch.einsum("njqd,npq->njpd", t, self.onehot5)
        return delta.permute(0, 2, 1, 3)

    def dot_grads(
        self, point: Point, c: Tensor, grads: Float[Tensor, "n pos J d"], n_parts: int
    ) -> Float[Tensor, "n J S K"]:
        """``sum_{pos in part k, d} (source - current)_s . grads_j`` for every receiver ``j``,
        sender ``s`` and part ``k`` (``n_parts`` 1: every position)."""
        n, s, pos, d = self.n, c.shape[1], c.shape[2], c.shape[3]
        j = grads.shape[2]
        if n_parts == 1:
            g = grads.permute(0, 2, 1, 3).reshape(n, j, pos * d)
        else:
            g = torch.einsum("npjd,npk->njkpd", grads, self.onehot5).reshape(n, j * n_parts, -1)
        g_t = g.transpose(1, 2)
        out = -torch.bmm(c[:n].reshape(n, s, pos * d), g_t)  # [n, S, J*K]
        if self.kind == "token":
            src = self._source_rows(c)
            out += torch.bmm(src.reshape(n, s, pos * d), g_t)
        elif self.kind in ("mean", "part"):
            means = self._part_means(point, c)
            g_part = torch.einsum("npjd,npq->njqd", grads, self.onehot5)
            if n_parts == 1:
                out += torch.einsum("nsqd,njqd->nsj", means, g_part)
            else:
                out += torch.einsum("nskd,njkd->nsjk", means, g_part).reshape(n, s, -1)
        return out.view(n, s, j, n_parts).permute(0, 2, 1, 3)


def _pad(x: Tensor, width: int) -> Tensor:
    if x.shape[1] == width:
        return x
    return torch.cat([x, x.new_zeros(x.shape[0], width - x.shape[1], *x.shape[2:])], dim=1)


def _pad_parts(parts: Int[Tensor, "n pos"], width: int) -> Int[Tensor, "n width"]:
    if parts.shape[1] >= width:
        return parts[:, :width]
    extra = parts.new_full((parts.shape[0], width - parts.shape[1]), N_PARTS)
    return torch.cat([parts, extra], dim=1)


__all__ = [
    "Align",
    "CorruptedLike",
    "EdgeInputs",
    "Lockstep",
    "SourceKind",
    "edge_inputs",
    "mean_contributions",
]
