"""Streaming means of per-example attributions, so that thousands of pairs never sit in memory.

:class:`StreamingMean` keeps float64 running sums (count, sum, sum of squares) of per-example
tensors; :class:`GroupedMeans` keeps one per group (e.g. relevant / non-relevant pairs, or one
per dataset); :func:`mean_neuron_attributions` feeds neuron attributions into them batch by
batch, together with the completeness of every call.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor

from mechir.attribution.common import DEFAULT_MAX_STEPS
from mechir.attribution.nig import (
    ActivationBaseline,
    Aggregate,
    NeuronSite,
    PathFamily,
    neuron_integrated_gradients,
)
from mechir.attribution.targets import AttributionTarget
from mechir.display import fields_repr
from mechir.interface import HookedReranker
from mechir.models.hooked import HooksArg
from mechir.parts import CrossEncoderBatch


class StreamingMean:
    """Mean, standard deviation and count of tensors seen one batch at a time.

    ``update(values)`` adds ``values[b]`` for every ``b``; the result is exactly
    ``mean = sum_b values[b] / count`` (float64 sums, float32 results).
    """

    def __init__(self) -> None:
        self.count = 0
        self._sum: Tensor | None = None
        self._sumsq: Tensor | None = None

    def update(self, values: Float[Tensor, "batch ..."]) -> None:
        """Add every row of ``values`` (its first dimension indexes examples)."""
        v = values.detach().to("cpu", torch.float64)
        if v.dim() == 0:
            raise ValueError("values need a leading example dimension: pass values[None]")
        if self._sum is not None and v.shape[1:] != self._sum.shape:
            raise ValueError(
                f"shape {tuple(v.shape[1:])} differs from the running {tuple(self._sum.shape)}"
            )
        s, sq = v.sum(0), (v * v).sum(0)
        self._sum = s if self._sum is None else self._sum + s
        self._sumsq = sq if self._sumsq is None else self._sumsq + sq
        self.count += v.shape[0]

    def merge(self, other: StreamingMean) -> StreamingMean:
        """Add another accumulator's examples to this one (returns self)."""
        if other.count:
            if self._sum is None:
                self._sum, self._sumsq = other._sum.clone(), other._sumsq.clone()
            else:
                self._sum, self._sumsq = self._sum + other._sum, self._sumsq + other._sumsq
            self.count += other.count
        return self

    def _check(self) -> None:
        if self.count == 0:
            raise ValueError("no values accumulated yet")

    @property
    def sum(self) -> Tensor:
        self._check()
        return self._sum.float()

    @property
    def mean(self) -> Tensor:
        self._check()
        return (self._sum / self.count).float()

    @property
    def std(self) -> Tensor:
        """Sample standard deviation (``n - 1``; zero for a single example)."""
        self._check()
        if self.count < 2:
            return torch.zeros_like(self._sum, dtype=torch.float32)
        mean = self._sum / self.count
        var = (self._sumsq - self.count * mean * mean) / (self.count - 1)
        return var.clamp_min(0).sqrt().float()


@dataclass(repr=False)
class GroupedMeans:
    """One :class:`StreamingMean` per group key (insertion order kept)."""

    groups: dict[Hashable, StreamingMean] = field(default_factory=dict)

    def update(self, values: Float[Tensor, "batch ..."], keys: Sequence[Hashable]) -> None:
        """Add ``values[b]`` to the group ``keys[b]``."""
        if len(keys) != values.shape[0]:
            raise ValueError(f"got {len(keys)} group keys for {values.shape[0]} examples")
        for key in dict.fromkeys(keys):
            index = [i for i, k in enumerate(keys) if k == key]
            self.groups.setdefault(key, StreamingMean()).update(values[index])

    def __getitem__(self, key: Hashable) -> StreamingMean:
        return self.groups[key]

    def __contains__(self, key: Hashable) -> bool:
        return key in self.groups

    def keys(self) -> list[Hashable]:
        return list(self.groups)

    @property
    def counts(self) -> dict[Hashable, int]:
        return {k: m.count for k, m in self.groups.items()}


@dataclass(repr=False)
class AttributionMeans:
    """Mean neuron attributions per group, with the completeness seen along the way.

    Attributes:
        means: per group, the mean of ``NeuronAttributions.attributions`` over its examples.
        layers: the model layer of each layer row.
        completeness: ``|completeness|`` per example (``[layer]``; input path: the embedding's,
            ``[1]``), accumulated over all groups.
        settings: the arguments of the attribution calls.
        error: per example, the estimated relative error of its attributions
            (``NeuronAttributions.relative_error``, ``[1]``); empty without an estimate.
        overlap: per example, the top-``overlap_percent`` % selection overlap between the two
            resolutions of the estimate (``NeuronAttributions.selection_overlap``, ``[1]``).
        points: per example, the path points evaluated (``[1]``).
    """

    means: GroupedMeans
    layers: list[int]
    completeness: StreamingMean
    settings: dict[str, Any]
    error: StreamingMean = field(default_factory=StreamingMean)
    overlap: StreamingMean = field(default_factory=StreamingMean)
    points: StreamingMean = field(default_factory=StreamingMean)

    def mean(self, group: Hashable) -> Tensor:
        return self.means[group].mean

    def count(self, group: Hashable) -> int:
        return self.means[group].count


def mean_neuron_attributions(
    model: HookedReranker,
    batches: Iterable[tuple[CrossEncoderBatch, Sequence[Hashable]] | CrossEncoderBatch],
    *,
    overlap_percent: float = 0.5,
    path: PathFamily = "input",
    layers: int | Sequence[int] | None = None,
    neurons: NeuronSite = "post",
    target: AttributionTarget | str = "score",
    baseline: str | CrossEncoderBatch = "pad",
    activation_baseline: ActivationBaseline = "zero",
    method: str | None = None,
    n_steps: int | Literal["auto"] = 50,
    rtol: float = 0.01,
    max_steps: int = DEFAULT_MAX_STEPS,
    error_estimate: bool = True,
    aggregate: Aggregate = "sequence",
    max_batch: int | None = None,
    memory_budget: int | None = None,
    autocast: torch.dtype | None = None,
    hooks: HooksArg = None,
) -> AttributionMeans:
    """Stream :func:`neuron_integrated_gradients` over ``batches`` and average per group.

    ``batches`` yields a :class:`CrossEncoderBatch` (group ``"all"``) or ``(batch, keys)`` with
    one group key per example (e.g. ``"relevant"`` / ``"non_relevant"``). The other arguments
    are those of :func:`neuron_integrated_gradients` (same meaning, same defaults); only running
    sums are kept, among them the error estimate and the top-``overlap_percent`` % selection
    stability of every example.

    Under a process group of several ranks (:mod:`mechir.distributed`), rank ``r`` attributes
    batches ``r, r + world, ...`` and the sums and counts are all-reduced: every rank returns the
    means over all batches (equal to a single process's up to float64 summation order).
    """
    from mechir import distributed

    settings = dict(
        path=path, layers=layers, neurons=neurons, target=target, baseline=baseline,
        activation_baseline=activation_baseline, method=method, n_steps=n_steps, rtol=rtol,
        max_steps=max_steps, error_estimate=error_estimate, aggregate=aggregate,
        max_batch=max_batch, memory_budget=memory_budget, autocast=autocast, hooks=hooks,
    )  # fmt: skip
    means = GroupedMeans()
    completeness = StreamingMean()
    error, overlap, points = StreamingMean(), StreamingMean(), StreamingMean()
    layers: list[int] | None = None
    first_seen: dict[Hashable, tuple[int, int]] = {}
    sharded = distributed.sharding()
    for i, item in enumerate(batches):
        if sharded and i % distributed.world_size() != distributed.rank():
            continue
        batch, keys = item if isinstance(item, tuple) else (item, ["all"] * len(item))
        for j, key in enumerate(keys):
            first_seen.setdefault(key, (i, j))
        result = neuron_integrated_gradients(model, batch, **settings)
        layers = result.layers
        means.update(result.attributions, list(keys))
        delta = (
            result.embedding_completeness[:, None]
            if result.embedding_completeness is not None
            else result.completeness
        )
        completeness.update(delta.abs())
        if result.error is not None:
            error.update(result.relative_error()[:, None])
            overlap.update(result.selection_overlap(overlap_percent)[:, None])
        points.update(result.n_points[:, None].float())
    if sharded:
        singles = {"completeness": completeness, "error": error, "overlap": overlap, "p": points}
        means, reduced, layers = _reduce_across_ranks(means, singles, layers, first_seen)
        completeness, error, overlap, points = reduced.values()
    if layers is None:
        raise ValueError("no batches to attribute")
    return AttributionMeans(means, layers, completeness, settings, error, overlap, points)


def _reduce_across_ranks(
    means: GroupedMeans,
    singles: dict[str, StreamingMean],
    layers: list[int] | None,
    first_seen: dict[Hashable, tuple[int, int]],
) -> tuple[GroupedMeans, dict[str, StreamingMean], list[int] | None]:
    """All-reduce every group's (and every single accumulator's) count, sum and sum of squares;
    groups ordered by their first example over all batches (a single process's order)."""
    from mechir import distributed

    local = [(first_seen[k], k, tuple(m._sum.shape)) for k, m in means.groups.items() if m.count]
    shapes = {k: None if m._sum is None else tuple(m._sum.shape) for k, m in singles.items()}
    gathered = distributed.all_gather_objects({"layers": layers, "groups": local, **shapes})
    layers = next((g["layers"] for g in gathered if g["layers"] is not None), None)
    first: dict[Hashable, tuple[tuple[int, int], tuple[int, ...]]] = {}
    for g in gathered:
        for pos, key, shape in g["groups"]:
            if key not in first or pos < first[key][0]:
                first[key] = (pos, shape)
    reduced = GroupedMeans()
    for key in sorted(first, key=lambda k: first[k][0]):
        shape = first[key][1]
        reduced.groups[key] = _reduced(means.groups.get(key, StreamingMean()), shape)
    totals = {}
    for name, mean in singles.items():
        shape = next((g[name] for g in gathered if g[name] is not None), None)
        totals[name] = _reduced(mean, shape) if shape is not None else StreamingMean()
    return reduced, totals, layers


def _reduced(mean: StreamingMean, shape: tuple[int, ...]) -> StreamingMean:
    """``mean`` summed over ranks (one all-reduce of ``[count, sum, sumsq]`` in float64)."""
    from mechir import distributed

    size = int(torch.tensor(shape).prod()) if shape else 1
    packed = torch.zeros(1 + 2 * size, dtype=torch.float64)
    if mean.count:
        packed[0] = mean.count
        packed[1 : 1 + size] = mean._sum.reshape(-1)
        packed[1 + size :] = mean._sumsq.reshape(-1)
    packed = distributed.all_reduce_sum(packed)
    out = StreamingMean()
    out.count = int(packed[0].item())
    out._sum = packed[1 : 1 + size].reshape(shape).clone()
    out._sumsq = packed[1 + size :].reshape(shape).clone()
    return out


def pair_batches(
    model: HookedReranker,
    pairs: Sequence[Any],
    *,
    group_of: Callable[[Any], Hashable] | None = None,
    batch_size: int = 4,
    max_length: int | None = None,
) -> Iterable[tuple[CrossEncoderBatch, list[Hashable]]]:
    """``(batch, group keys)`` over :class:`mechir.data.Pair` s, encoded lazily ``batch_size`` at a
    time (for :func:`mean_neuron_attributions`); ``group_of(pair)`` gives the key (default
    ``"all"``)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        batch = model.encode(
            [p.query for p in chunk], [p.document for p in chunk], max_length=max_length
        )
        yield batch, [group_of(p) if group_of else "all" for p in chunk]


GroupedMeans.__repr__ = fields_repr  # type: ignore[method-assign]


AttributionMeans.__repr__ = fields_repr  # type: ignore[method-assign]
