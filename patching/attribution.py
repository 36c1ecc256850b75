"""Attribution patching: the first-order (gradient) approximation of activation patching.

For a cell ``c`` (a set of activation entries ``a_c``) the patched score is approximated by::

    s_patch[c] ~ s_corr + sum_{e in c} (a_e(clean) - a_e(corr)) * d s / d a_e |_corr

which is exact when the score is affine in ``a_c`` (e.g. the pooled output, whose score is
``pooled . W + b``). For queries and keys (:func:`patching.targets.qk_target`) it applies the AtP*
correction (Kramar et al., 2024): the patched attention pattern is recomputed through the softmax,
``P' = softmax(S + dS)`` with ``dS = q . dk / scale`` (or ``dq . k / scale``), and only the pattern
is linearised: ``s_patch ~ s_corr + sum (P' - P) * d s / d P``. Saturated softmaxes, where the
linear estimate through the scores is worst, are then handled exactly.

Every cell of a target comes from two forward passes (clean, cached; corrupted,
with gradients) and one backward pass per group of pairs. :func:`attribution_vs_exact` reports how
well it agrees with exact patching (:func:`patching.sweep.patch_sweep`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import numpy as np
import torch
from jaxtyping import Float, Int
from scipy import stats
from torch import Tensor

from mechir.interface import HookedReranker
from patching.perturbations import AlignedPairs
from patching.results import DEFAULT_MIN_DELTA, PatchingResult
from patching.targets import PatchTarget


def _leaf_hook(act: Tensor, hook: Any) -> Tensor:
    """Make the embeddings a leaf that requires grad (parameters' ``.grad`` stay untouched)."""
    return act.detach().requires_grad_(True)


def _store_hook(store: dict[str, Tensor], act: Tensor, hook: Any) -> None:
    store[hook.name] = act


def _path_hook(clean: Tensor, alpha: float, act: Tensor, hook: Any) -> Tensor:
    """The corrupted run's embeddings moved ``alpha`` of the way to the clean run's, as a leaf."""
    return (act + alpha * (clean.to(act.dtype) - act)).detach().requires_grad_(True)


def path_rule(alpha: float) -> str:
    """The name of the rule with gradients at input-path point ``alpha``: ``"path:0.5"``."""
    return f"path:{alpha:g}"


def attribution_patch(
    model: HookedReranker,
    pairs: AlignedPairs,
    target: PatchTarget,
    *,
    batch_size: int = 16,
    atp_star: bool = True,
    gradient: Literal["corrupted", "mean"] = "corrupted",
) -> PatchingResult:
    """Approximate patched scores for every cell of ``target`` from gradients.

    ``patched[i, c] = corrupted_i + sum_{e in c} (clean_e - corrupted_e) * grad_e``, with the
    score's gradient at the corrupted run; two forwards and one backward per ``batch_size`` pairs.
    With ``atp_star`` (default), query/key targets recompute the attention softmax (module doc).
    ``gradient="mean"`` uses the mean of the gradients at the corrupted and at the clean run
    (a two-point, trapezoid-like rule; one more backward pass), except for AtP* cells.

    Returns:
        A :class:`PatchingResult` with ``method="attribution"``, on the same grid as
        :func:`patching.sweep.patch_sweep` for the same target.
    """
    return attribution_estimates(
        model, pairs, target, batch_size=batch_size, atp_star=atp_star, gradients=(gradient,)
    )[gradient]


def attribution_estimates(
    model: HookedReranker,
    pairs: AlignedPairs,
    target: PatchTarget,
    *,
    batch_size: int = 16,
    atp_star: bool = True,
    gradients: tuple[str, ...] = ("corrupted", "mean"),
    path_points: tuple[float, ...] = (),
) -> dict[str, PatchingResult]:
    """:func:`attribution_patch` with several ``gradient`` rules from the same runs (one clean
    backward pass serves every rule that needs it): ``{rule: result}``.

    ``path_points`` adds one rule per ``alpha`` in (0, 1), named ``"path:<alpha>"``
    (:func:`path_rule`): ``sum_{e in c} (clean_e - corrupted_e) * grad_e(alpha)``, the gradient
    taken where the input embeddings are ``corrupted + alpha * (clean - corrupted)`` (one more
    forward and backward pass per point; for query/key targets the AtP* pattern gradient there).
    For a cell of the embeddings these are Riemann points of integrated gradients; deeper, the
    gradient at a state between the two runs. Each is a point estimate, and none is a bound.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for gradient in gradients:
        if gradient not in ("corrupted", "mean"):
            raise ValueError(f"unknown gradient={gradient!r}: choose 'corrupted' or 'mean'")
    _check_path_points(path_points)
    rules = tuple(gradients) + tuple(path_rule(a) for a in path_points)
    width = pairs.clean.input_ids.shape[1]
    dims, coords = target.grid(model, width)
    shape = tuple(len(coords[d]) for d in dims)
    cells = target.cell_rows(model, width)
    flat = target.flat_index(model, cells, width)
    valid = target.valid(cells, pairs.lengths)
    n = len(pairs)
    size = int(np.prod(shape)) if shape else 1
    patched = {g: torch.full((n, size), float("nan")) for g in rules}
    clean_scores, corrupted_scores = torch.empty(n), torch.empty(n)
    for g0 in range(0, n, batch_size):
        group = group_estimates(
            model, pairs[g0 : g0 + batch_size], target, gradients, atp_star, width=width,
            path_points=path_points,
        )  # fmt: skip
        k = group.corrupted_scores
        for i, row in enumerate(range(g0, g0 + len(k))):
            cs = flat[valid[row].nonzero()[:, 0]]
            for gradient in rules:
                estimate = k[i] + group.effects[gradient][i].reshape(-1)[cs]
                patched[gradient][row, cs] = estimate.float()
        clean_scores[g0 : g0 + len(k)] = group.clean_scores.float()
        corrupted_scores[g0 : g0 + len(k)] = k.float()
    return {
        gradient: PatchingResult(
            target=target.name,
            dims=dims,
            coords=coords,
            patched=patched[gradient].reshape(n, *shape),
            clean=clean_scores,
            corrupted=corrupted_scores,
            pair_ids=list(pairs.pair_ids),
            grades=list(pairs.grades),
            method="attribution",
        )
        for gradient in rules
    }


def _check_path_points(path_points: tuple[float, ...]) -> None:
    for alpha in path_points:
        if not 0 < alpha < 1:
            raise ValueError(
                f"path point {alpha} out of range: choose points strictly between 0 (corrupted) "
                "and 1 (clean)"
            )


@dataclass
class GroupEstimates:
    """Attribution patching of one group of pairs, and what its runs leave for exact patching.

    Attributes:
        effects: per gradient rule, ``[batch, *grid]`` estimated ``s_patch - s_corr`` (float64,
            CPU; 0 at positions past the group's width).
        clean_scores, corrupted_scores: ``[batch]`` scores (float64, CPU).
        clean: the target's activations in the clean run (the patches' sources).
        corrupted: the activations named in ``keep`` of the corrupted run.
    """

    effects: dict[str, Tensor]
    clean_scores: Float[Tensor, " batch"]
    corrupted_scores: Float[Tensor, " batch"]
    clean: dict[str, Tensor]
    corrupted: dict[str, Tensor]


def group_estimates(
    model: HookedReranker,
    group: AlignedPairs,
    target: PatchTarget,
    gradients: tuple[str, ...] = ("corrupted",),
    atp_star: bool = True,
    keep: tuple[str, ...] = (),
    width: int | None = None,
    path_points: tuple[float, ...] = (),
) -> GroupEstimates:
    """One batch of :func:`attribution_estimates`: a clean run (with gradients when a rule needs
    them), a corrupted run with gradients, one run with gradients per path point, and the
    estimates of every cell per rule, on the grid of inputs ``width`` tokens wide (default: the
    group's)."""
    _check_path_points(path_points)
    dims, coords = target.grid(model, width or group.clean.input_ids.shape[1])
    layers = target.target_layers(model)
    names = [target.hook_name(layer) for layer in layers]
    qk = _qk_input(target) if atp_star else None
    if qk and model.abilities.qk_norm:
        raise ValueError(
            f"AtP* on {qk} cannot recompute this model's attention: its queries and keys are "
            "RMS-normalized per head after hook_q/hook_k (QK-norm, Qwen3); pass atp_star=False "
            "(a plain gradient estimate) or patch exactly (patch_sweep)"
        )
    extra = [f"blocks.{lay}.attn.hook_{x}" for lay in layers for x in ("q", "k", "attn_scores")]
    patterns = [f"blocks.{lay}.attn.hook_pattern" for lay in layers] if qk else []
    b = len(group)
    clean_grads = None
    embed = ["hook_full_embed"] if path_points else []
    if "mean" in gradients and not qk:  # one clean run gives the activations and gradients
        c_acts: dict[str, Tensor] = {}
        c_hooks = [("hook_full_embed", _leaf_hook)] + [
            (nm, partial(_store_hook, c_acts)) for nm in names + embed
        ]
        with torch.enable_grad(), model.hooks(fwd_hooks=c_hooks):
            c_score = model(group.clean)
            clean_grads = torch.autograd.grad(c_score.sum(), [c_acts[nm] for nm in names])
        c_score, clean = c_score.detach(), {nm: c_acts[nm].detach() for nm in names + embed}
    else:
        with torch.no_grad():
            c_score, cache = model.run_with_cache(group.clean, names_filter=names + embed)
        clean = {nm: cache[nm] for nm in names + embed}
    acts: dict[str, Tensor] = {}
    stored = names + (extra + patterns if qk else []) + list(keep)
    hooks = [("hook_full_embed", _leaf_hook)] + [
        (nm, partial(_store_hook, acts)) for nm in dict.fromkeys(stored)
    ]
    with torch.enable_grad(), model.hooks(fwd_hooks=hooks):
        k_score = model(group.corrupted)
        wrt = patterns if qk else names
        grads = torch.autograd.grad(k_score.sum(), [acts[nm] for nm in wrt])
    rule_grads = {gradient: grads for gradient in gradients}
    for alpha in path_points:  # the corrupted input, its embeddings moved toward the clean ones
        p_acts: dict[str, Tensor] = {}
        p_hooks = [("hook_full_embed", partial(_path_hook, clean["hook_full_embed"], alpha))]
        p_hooks += [(nm, partial(_store_hook, p_acts)) for nm in wrt]
        with torch.enable_grad(), model.hooks(fwd_hooks=p_hooks):
            p_score = model(group.corrupted)
            rule_grads[path_rule(alpha)] = torch.autograd.grad(
                p_score.sum(), [p_acts[nm] for nm in wrt]
            )
    parts = group.corrupted.parts.to(k_score.device)
    shape = tuple(len(coords[d]) for d in dims)
    effects = {}
    for gradient, grads in rule_grads.items():
        dense = torch.zeros(b, *shape, dtype=torch.float64)
        for i_layer, (layer, name, grad) in enumerate(zip(layers, names, grads)):
            if gradient == "mean" and clean_grads is not None:
                grad = (grad + clean_grads[i_layer]) / 2
            if qk:
                attn = model.blocks[layer].attn
                rotation = attn.rotate_positions  # rotary (ModernBERT, LLMs); declared
                delta = attn.qk_score_delta  # position terms (DeBERTa); declared
                reduced = _qk_softmax_estimate(
                    target, qk, layer, clean[name], acts, grad, parts, attn.attn_scale, rotation,
                    delta,
                )  # fmt: skip
            else:
                prod = (clean[name] - acts[name].detach()).double() * grad.double()
                reduced = target.reduce(prod, parts).cpu()
            if target.has_layer_dim:
                dense[:, layer] = _fit(reduced, dense.shape[2:])
            else:
                dense[:] = _fit(reduced, dense.shape[1:])
        effects[gradient] = dense
    return GroupEstimates(
        effects,
        c_score.detach().double().cpu(),
        k_score.detach().double().cpu(),
        {nm: clean[nm] for nm in names},
        {nm: acts[nm].detach() for nm in keep},
    )


def _qk_input(target: PatchTarget) -> str | None:
    """``"q"`` or ``"k"`` for query/key targets (where AtP* applies), else None."""
    for which in ("q", "k"):
        if target.hook == f"blocks.{{layer}}.attn.hook_{which}":
            return which
    return None


def _qk_softmax_estimate(
    target: PatchTarget,
    which: str,
    layer: int,
    clean: Float[Tensor, "batch pos head d_head"],
    acts: dict[str, Tensor],
    grad_pattern: Float[Tensor, "batch head query key"],
    parts: Int[Tensor, "batch pos"],
    scale: float,
    rotation: Callable[[Tensor], Tensor] | None = None,
    score_delta: Callable[[str, Tensor, Tensor, Tensor], Tensor] | None = None,
) -> Float[Tensor, "batch head ..."]:
    """AtP* for a query/key cell: ``sum (softmax(S + dS) - P) * dF/dP`` per (head, position set).

    For keys patched at positions ``m``: ``dS[b, h, q, k] = q[b, q, h] . (k_clean - k)[b, k, h]
    m[b, k] / scale``; for queries the same with the roles of ``q`` and ``k`` swapped. With rotary
    positions ``q``, ``k`` and the difference are first rotated (``rotation``, linear per position).
    An attention whose scores have more terms in ``q`` or ``k`` (DeBERTa's relative-position
    terms) gives ``dS`` itself: ``score_delta(which, q, k, difference)``.
    """
    pre = f"blocks.{layer}.attn."
    q, k = acts[pre + "hook_q"].detach(), acts[pre + "hook_k"].detach()
    scores = acts[pre + "hook_attn_scores"].detach()
    pattern = acts[pre + "hook_pattern"].detach()
    own = k if which == "k" else q
    diff = clean.to(own.dtype) - own
    rotate = rotation or (lambda x: x)
    q, k = rotate(q), rotate(k)
    if k.shape[2] != q.shape[2]:  # grouped-query attention: each key head serves a group
        k = torch.repeat_interleave(k, q.shape[2] // k.shape[2], dim=2)
    b, width, n_heads, _ = own.shape
    n_sub = 1 if len(target.cells) == 1 else (width if target.cells[1] == "position" else 5)
    out = torch.zeros(b, n_heads, n_sub, dtype=torch.float64)
    for j in range(n_sub):
        sub = torch.tensor([[0] + ([j] if len(target.cells) > 1 else [])] * b, device=own.device)
        mask = target.row_mask(sub, parts, own).expand(b, width, n_heads, 1)[:, :, 0, 0]
        d = rotate(diff * mask[:, :, None, None].to(diff.dtype))
        if score_delta is not None:
            d_scores = score_delta(which, q, k, d)
        elif which == "k":
            d_scores = torch.einsum("bqhd,bkhd->bhqk", q, d) / scale
        else:
            d_scores = torch.einsum("bqhd,bkhd->bhqk", d, k) / scale
        new = torch.softmax(scores + d_scores, dim=-1).nan_to_num(0.0)
        out[:, :, j] = ((new - pattern).double() * grad_pattern.double()).sum((-1, -2)).cpu()
    return out if len(target.cells) > 1 else out[:, :, 0]


def _fit(values: Tensor, shape: torch.Size) -> Tensor:
    """Pad a group's per-position values (group width) to the result grid (full width) with 0."""
    if values.shape[1:] == shape:
        return values
    out = values.new_zeros(values.shape[0], *shape)
    out[tuple([slice(None)] + [slice(0, s) for s in values.shape[1:]])] = values
    return out


def attribution_vs_exact(
    attribution: PatchingResult, exact: PatchingResult, *, min_delta: float = DEFAULT_MIN_DELTA
) -> dict[str, float]:
    """How well attribution patching approximates exact patching on the same target and pairs.

    Over every (included pair, patched cell): Pearson and Spearman correlation of the effects
    ``patched - corrupted`` and their largest absolute difference; over cells: Pearson and Spearman
    correlation of the mean metric (the numbers behind the heatmaps).
    """
    if attribution.patched.shape != exact.patched.shape or attribution.target != exact.target:
        raise ValueError(
            f"results differ in target or grid: {attribution.target} "
            f"{tuple(attribution.patched.shape)} vs {exact.target} {tuple(exact.patched.shape)}"
        )
    if attribution.pair_ids != exact.pair_ids:
        raise ValueError("the two results are over different pairs")
    n = len(exact)
    keep = (exact.delta.abs() >= min_delta).cpu()
    a = attribution.patched - attribution.corrupted.view(-1, *[1] * (exact.patched.dim() - 1))
    e = exact.patched - exact.corrupted.view(-1, *[1] * (exact.patched.dim() - 1))
    a, e = a.reshape(n, -1)[keep], e.reshape(n, -1)[keep]
    ok = ~(a.isnan() | e.isnan())
    av, ev = a[ok].double().numpy(), e[ok].double().numpy()
    ma = attribution.mean(min_delta).reshape(-1)
    me = exact.mean(min_delta).reshape(-1)
    okm = ~(ma.isnan() | me.isnan())
    mav, mev = ma[okm].numpy(), me[okm].numpy()
    return {
        "n_pairs": int(keep.sum()),
        "n_values": int(ok.sum()),
        "pearson": _corr(stats.pearsonr, av, ev),
        "spearman": _corr(stats.spearmanr, av, ev),
        "max_abs_diff": float(np.abs(av - ev).max()) if len(av) else float("nan"),
        "mean_metric_pearson": _corr(stats.pearsonr, mav, mev),
        "mean_metric_spearman": _corr(stats.spearmanr, mav, mev),
    }


def _corr(fn: Any, x: np.ndarray, y: np.ndarray) -> float:
    if len(x) < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    return float(fn(x, y)[0])


__all__ = [
    "GroupEstimates",
    "attribution_estimates",
    "attribution_patch",
    "attribution_vs_exact",
    "group_estimates",
    "path_rule",
]
