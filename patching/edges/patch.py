"""Exact edge patching: any set of edges at once, and every single edge.

:func:`patch_edge_sets` runs one tracked forward (:mod:`patching.edges.engine`) per (pair, edge
set) row, many rows per batch, with the source rows in the same batch (:class:`Lockstep`):
the score of each pair when exactly the edges of the set read their sender's source
contribution. :func:`patch_edges` is the one-set case.

:func:`single_edge_scores` is the fast path for every edge alone (the "exact" method of
:func:`patching.edges.edge_attribution` and the reference ranking of the benchmark): with one
patched edge, everything before its receiver is the clean run, so its receiver reads the clean
input plus one fixed difference ``c_s(source) - c_s(clean)`` (both known from one tracked walk of
the clean and source rows), and the rest is a plain forward from the receiver's block. Rows join
at their receiver's block; score-receiver rows only run the score head. Both paths are checked
against each other and against :func:`patching.edges.reference.patch_edges_reference` (plain
model hooks, one forward per edge set) in ``tests/patching/test_edges.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from mechir.interface import HookedReranker
from mechir.parts import CrossEncoderBatch
from mechir.running import refuse_active_hooks
from patching.edges.engine import (
    Point,
    PointHandler,
    Slots,
    part_onehot,
    plain_forward,
    plain_layer,
    plain_score,
    take_rows,
    tracked_walk,
)
from patching.edges.graph import EdgeGraph, EdgesLike, edge_graph, receivers_at
from patching.edges.inputs import (
    Align,
    CorruptedLike,
    EdgeInputs,
    Lockstep,
    edge_inputs,
    mean_contributions,
)
from patching.perturbations import AlignedPairs
from patching.sweep import DEFAULT_MEMORY_BUDGET, check_batch_size, rows_per_chunk


# ---------------------------------------------------------------------- sizing
def tracked_rows(
    model: HookedReranker, width: int, memory_budget: float = DEFAULT_MEMORY_BUDGET
) -> int:
    """Rows of a tracked walk that fit ``memory_budget`` bytes (a rough, conservative estimate):
    per position about ``6 S d_model`` values for the contributions, their source and
    difference and the LayerNorm temporaries (``S`` = every sender), ``6 n_heads d_model`` for the
    per-head inputs, and the attention scores."""
    cfg = model.cfg
    senders = 1 + cfg.n_layers * (cfg.n_heads + 1)
    per_row = width * (
        6 * senders * cfg.d_model
        + 6 * cfg.n_heads * cfg.d_model
        + 4 * cfg.n_heads * width
        + 6 * cfg.d_mlp
    )
    per_row *= torch.finfo(cfg.dtype).bits // 8
    return max(1, int(memory_budget // per_row))


def check_graph(
    model: HookedReranker, graph: EdgeGraph | None, *, parts: bool = False
) -> EdgeGraph:
    """``graph``, or the model's, checked against the model's shape."""
    if graph is None:
        return edge_graph(model, parts=parts)
    cfg = model.cfg
    if (graph.n_layers, graph.n_heads) != (cfg.n_layers, cfg.n_heads):
        raise ValueError(
            f"the edge graph is for {graph.n_layers} layers x {graph.n_heads} heads but the model "
            f"has {cfg.n_layers} x {cfg.n_heads}: build it with edge_graph(model)"
        )
    return graph


def prepare_inputs(
    model: HookedReranker,
    clean: CrossEncoderBatch | AlignedPairs | EdgeInputs,
    corrupted: CorruptedLike,
    align: Align,
    rows: int,
) -> EdgeInputs:
    """:func:`edge_inputs`, with the per-part means of the ``"mean"`` source computed."""
    inputs = (
        clean
        if isinstance(clean, EdgeInputs)
        else edge_inputs(model, clean, corrupted, align=align)
    )
    if inputs.kind == "mean" and inputs.means is None:
        inputs.means = mean_contributions(model, inputs, rows)
    return inputs


# ---------------------------------------------------------------------- edge sets
class PatchHandler(PointHandler):
    """Adds ``sum_{s patched} (source - current)`` to every receiver's input, per row's mask."""

    def __init__(self, graph: EdgeGraph, lock: Lockstep, masks: Tensor, n_rows: int):
        self.graph, self.lock, self.masks, self.n_rows = graph, lock, masks, n_rows
        self.at: dict[Point, list[int]] = {}
        for i, r in enumerate(graph.receivers):
            self.at.setdefault(r.point, []).append(i)

    def _delta(self, point: Point, contributions: Tensor) -> Tensor | None:
        recv = self.at[point]
        mask = self.masks[:, recv, : contributions.shape[1]]  # [n, J, S, K]
        if not bool(mask.any()):
            return None
        return self.lock.apply_masks(point, contributions, mask)  # [n, pos, J, d]

    def pre(self, layer: int, contributions: Tensor) -> Tensor | None:
        d = self._delta(("pre", layer), contributions)
        return None if d is None else d.unflatten(2, (3, self.graph.n_heads))

    def mid(self, layer: int, contributions: Tensor) -> Tensor | None:
        d = self._delta(("mid", layer), contributions)
        return None if d is None else d[:, :, 0]

    def final(self, contributions: Tensor) -> Tensor | None:
        d = self._delta(("final", self.graph.n_layers), contributions)
        return None if d is None else d[:, :, 0]


def edge_set_masks(graph: EdgeGraph, sets: Any) -> Bool[Tensor, "set receiver sender part"]:
    """``[set, receiver, sender, part]`` masks from a list of edge sets (anything
    :meth:`EdgeGraph.edge_ids` takes), ``[set, edge]`` boolean masks, or masks already."""
    if isinstance(sets, Tensor):
        if sets.dtype != torch.bool:
            raise ValueError("edge-set masks must be boolean tensors")
        if sets.dim() == 2 and sets.shape[1] == graph.n_edges:
            out = torch.zeros(len(sets), *graph.valid.shape, dtype=torch.bool)
            out[:, graph.edge_receiver, graph.edge_sender, graph.edge_part] = sets
            return out
        if sets.dim() == 4 and sets.shape[1:] == graph.valid.shape:
            if bool((sets & ~graph.valid).any()):
                raise ValueError("an edge-set mask marks a (receiver, sender) that is no edge")
            return sets
        raise ValueError(
            f"edge-set masks need shape [sets, {graph.n_edges}] or [sets, "
            f"{', '.join(map(str, graph.valid.shape))}], got {tuple(sets.shape)}"
        )
    return graph.masks(list(sets))


def patch_edge_sets(
    model: HookedReranker,
    clean: CrossEncoderBatch | AlignedPairs | EdgeInputs,
    corrupted: CorruptedLike = None,
    sets: Sequence[EdgesLike] | Tensor = ("all",),
    *,
    graph: EdgeGraph | None = None,
    align: Align = "token",
    batch_size: int | None = None,
    memory_budget: float = DEFAULT_MEMORY_BUDGET,
) -> Float[Tensor, "pair set"]:
    """Exact scores of every pair with each edge set patched (module doc of
    :mod:`patching.edges.engine` for what "patched" means).

    Args:
        clean, corrupted: :class:`AlignedPairs` (corrupted taken from them unless given), or a
            clean batch with a corrupted batch (aligned token for token, or by part with
            ``align="part"``), or ``corrupted="mean"`` / ``"zero"``.
        sets: edge sets: each ``"all"``, a list of labels (``"2/5->3/7.q"``) or indices, or a
            ``[edges]`` boolean mask; or a ``[set, edge]`` boolean tensor.
        graph: the edge graph (default ``edge_graph(model)``; ``parts=True`` for part edges).
        batch_size: rows (pair x set) per forward; default from ``memory_budget`` bytes.

    Returns:
        ``[pair, set]`` float32 scores on the CPU.
    """
    refuse_active_hooks(model, "patch_edge_sets")
    graph = check_graph(model, graph)
    check_batch_size(batch_size)
    width = (clean.clean if not isinstance(clean, CrossEncoderBatch) else clean).input_ids.shape[1]
    rows = batch_size or tracked_rows(model, width, memory_budget)
    inputs = prepare_inputs(model, clean, corrupted, align, rows)
    masks = edge_set_masks(graph, sets).to(inputs.clean.device)
    n, n_sets = len(inputs), len(masks)
    out = torch.empty(n, n_sets)
    pair_of = torch.arange(n).repeat_interleave(n_sets)
    set_of = torch.arange(n_sets).repeat(n)
    with torch.no_grad():
        for lo in range(0, n * n_sets, rows):
            p_rows, s_rows = pair_of[lo : lo + rows], set_of[lo : lo + rows]
            pairs, row_pair = torch.unique(p_rows, return_inverse=True)
            lock = Lockstep(model, inputs, pairs, row_pair)
            handler = PatchHandler(graph, lock, masks[s_rows.to(masks.device)], len(lock.rows))
            scores = tracked_walk(model, lock.x0, lock.rows, handler)
            out[p_rows, s_rows] = scores[: lock.n].float().cpu()
    return out


def patch_edges(
    model: HookedReranker,
    clean: CrossEncoderBatch | AlignedPairs | EdgeInputs,
    corrupted: CorruptedLike = None,
    edges: EdgesLike = "all",
    *,
    graph: EdgeGraph | None = None,
    align: Align = "token",
    batch_size: int | None = None,
    memory_budget: float = DEFAULT_MEMORY_BUDGET,
) -> Float[Tensor, " pair"]:
    """Exact scores with ``edges`` patched: each edge's receiver reads its sender's source
    contribution instead of the current one; everything downstream is recomputed (LayerNorm
    statistics included). ``edges="all"`` gives the corrupted run's scores and ``[]`` the clean
    run's (to float round-off: see :mod:`patching.edges.engine`).

    ``patch_edges(model, pairs, edges=["input->score"])``; arguments as
    :func:`patch_edge_sets`. Returns ``[pair]`` float32 scores on the CPU.
    """
    refuse_active_hooks(model, "patch_edges")
    return patch_edge_sets(
        model, clean, corrupted, [edges], graph=graph, align=align, batch_size=batch_size,
        memory_budget=memory_budget,
    )[:, 0]  # fmt: skip


# ---------------------------------------------------------------------- every single edge
class _SingleEdges(PointHandler):
    """Runs, at each receiver point of a tracked walk of the clean and source rows, every single
    edge into that point's receivers as its own row (module doc)."""

    def __init__(
        self,
        model: HookedReranker,
        graph: EdgeGraph,
        lock: Lockstep,
        out: Tensor,
        rows: int,
        bar: Any,
    ):
        self.model, self.graph, self.lock, self.out, self.rows, self.bar = (
            model, graph, lock, out, rows, bar,
        )  # fmt: skip
        self.onehot = part_onehot(lock.current_parts, graph.n_parts)
        self.batch = take_rows(lock.rows, torch.arange(lock.n))
        self.offsets = torch.cat(
            [torch.zeros(1, dtype=torch.long), (graph.reach * graph.n_parts).cumsum(0)]
        )

    def pre(self, layer: int, contributions: Tensor) -> None:
        self.x_pre = contributions[: self.lock.n].sum(1)
        self.d_pre = self.lock.diffs(("pre", layer), contributions)

    def mid(self, layer: int, contributions: Tensor) -> None:
        d_mid = self.lock.diffs(("mid", layer), contributions)
        g, n_heads, k_parts = self.graph, self.graph.n_heads, self.graph.n_parts
        recv = receivers_at(g, ("pre", layer)) + receivers_at(g, ("mid", layer))
        rows = self._rows(recv)
        device = d_mid.device
        mlp_receiver = recv[-1]
        for lo in range(0, len(rows[0]), self.rows):
            i, r, s, k = (t[lo : lo + self.rows].to(device) for t in rows)
            is_mlp = r == mlp_receiver
            source = torch.where(
                is_mlp[:, None, None],
                d_mid[i, s.clamp(max=d_mid.shape[1] - 1)],
                self.d_pre[i, s.clamp(max=self.d_pre.shape[1] - 1)],
            )
            delta = source * self.onehot[i, :, k][..., None] if k_parts > 1 else source
            qkv = (~is_mlp).nonzero()[:, 0]
            j = r[qkv] - recv[0]
            slots = Slots(qkv, j // n_heads, j % n_heads, delta[qkv])
            mlp_delta = (
                torch.where(is_mlp[:, None, None], delta, 0.0) if bool(is_mlp.any()) else None
            )
            x = self.x_pre[i]

            def first(x: Tensor, additive: Tensor, slots=slots, mlp_delta=mlp_delta) -> Tensor:
                return plain_layer(self.model, layer, x, additive, slots=slots, mlp_delta=mlp_delta)

            scores = plain_forward(
                self.model, x, take_rows(self.batch, i), start=layer, first_layer=first
            )
            self._write(i, r, s, k, scores)

    def final(self, contributions: Tensor) -> None:
        g = self.graph
        x = contributions[: self.lock.n].sum(1)
        d = self.lock.diffs(("final", g.n_layers), contributions)
        rows = self._rows(receivers_at(g, ("final", g.n_layers)))
        for lo in range(0, len(rows[0]), self.rows):
            i, r, s, k = (t[lo : lo + self.rows].to(d.device) for t in rows)
            delta = d[i, s] * self.onehot[i, :, k][..., None] if g.n_parts > 1 else d[i, s]
            scores = plain_score(self.model, x[i], take_rows(self.batch, i), delta=delta)
            self._write(i, r, s, k, scores)

    def _rows(self, recv: list[int]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(pair, receiver, sender, part) of every single-edge row into ``recv``."""
        g = self.graph
        r_t = torch.tensor(recv)
        per = g.reach[r_t] * g.n_parts
        r = r_t.repeat_interleave(per)
        starts = torch.cat([torch.zeros(1, dtype=torch.long), per.cumsum(0)[:-1]])
        within = torch.arange(int(per.sum())) - starts.repeat_interleave(per)
        s, k = within // g.n_parts, within % g.n_parts
        n = self.lock.n
        i = torch.arange(n).repeat_interleave(len(r))
        return i, r.repeat(n), s.repeat(n), k.repeat(n)

    def _write(self, i: Tensor, r: Tensor, s: Tensor, k: Tensor, scores: Tensor) -> None:
        i, r, s, k = i.cpu(), r.cpu(), s.cpu(), k.cpu()
        edge = self.offsets[r] + s * self.graph.n_parts + k
        self.out[i, edge] = scores.float().cpu()
        if self.bar is not None:
            self.bar.update(len(i))


def single_edge_scores(
    model: HookedReranker,
    clean: CrossEncoderBatch | AlignedPairs | EdgeInputs,
    corrupted: CorruptedLike = None,
    *,
    graph: EdgeGraph | None = None,
    align: Align = "token",
    batch_size: int | None = None,
    memory_budget: float = DEFAULT_MEMORY_BUDGET,
    pairs_per_walk: int = 1,
    progress: bool = False,
) -> Float[Tensor, "pair edge"]:
    """Exact score of every pair with each single edge patched (``[pair, edge]``, edge order of
    ``graph``): the naive per-edge loop's values, batched (module doc)."""
    refuse_active_hooks(model, "single_edge_scores")
    graph = check_graph(model, graph)
    check_batch_size(batch_size)
    width = (clean.clean if not isinstance(clean, CrossEncoderBatch) else clean).input_ids.shape[1]
    rows = batch_size or rows_per_chunk(model, width, memory_budget)
    inputs = prepare_inputs(model, clean, corrupted, align, tracked_rows(model, width))
    n = len(inputs)
    out = torch.full((n, graph.n_edges), float("nan"))
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n * graph.n_edges, desc="single edges", unit="edge")
    with torch.no_grad():
        for lo in range(0, n, pairs_per_walk):
            pairs = torch.arange(lo, min(lo + pairs_per_walk, n))
            lock = Lockstep(model, inputs, pairs, torch.arange(len(pairs)))
            handler = _SingleEdges(model, graph, lock, out[lo : lo + len(pairs)], rows, bar)
            tracked_walk(model, lock.x0, lock.rows, handler)
    if bar is not None:
        bar.close()
    return out


__all__ = [
    "PatchHandler",
    "check_graph",
    "edge_set_masks",
    "patch_edge_sets",
    "patch_edges",
    "prepare_inputs",
    "single_edge_scores",
    "tracked_rows",
]
