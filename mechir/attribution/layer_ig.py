"""Activation path of neuron integrated gradients (Knowledge-Neurons style layer integrated
gradients): a batched kernel with an error estimate, ``n_steps="auto"``, and the naive reference.

For each layer ``l`` on its own, replace ``a_l`` by ``a'_l + alpha (a_l - a'_l)`` (other layers'
activations are recomputed as usual, never interpolated); the baseline activation ``a'_l`` is
zero or the activation of the baseline input (``activation_baseline``)::

    NIG_i = (a_i - a'_i) * sum_k w_k dF/da_i (alpha_k)

Completeness (exact in the limit): ``sum_i NIG_i = F(x) - F(x with a_l := a'_l)``.

``n_steps="auto"``: trapezoid rules on dyadic grids ``j/N`` (``N = 8, 16, ...``; the end points
are nodes), each doubling evaluating only the new odd points; the reported value is Romberg's
first extrapolation ``R(N) = (4 T(N) - T(N/2)) / 3`` (Simpson's rule), its error estimate
``|R(N) - R(N/2)|`` per neuron, and refinement stops per example as on the input path.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from fractions import Fraction
from typing import Any

import torch
from torch import Tensor

from mechir.attribution.common import (
    AUTO_START,
    AttributionSetup,
    aggregate_positions,
    clean_pass,
    forward,
    output_shape,
    user_hooks,
)
from mechir.attribution.result import (
    AUTO_SAFETY,
    NeuronAttributions,
    error_factor,
    layer_errors,
    make_result,
    warn_unconverged,
)
from mechir.interface import HookedReranker
from mechir.parts import CrossEncoderBatch


def _grow_hook(n_new: int) -> Callable[[Tensor, Any], Tensor]:
    """Append ``n_new`` copies of row 0 (the clean example): rows that start at this layer."""

    def grow(act: Tensor, hook: Any) -> Tensor:
        return torch.cat([act, act[:1].expand(n_new, *act.shape[1:])])

    return grow


def _drop_clean_hook(act: Tensor, hook: Any) -> Tensor:
    """Drop row 0 (the clean example) once no later layer needs it."""
    return act[1:]


def _replacement_hook(
    base: Tensor, alphas: Sequence[float] | None, leaves: list[Tensor]
) -> Callable[[Tensor, Any], Tensor]:
    """Replace the last ``len(alphas)`` rows by ``a' + alpha (a - a')`` (``a`` = row 0) as a new
    leaf tensor (appended to ``leaves``; its gradient is ``dF/da(alpha)``), or with
    ``alphas=None`` the last row by ``a'``."""

    def replace(act: Tensor, hook: Any) -> Tensor:
        if alphas is None:
            return torch.cat([act[:-1], base.to(act.dtype)])
        alpha = torch.tensor(alphas, device=act.device, dtype=torch.float32)[:, None, None]
        leaf = (base + alpha * (act[:1].float() - base)).to(act.dtype)
        leaves.append(leaf.detach().requires_grad_(True))
        return torch.cat([act[: -len(alphas)], leaves[-1]])

    return replace


def _activation_hooks(
    s: AttributionSetup,
    rows: list[tuple[int, float]] | None,
    a_b: list[Tensor],
    leaves: list[Tensor],
) -> list:
    """Hooks for one forward of one example on the activation path.

    The forward starts with the example alone; at every attributed layer its rows join the batch
    as copies of the clean row (at ``hook_resid_mid``) and get their activation at the neuron hook
    (interpolated, or ``a'`` when ``rows`` is None: one row per layer for ``F(x, a_l := a'_l)``);
    the clean row leaves after the last of these layers. Layers below a row's layer are thus
    computed once per forward, not once per row.
    """
    layer_pos = sorted({lp for lp, _ in rows}) if rows is not None else range(len(s.layers))
    hooks = []
    for lp in layer_pos:
        alphas = [a for p, a in rows if p == lp] if rows is not None else None
        hooks.append((f"blocks.{s.layers[lp]}.hook_resid_mid", _grow_hook(len(alphas or [0]))))
        hooks.append((s.names[lp], _replacement_hook(a_b[lp], alphas, leaves)))
    hooks.append((f"blocks.{s.layers[layer_pos[-1]]}.hook_resid_post", _drop_clean_hook))
    return hooks


class _Example:
    """The interpolated forwards of one example: rows ``(layer position, alpha)`` in chunks of
    ``per_chunk``, each row's gradient ``dF/da(alpha)`` handed to ``take(lp, alpha, grad)``."""

    def __init__(self, model: HookedReranker, s: AttributionSetup, one: CrossEncoderBatch, a_b, ac):
        self.model, self.s, self.one, self.a_b, self.ac = model, s, one, a_b, ac
        self.forwards = 0  # rows run

    def run(self, rows: list[tuple[int, float]], per_chunk: int, take: Callable) -> None:
        s = self.s
        for c in range(0, len(rows), per_chunk):
            chunk = rows[c : c + per_chunk]
            leaves: list[Tensor] = []
            hooks = user_hooks(s.hooks, self.one) + _activation_hooks(s, chunk, self.a_b, leaves)
            with torch.enable_grad():
                with self.ac:
                    f = forward(self.model, self.one, hooks, s.target)
                grads = torch.autograd.grad(f.sum(), leaves)
            self.forwards += len(chunk)
            for lp, g in zip(sorted({lp for lp, _ in chunk}), grads):
                for a, gr in zip([a for p, a in chunk if p == lp], g):
                    take(lp, a, gr.float())


def layer_ig_attributions(
    model: HookedReranker, s: AttributionSetup, max_batch: int, ac: Any
) -> NeuronAttributions:
    """The batched activation path (see the module doc); ``s`` from :func:`common.prepare`."""
    out = torch.zeros(output_shape(s, model), dtype=torch.float32)
    n_layers = len(s.layers)
    coarse = torch.zeros(len(s.batch), n_layers, model.cfg.d_mlp)
    error = torch.zeros(len(s.batch), n_layers)
    f_x = torch.zeros(len(s.batch))
    f_zero = torch.zeros(len(s.batch), n_layers)
    n_points = torch.zeros(len(s.batch), dtype=torch.long)
    relative = torch.zeros(len(s.batch))
    per_chunk = max(1, max_batch - 1)  # the clean example rides along up to its last layer
    rules = [] if s.rule is None else [s.rule] + ([s.companion] if s.companion else [])
    for start in range(0, len(s.batch), max_batch):
        ex = list(range(start, min(start + max_batch, len(s.batch))))
        gb = s.batch[ex]
        with ac:
            fx, acts_x, _ = clean_pass(model, gb, s)
            if s.activation_baseline == "input":
                _, acts_b, _ = clean_pass(model, s.base[ex], s)
            else:
                acts_b = [torch.zeros_like(a) for a in acts_x]
        f_x[ex] = fx.cpu()
        for i, e in enumerate(ex):
            one = s.batch[e]
            n_tok = one.input_ids.shape[1]
            a_x = [a[i : i + 1, :n_tok] for a in acts_x]
            a_b = [a[i : i + 1, :n_tok] for a in acts_b]
            delta = [x[0] - b[0] for x, b in zip(a_x, a_b)]
            with torch.no_grad(), ac:  # F(x with a_l := a'_l), every layer in one forward
                hooks = user_hooks(s.hooks, one) + _activation_hooks(s, None, a_b, [])
                f_zero[e] = forward(model, one, hooks, s.target).float().cpu()
            runner = _Example(model, s, one, a_b, ac)
            if rules:
                sums, n_points[e] = _fixed(runner, rules, n_layers, per_chunk, a_x)
                fine = [d * g for d, g in zip(delta, sums[0])]
                if len(rules) > 1:
                    coarse[e] = torch.stack([(d * g).sum(0) for d, g in zip(delta, sums[1])]).cpu()
            else:
                fine, coarse[e], error[e], n_points[e] = _auto(
                    runner, s, n_layers, per_chunk, delta
                )
                relative[e] = error[e].max() / torch.stack(fine).sum(1).abs().max().clamp_min(1e-30)
            attr = torch.stack(fine).cpu()
            out[e] = aggregate_positions(attr, one.parts[0].cpu(), s.aggregate, out.shape[-2])
    per = out if out.dim() == 3 else out.sum(2)
    if s.rule is None:
        warn_unconverged(relative, s)
        method, n_steps, meta = "auto", int(n_points.max()) - 1, {"rule": "trapezoid + Romberg"}
        meta["rtol"] = s.rtol
    else:
        method, n_steps = s.rule.method, s.rule.n_steps
        meta = {"coarse_n_steps": s.companion.n_steps} if s.companion else {}
        if s.companion:
            error = layer_errors(per, coarse, error_factor(method))
    has = s.rule is None or s.companion is not None
    return make_result(
        s,
        out,
        f_x,
        f_zero,
        None,
        method=method,
        n_steps=n_steps,
        coarse=coarse if has else None,
        error=error if has else None,
        n_points=n_points,
        meta=meta,
    )


def _fixed(
    runner: _Example, rules: list, n_layers: int, per_chunk: int, a_x: list[Tensor]
) -> tuple[list[list[Tensor]], int]:
    """``sum_k w_k dF/da(alpha_k)`` per rule and layer, over the union of the rules' nodes."""
    alphas = sorted({a for r in rules for a in r.alphas.tolist()})
    weight = [dict(zip(r.alphas.tolist(), r.weights.tolist())) for r in rules]
    sums = [[torch.zeros_like(a[0]) for a in a_x] for _ in rules]

    def take(lp: int, a: float, g: Tensor) -> None:
        for r, w in enumerate(weight):
            if a in w:
                sums[r][lp].add_(g, alpha=w[a])

    runner.run([(lp, a) for lp in range(n_layers) for a in alphas], per_chunk, take)
    return sums, len(alphas)


def _trapezoid(levels: dict[int, list[Tensor]], n: int) -> list[Tensor]:
    """``T(n) = (1/n) sum_{q <= n} D[q]`` with ``D[q]`` the gradient sums at denominator ``q``
    (``D[1]`` = half the end points)."""
    qs = [q for q in levels if q <= n]
    return [sum(levels[q][lp] for q in qs) / n for lp in range(len(levels[1]))]


def _romberg(levels: dict[int, list[Tensor]], n: int) -> list[Tensor]:
    return [(4 * f - c) / 3 for f, c in zip(_trapezoid(levels, n), _trapezoid(levels, n // 2))]


def _auto(
    runner: _Example, s: AttributionSetup, n_layers: int, per_chunk: int, delta: list[Tensor]
) -> tuple[list[Tensor], Tensor, Tensor, int]:
    levels: dict[int, list[Tensor]] = {}  # denominator q -> per-layer gradient sums D[q]

    def take(lp: int, a: float, g: Tensor) -> None:
        q = Fraction(a).denominator
        sums = levels.setdefault(q, [torch.zeros_like(d) for d in delta])
        sums[lp].add_(g, alpha=0.5 if q == 1 else 1.0)

    grid = 1
    while True:
        new = AUTO_START if grid == 1 else 2 * grid
        alphas = [j / new for j in range(0 if grid == 1 else 1, new + 1) if grid == 1 or j % 2]
        runner.run([(lp, a) for lp in range(n_layers) for a in alphas], per_chunk, take)
        grid = new
        fine = [d * g for d, g in zip(delta, _romberg(levels, grid))]
        prev = [d * g for d, g in zip(delta, _romberg(levels, grid // 2))]
        fine_n = torch.stack([f.sum(0) for f in fine])
        prev_n = torch.stack([p.sum(0) for p in prev])
        error = (fine_n - prev_n).abs().max(-1).values / AUTO_SAFETY
        relative = error.max() / fine_n.abs().max().clamp_min(1e-30)
        if relative <= s.rtol or grid >= s.max_steps:
            return fine, prev_n.cpu(), error.cpu(), grid + 1


# ---------------------------------------------------------------------- naive reference
def layer_ig_reference_layer(
    model: HookedReranker, one: CrossEncoderBatch, s: AttributionSetup, name: str, base: Tensor
) -> tuple[Tensor, float]:
    """Integrated gradients of one layer of one example, one path point per forward and
    backward; also ``F(x with a_l := a'_l)``."""
    grad_sum = torch.zeros_like(base[0])
    actual: list[Tensor] = []
    for alpha, w in zip(s.rule.alphas.tolist(), s.rule.weights.tolist()):
        box: dict[str, Tensor] = {}

        def scale(act: Tensor, hook: Any, alpha: float = alpha, box: dict = box) -> Tensor:
            actual.append(act.detach())
            box["h"] = (base + alpha * (act - base)).detach().requires_grad_(True)
            return box["h"]

        with torch.enable_grad():
            f = forward(model, one, user_hooks(s.hooks, one) + [(name, scale)], s.target)
            (g,) = torch.autograd.grad(f.sum(), [box["h"]])
        grad_sum += w * g[0].float()

    def at_baseline(act: Tensor, hook: Any) -> Tensor:
        return base.expand_as(act)

    with torch.no_grad():
        f0 = forward(model, one, user_hooks(s.hooks, one) + [(name, at_baseline)], s.target)
    return (actual[0][0].float() - base[0]) * grad_sum, float(f0[0])
