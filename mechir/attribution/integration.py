"""Integration rules for path attributions, as data: nodes (alphas), weights and cells.

Every path attribution approximates an integral over the path parameter ``alpha`` in [0, 1],

    integral_0^1 f(alpha) d alpha  ~=  sum_k w_k f(alpha_k),

and every implementation in :mod:`mechir.attribution` (batched kernel, naive reference) takes its
``alphas`` and ``weights`` from one :class:`IntegrationRule`. A rule also partitions [0, 1] into
``n_steps`` cells ``[b_{k-1}, b_k]`` of width ``w_k`` that contain their node ``alpha_k``; neuron
conductance uses them to turn activation *differences* into the weighted derivative
``w_k * da/d alpha (alpha_k)`` (see :mod:`mechir.attribution.conductance`).

| method            | nodes alpha_k (k = 1..m) | weights          | node's place in its cell |
| ----------------- | ------------------------ | ---------------- | ------------------------ |
| riemann_left      | (k-1)/m                  | 1/m              | left end                 |
| riemann_right     | k/m                      | 1/m              | right end                |
| riemann_middle    | (k-1/2)/m                | 1/m              | middle                   |
| riemann_trapezoid | (k-1)/(m-1)              | 1/(m-1), ends /2 | ends, then middles       |
| gauss_legendre    | GL nodes on [0, 1]       | GL weights / 2   | inside                   |

Gauss-Legendre nodes separate their cumulative weights (the Chebyshev-Markov-Stieltjes
inequalities), so its cells contain their nodes too.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

METHODS: tuple[str, ...] = (
    "riemann_left",
    "riemann_right",
    "riemann_middle",
    "riemann_trapezoid",
    "gauss_legendre",
)
_ALIASES = {"left": "riemann_left", "right": "riemann_right", "middle": "riemann_middle"}
_ALIASES |= {"trapezoid": "riemann_trapezoid", "gausslegendre": "gauss_legendre"}
_ALIASES |= {"gl": "gauss_legendre"}


@dataclass(frozen=True)
class IntegrationRule:
    """A quadrature rule on [0, 1] (float64 tensors on the CPU).

    Attributes:
        method: one of :data:`METHODS`.
        alphas: ascending nodes ``alpha_k``.
        weights: ``w_k``, summing to 1.
        breakpoints: ``b_0 = 0 <= b_1 <= ... <= b_m = 1`` with ``b_k - b_{k-1} = w_k`` and
            ``b_{k-1} <= alpha_k <= b_k``.
    """

    method: str
    alphas: Float[Tensor, " n_steps"]
    weights: Float[Tensor, " n_steps"]
    breakpoints: Float[Tensor, " n_steps_plus_1"]

    @property
    def n_steps(self) -> int:
        return len(self.alphas)

    def integrate(self, values: Float[Tensor, "n_steps ..."]) -> Float[Tensor, "..."]:
        """``sum_k w_k values[k]`` (in the dtype of ``values``)."""
        w = self.weights.to(values).view(-1, *([1] * (values.dim() - 1)))
        return (w * values).sum(0)

    def points(
        self,
    ) -> tuple[Float[Tensor, " n_points"], Int[Tensor, " n_steps"], Int[Tensor, " n_steps_plus_1"]]:
        """The distinct evaluation points (nodes and breakpoints, ascending) and where each node
        and each breakpoint sits among them: ``(points, node_index, breakpoint_index)``."""
        both = torch.cat([self.alphas, self.breakpoints])
        points = torch.unique(both)  # sorted; nodes and breakpoints are built to coincide exactly
        node_index = torch.searchsorted(points, self.alphas)
        break_index = torch.searchsorted(points, self.breakpoints)
        return points, node_index, break_index


def parse_method(method: str) -> str:
    """Canonical method name (aliases: ``left``, ``right``, ``middle``, ``trapezoid``, ``gl``)."""
    key = str(method).strip().lower().replace("-", "_")
    key = _ALIASES.get(key, key)
    if key not in METHODS:
        raise ValueError(f"unknown integration method {method!r}: choose one of {METHODS}")
    return key


def integration_rule(method: str = "riemann_right", n_steps: int = 50) -> IntegrationRule:
    """The nodes, weights and cells of ``method`` with ``n_steps`` nodes.

    >>> integration_rule("riemann_right", 4).alphas.tolist()
    [0.25, 0.5, 0.75, 1.0]
    """
    method = parse_method(method)
    if isinstance(n_steps, bool) or not isinstance(n_steps, int) or n_steps < 1:
        raise ValueError(f"n_steps must be a positive int, got {n_steps!r}")
    m = n_steps
    dt = torch.float64
    grid = torch.arange(m + 1, dtype=dt) / m
    if method == "riemann_left":
        alphas, weights, breaks = grid[:-1], torch.full((m,), 1 / m, dtype=dt), grid
    elif method == "riemann_right":
        alphas, weights, breaks = grid[1:], torch.full((m,), 1 / m, dtype=dt), grid
    elif method == "riemann_middle":
        alphas = (torch.arange(m, dtype=dt) + 0.5) / m
        weights, breaks = torch.full((m,), 1 / m, dtype=dt), grid
    elif method == "riemann_trapezoid":
        if m < 2:
            raise ValueError("riemann_trapezoid needs n_steps >= 2 (both end points are nodes)")
        alphas = torch.arange(m, dtype=dt) / (m - 1)
        weights = torch.full((m,), 1 / (m - 1), dtype=dt)
        weights[0] = weights[-1] = 0.5 / (m - 1)
        inner = (torch.arange(1, m, dtype=dt) - 0.5) / (m - 1)
        breaks = torch.cat([torch.zeros(1, dtype=dt), inner, torch.ones(1, dtype=dt)])
    else:
        x, w = np.polynomial.legendre.leggauss(m)
        alphas = torch.from_numpy((x + 1) / 2)
        weights = torch.from_numpy(w / 2)
        breaks = torch.cat([torch.zeros(1, dtype=dt), torch.cumsum(weights, 0)])
        breaks[-1] = 1.0
    return IntegrationRule(method, alphas.contiguous(), weights.contiguous(), breaks.contiguous())
