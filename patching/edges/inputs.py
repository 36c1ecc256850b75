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
from typing import Any, Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor

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

    def pad_token_id(self, model: Any) -> int:
        return int(getattr(model.embed, "pad_token_id", 0) or 0)


def edge_inputs(
    model: Any,
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
        s = torch.einsum("srpd,rpk->skd", c.double(), self.onehot.double())
        self.sums[point] = self.sums[point] + s if point in self.sums else s

    def pre(self, layer: int, contributions: Tensor) -> None:
        self._add(("pre", layer), contributions)

    def mid(self, layer: int, contributions: Tensor) -> None:
        self._add(("mid", layer), contributions)

    def final(self, contributions: Tensor) -> None:
        self._add(("final", self.n_layers), contributions)


def mean_contributions(model: Any, inputs: EdgeInputs, rows: int) -> dict[Point, Tensor]:
    """Per point, ``[S, 5, d]``: each sender's mean contribution over the real tokens of each part
    of the clean batch (walks over it in chunks of ``rows``)."""
    sums: dict[Point, Tensor] = {}
    counts = torch.zeros(N_PARTS, dtype=torch.float64)
    with torch.no_grad():
        for start in range(0, len(inputs), rows):
            chunk = inputs.clean[start : start + rows]
            onehot = part_onehot(chunk.parts, N_PARTS)
            counts += onehot.sum((0, 1)).double().cpu()
            handler = _MeanHandler(onehot, sums, model.cfg.n_layers)
            tracked_walk(model, embed(model, chunk), chunk, handler)
    scale = counts.clamp(min=1).to(next(iter(sums.values())).device)[None, :, None]
    dtype = model.cfg.dtype
    return {point: (s / scale).to(dtype) for point, s in sums.items()}


# ---------------------------------------------------------------------- lockstep runs
class Lockstep:
    """Current rows (each reading the source of one pair of a group) and the group's source rows,
    run as one batch: rows ``0..n-1`` are current, the rest are the source's.

    Args:
        inputs: the checked inputs.
        pairs: the group's pair indices.
        row_pair: ``[n]`` for every current row, its pair's position in ``pairs``.
    """

    def __init__(self, model: Any, inputs: EdgeInputs, pairs: Tensor, row_pair: Tensor):
        self.model, self.inputs = model, inputs
        self.kind = inputs.kind
        device = inputs.clean.device
        self.row_pair = row_pair.to(device)
        self.n = len(row_pair)
        group = take_rows(inputs.clean, pairs)
        current = take_rows(group, row_pair)
        x_clean = embed(model, group)
        x_current = x_clean[self.row_pair]
        self.current = current
        if self.kind in ("token", "part"):
            assert inputs.corrupted is not None
            source = take_rows(inputs.corrupted, pairs)
            self.source_parts = source.parts
            pad = inputs.pad_token_id(model)
            self.rows = cat_batches([current, source], pad)
            width = self.rows.input_ids.shape[1]
            x_source = embed(model, source)
            self.x0 = torch.cat([_pad(x_current, width), _pad(x_source, width)])
            self.width = width
        else:
            self.rows, self.x0, self.width = current, x_current, current.input_ids.shape[1]
        #: ``[n, width]`` parts of the current rows (PAD beyond their own width)
        self.current_parts = _pad_parts(current.parts, self.width)
        self.onehot5 = part_onehot(self.current_parts, N_PARTS)

    def source_at(self, point: Point, contributions: Tensor) -> Float[Tensor, "S n pos d"]:
        """Every sender's source contribution at ``point`` for the current rows."""
        n = self.n
        if self.kind == "token":
            return contributions[:, n:][:, self.row_pair]
        if self.kind == "zero":
            return torch.zeros_like(contributions[:, :n])
        if self.kind == "mean":
            assert self.inputs.means is not None
            means = self.inputs.means[point][: contributions.shape[0]]
            return torch.einsum("skd,npk->snpd", means, self.onehot5)
        src = contributions[:, n:]
        onehot = part_onehot(_pad_parts(self.source_parts, src.shape[2]), N_PARTS)
        counts = onehot.sum(1).clamp(min=1)  # [m, 5]
        means = torch.einsum("smpd,mpk->smkd", src, onehot) / counts[None, :, :, None]
        return torch.einsum("snkd,npk->snpd", means[:, self.row_pair], self.onehot5)

    def source_x0(self) -> Float[Tensor, "n pos d"]:
        """The source's embedding output for the current rows (the far end of EAP-IG's path)."""
        n = self.n
        if self.kind == "token":
            return self.x0[n:][self.row_pair]
        return self.source_at(("pre", 0), self.x0[None])[0]


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
