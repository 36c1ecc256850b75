"""The result of a neuron attribution: attributions, the scores that check them, and an estimate
of their own numerical error.

**Error estimate.** Every call evaluates the path at two nested resolutions and reports, per
example and layer, ``error[b, l] ~= max_i |A_i - A_i(exact)|`` over the per-neuron attributions
(summed over positions) of layer ``l``:

* fixed rule with ``n_steps = m``: ``error = c * max_i |A_i(m) - A_i(m/2)|`` where ``A(m/2)`` is
  the same rule at half the steps (free for the Riemann rules with an even ``m``: their points are
  a subset). For a rule of order ``p`` the asymptotic value is ``c = 1/(2^p - 1)``; we take twice
  that for the first-order rules (``riemann_right``/``riemann_left``: ``c = 2``) and ``c = 1`` for
  the others (midpoint cells are second order, but the activation path reaches that regime late),
  a safety margin measured in ``tests/attribution/test_result.py``;
* ``n_steps="auto"``, input path: ``|A(m) - A(m/2)|``, the change of the nested midpoint sum at
  the last doubling, and the reported value is ``A(m)``. Once second-order convergence sets in
  the error of ``A(m)`` is a third of this (so the estimate is conservative); before that, on the
  shared model at 160 tokens, Richardson extrapolation of ``A`` was 5-14x *less* accurate than
  ``A(m)`` itself, so none is applied (``benchmarks/README.md``, time to accuracy);
* ``n_steps="auto"``, activation path: ``|R(N) - R(N/2)|`` for Romberg's first extrapolation
  ``R`` of the nested trapezoid sums (Simpson's rule), with no division either.

The estimate is asymptotic: at very few steps (``m <= 4``) it can miss the true error.

``coarse`` keeps the coarser resolution's per-neuron attributions, so that the stability of a
top-p% selection between the two resolutions can be read off (:meth:`selection_overlap`).
Completeness cannot play this role on the input path: an FFN layer is not a cut of the network
(the residual stream bypasses it), so ``unexplained`` is not expected to vanish there.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from mechir.attribution.common import AttributionSetup, check_finite
from mechir.attribution.neuron_selection import SIGNS, n_selected
from mechir.attribution.targets import AttributionTarget
from mechir.display import fields_repr


@dataclass(repr=False)
class NeuronAttributions:
    """Neuron attributions of a batch, with the values that check them.

    Attributes:
        attributions: float32 on the CPU; ``[batch, layer, d_mlp]`` (``aggregate="sequence"``),
            ``[batch, layer, 5, d_mlp]`` (``"part"``, in :data:`mechir.PARTS` order) or
            ``[batch, layer, pos, d_mlp]`` (``"position"``; zero on padding).
        layers: the model layer of each ``layer`` row.
        scores: ``F(x)`` ``[batch]``.
        baseline_scores: ``[batch, layer]``: ``F(x with a_l := a'_l)`` (activation path) or
            ``F(x')`` repeated (input path).
        unexplained: ``[batch, layer]``: ``scores - baseline_scores - sum_i attributions``. On
            the activation path this is the completeness error (vanishes as ``n_steps`` grows);
            on the input path it is the part of ``F(x) - F(x')`` that bypasses the layer's
            neurons through the residual stream (:attr:`bypass`), *not* an error.
        embedding_completeness: input path only, ``[batch]``: ``F(x) - F(x')`` minus the
            integrated gradients of the embedding (the path integral's numerical error).
        error: ``[batch, layer]``: estimated ``max_i |A_i - A_i(exact)|`` over the layer's
            per-neuron attributions (see the module doc); None when not estimated.
        coarse: ``[batch, layer, d_mlp]``: per-neuron attributions at the coarser resolution.
        n_points: ``[batch]``: path points evaluated (forward + backward) per example.
        method, n_steps: the rule used (``n_steps="auto"``: the steps it reached, the largest
            over examples).
    """

    attributions: Tensor
    layers: list[int]
    scores: Float[Tensor, " batch"]
    baseline_scores: Float[Tensor, "batch layer"]
    unexplained: Float[Tensor, "batch layer"]
    path: str
    neurons: str
    aggregate: str
    target: AttributionTarget
    method: str
    n_steps: int
    embedding_completeness: Float[Tensor, " batch"] | None = None
    error: Float[Tensor, "batch layer"] | None = None
    coarse: Float[Tensor, "batch layer d_mlp"] | None = None
    n_points: Int[Tensor, " batch"] | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.attributions.shape[0]

    @property
    def bypass(self) -> Float[Tensor, "batch layer"]:
        """Input path: the part of ``F(x) - F(x')`` that does not flow through the layer."""
        if self.path != "input":
            raise ValueError("bypass is defined on the input path; see unexplained")
        return self.unexplained

    @property
    def completeness(self) -> Float[Tensor, "batch layer"]:
        """Deprecated name of :attr:`unexplained` (misleading on the input path: see there)."""
        if self.path == "input":
            warnings.warn(
                "NeuronAttributions.completeness on the input path is the share of F(x) - F(x') "
                "that bypasses the layer, not an error: use .bypass (or .unexplained), and "
                ".error / .embedding_completeness for accuracy",
                DeprecationWarning,
                stacklevel=2,
            )
        return self.unexplained

    def per_neuron(self) -> Float[Tensor, "batch layer d_mlp"]:
        """Attributions summed over positions (or parts): one value per example and neuron."""
        a = self.attributions
        return a if a.dim() == 3 else a.sum(2)

    def completeness_error(self) -> float:
        """Largest ``|completeness|`` relative to the largest ``|F(x) - F(baseline)|``; on the
        input path the embedding's (per-layer sums differ there by the bypass)."""
        delta = self.embedding_completeness if self.path == "input" else self.unexplained
        scale = (self.scores[:, None] - self.baseline_scores).abs().max().clamp_min(1e-12)
        return float(delta.abs().max() / scale)

    def relative_error(self) -> Float[Tensor, " batch"]:
        """Per example: ``max_l error[b, l] / max_{l, i} |A_i|`` (the estimated error relative to
        the example's largest per-neuron attribution)."""
        if self.error is None:
            raise ValueError("no error estimate: n_steps=1, or error_estimate=False was given")
        scale = self.per_neuron().abs().flatten(1).max(1).values.clamp_min(1e-30)
        return self.error.max(1).values / scale

    def selection_overlap(
        self, percent: float = 0.5, sign: str = "positive"
    ) -> Float[Tensor, " batch"]:
        """Per example, the fraction of the top ``percent`` % neurons (over all layers, ranked by
        ``sign`` as :func:`mechir.attribution.top_neurons` does) that the coarser resolution
        selects too: 1 means the selection is stable under halving the steps."""
        if self.coarse is None:
            raise ValueError("no coarse resolution: n_steps=1, or error_estimate=False was given")
        if sign not in SIGNS:
            raise ValueError(f"unknown sign {sign!r}: choose one of {SIGNS}")
        fine, coarse = self.per_neuron().flatten(1), self.coarse.flatten(1)
        k = n_selected(fine.shape[1], percent)
        key = {"positive": lambda t: t, "negative": lambda t: -t, "absolute": torch.abs}[sign]
        top_f = key(fine).topk(k, dim=1).indices
        top_c = key(coarse).topk(k, dim=1).indices
        hit = (top_f[:, :, None] == top_c[:, None, :]).any(-1).float()
        return hit.mean(1)

    def frame(self) -> pd.DataFrame:
        """Long form: one row per (example, layer, neuron), attributions summed over positions;
        with ``error`` (the layer's estimate) when there is one."""
        per = self.per_neuron()
        b, n_layers, d = per.shape
        index = pd.MultiIndex.from_product(
            [range(b), self.layers, range(d)], names=["example", "layer", "neuron"]
        )
        columns = {"attribution": per.reshape(-1).numpy()}
        if self.error is not None:
            columns["error"] = self.error[:, :, None].expand(b, n_layers, d).reshape(-1).numpy()
        return pd.DataFrame(columns, index=index).reset_index()


#: ``n_steps="auto"``: the error estimate is ``|A(m) - A(m/2)| / AUTO_SAFETY`` on the input path
#: and ``|R(N) - R(N/2)| / AUTO_SAFETY`` on the activation path (their modules' docs).
AUTO_SAFETY = 1.0
_ERROR_FACTORS = {"riemann_right": 2.0, "riemann_left": 2.0}


def error_factor(method: str) -> float:
    """``c`` of a fixed rule's error estimate ``c * |A(m) - A(m/2)|`` (module doc)."""
    return _ERROR_FACTORS.get(method, 1.0)


def warn_unconverged(relative: Float[Tensor, " batch"], s: AttributionSetup) -> None:
    """Warn (naming the examples) where ``n_steps="auto"`` stopped above ``rtol``."""
    unconverged = (relative > s.rtol).nonzero().flatten().tolist()
    if unconverged:
        warnings.warn(
            f"n_steps='auto' stopped at max_steps={s.max_steps} for example(s) {unconverged} with "
            f"estimated relative error {relative.max():.3g} > rtol={s.rtol}; raise max_steps",
            stacklevel=4,
        )


def layer_errors(
    fine: Float[Tensor, "batch layer d_mlp"], coarse: Float[Tensor, "batch layer d_mlp"], c: float
) -> Float[Tensor, "batch layer"]:
    """``c * max_i |fine_i - coarse_i|`` per example and layer."""
    return c * (fine - coarse).abs().max(-1).values


def make_result(
    s: AttributionSetup,
    out: Tensor,
    f_x: Tensor,
    f_base: Tensor,
    emb_ig: Tensor | None,
    *,
    method: str,
    n_steps: int,
    coarse: Tensor | None,
    error: Tensor | None,
    n_points: Tensor,
    meta: dict[str, Any] | None = None,
) -> NeuronAttributions:
    """Assemble :class:`NeuronAttributions` (raises if any attribution is NaN/inf)."""
    check_finite(out, "the attributions")
    totals = out.flatten(2).sum(-1) if out.dim() > 3 else out.sum(-1)
    unexplained = f_x[:, None] - f_base - totals
    embedding = None if emb_ig is None else f_x - f_base[:, 0] - emb_ig
    info = {"activation_baseline": s.activation_baseline} if s.path == "activation" else {}
    return NeuronAttributions(
        attributions=out,
        layers=list(s.layers),
        scores=f_x,
        baseline_scores=f_base.contiguous(),
        unexplained=unexplained,
        path=s.path,
        neurons=s.neurons,
        aggregate=s.aggregate,
        target=s.target,
        method=method,
        n_steps=n_steps,
        embedding_completeness=embedding,
        error=error,
        coarse=coarse,
        n_points=n_points,
        meta=info | (meta or {}),
    )


NeuronAttributions.__repr__ = fields_repr  # type: ignore[method-assign]
