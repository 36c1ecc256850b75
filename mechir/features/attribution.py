"""Attribution of the score to an SAE's features and its error node.

At the SAE's site every real token's activation is written as ``x = decode(f) + e`` (features
``f``, error node ``e = x - decode(f)``). Along the straight path from a baseline ``(f0, e0)``
(each ``"zero"``, ``"clean"``: that node stays at its clean value and gets 0, or a vector such
as the mean over a dataset) to the clean point, the score ``s(alpha)`` of the model run with the
site set to ``decode(f0 + alpha (f - f0)) + e0 + alpha (e - e0)`` moves from ``s(0)`` (the
baseline score) to ``s(1) = s(clean)``. With ``g(alpha) = ds/d(f, e)``:

* integrated gradients (``method="ig"``): ``A_i = (f_i - f0_i) sum_k w_k g_i(alpha_k)``
  summed over the pair's positions (and likewise for ``e``), with the nodes and weights of
  :func:`mechir.attribution.integration.integration_rule`. Completeness:
  ``sum_i A_i + A_e = s(1) - s(0)`` up to the quadrature error, which is reported
  (``completeness_error``); ``n_steps="auto"`` doubles the steps of the midpoint rule until that
  error is within ``rtol * |s(1) - s(0)|`` (or ``max_steps``);
* attribution patching (``method="atp"``): the first-order estimate ``A_i = (f_i - f0_i)
  g_i(1)`` from one forward and one backward pass at the clean point (no completeness; its gap
  is reported the same way).

:func:`feature_ablation_effects` measures exactly what AtP estimates for single features: the
score change when one feature is ablated at every token with the error kept (through
:func:`mechir.features.splice.sae_hooks`). Everything runs on the model's normal hooked forward
(active user hooks apply to every run).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from jaxtyping import Float

from mechir.attribution.integration import integration_rule
from mechir.features.saes import decode, encode, sae_site
from mechir.features.source import check_site
from mechir.features.splice import FeatureEdit, sae_hooks
from mechir.interface import HookedReranker
from mechir.lazy import lazy_import
from mechir.parts import CrossEncoderBatch
from mechir.running import per_forward

torch = lazy_import("torch")

METHODS: tuple[str, ...] = ("ig", "atp")
BASELINES: tuple[str, ...] = ("zero", "clean")


@dataclass
class FeatureAttribution:
    """Attributions of the score change ``delta = s(clean) - s(baseline)`` per pair.

    Attributes:
        features: ``[batch, d_sae]`` attribution of every feature (summed over positions).
        error: ``[batch]`` attribution of the error node.
        clean, baseline: ``[batch]`` scores at the clean point and at the baseline.
        method: ``"ig"`` or ``"atp"``; n_steps: gradient evaluations per pair.
    """

    features: Float[torch.Tensor, "batch d_sae"]
    error: Float[torch.Tensor, " batch"]
    clean: Float[torch.Tensor, " batch"]
    baseline: Float[torch.Tensor, " batch"]
    method: str
    n_steps: int

    @property
    def delta(self) -> Float[torch.Tensor, " batch"]:
        return self.clean - self.baseline

    @property
    def total(self) -> Float[torch.Tensor, " batch"]:
        """``sum_i A_i + A_e`` per pair."""
        return self.features.sum(-1) + self.error

    @property
    def completeness_error(self) -> Float[torch.Tensor, " batch"]:
        """``|sum_i A_i + A_e - delta|`` per pair (the quadrature error for IG)."""
        return (self.total - self.delta).abs()

    def relative_completeness_error(self) -> float:
        """``max_b |total - delta| / max(max_b |delta|, 1e-12)``."""
        return float(self.completeness_error.max() / self.delta.abs().max().clamp_min(1e-12))


BaselineArg = Any  # "zero" | "clean" | a tensor


def _path_run(
    model: HookedReranker,
    batch: CrossEncoderBatch,
    sae: Any,
    site: str,
    alpha: float,
    feature_baseline: Any,
    error_baseline: Any,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One forward + backward at ``alpha``: ``(score, df, de, f - f0, e - e0)`` with the
    gradients of the summed score with respect to the path point's features and error node
    (zero at padding)."""
    real = per_forward(lambda b: b.attention_mask.bool())
    held: dict[str, torch.Tensor] = {}

    def fn(act: torch.Tensor, hook: Any) -> torch.Tensor:
        shape = act.shape
        x = (act.reshape(*shape[:2], -1) if act.dim() == 4 else act).detach()
        with torch.no_grad():
            f = encode(sae, x)
            e = x - decode(sae, f).to(x.dtype)
        mask = real(hook)
        if mask.shape[1] != x.shape[1]:  # decoder site: every position
            mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        mask = mask.to(x.device)[..., None]
        f0 = _baseline_value(feature_baseline, f)
        e0 = _baseline_value(error_baseline, e)
        fa = (f0 + alpha * (f - f0)).requires_grad_(True)
        ea = (e0 + alpha * (e - e0)).requires_grad_(True)
        out = torch.where(mask, decode(sae, fa).to(x.dtype) + ea, x)
        held.update(fa=fa, ea=ea, df=(f - f0) * mask, de=(e - e0) * mask, mask=mask)
        return out.reshape(shape)

    with torch.enable_grad(), model.hooks(fwd_hooks=[(site, fn)]):
        score = model(batch)
        gf, ge = torch.autograd.grad(score.sum(), [held["fa"], held["ea"]], allow_unused=True)
    gf = torch.zeros_like(held["fa"]) if gf is None else gf
    ge = torch.zeros_like(held["ea"]) if ge is None else ge
    mask = held["mask"]
    return (
        score.detach().float().cpu(),
        (gf * mask).detach(),
        (ge * mask).detach(),
        held["df"],
        held["de"],
    )


def _baseline_value(baseline: Any, clean: torch.Tensor) -> torch.Tensor:
    if isinstance(baseline, str):
        return clean if baseline == "clean" else torch.zeros_like(clean)
    return baseline.to(clean).expand_as(clean)


def _check_baseline(baseline: Any, size: int, what: str) -> None:
    if isinstance(baseline, str):
        if baseline not in BASELINES:
            raise ValueError(
                f"unknown {what} baseline {baseline!r}: choose one of {BASELINES} or a tensor"
            )
        return
    if not hasattr(baseline, "shape") or tuple(baseline.shape) != (size,):
        raise ValueError(f"{what} baseline must be 'zero', 'clean' or a [{size}] tensor")


def feature_attribution(
    model: HookedReranker,
    batch: CrossEncoderBatch,
    sae: Any,
    *,
    site: str | None = None,
    method: Literal["ig", "atp"] = "ig",
    n_steps: int | Literal["auto"] = 32,
    integration: str = "riemann_middle",
    feature_baseline: BaselineArg = "zero",
    error_baseline: BaselineArg = "zero",
    rtol: float = 0.01,
    max_steps: int = 256,
) -> FeatureAttribution:
    """Attribute the score change from the baseline to the clean run to ``sae``'s features and
    error node (module docstring). ``site`` defaults to the SAE's own. Baselines: ``"zero"``,
    ``"clean"`` (that node does not move: its attribution is 0) or a vector (``[d_sae]`` for
    the features, ``[d]`` for the error, e.g. their means over a dataset: a path that stays
    among typical activations converges faster)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: choose one of {METHODS}")
    site = check_site(model, site or sae_site(sae))
    _check_baseline(feature_baseline, sae.cfg.d_sae, "feature")
    _check_baseline(error_baseline, sae.cfg.d_in, "error")

    def run(alpha: float) -> tuple:
        return _path_run(model, batch, sae, site, alpha, feature_baseline, error_baseline)

    clean = run(1.0)
    baseline_score = run(0.0)[0]
    if method == "atp":
        _, gf, ge, df, de = clean
        return FeatureAttribution(
            (gf * df).sum(1).float().cpu(),
            (ge * de).sum((1, 2)).float().cpu(),
            clean[0],
            baseline_score,
            "atp",
            1,
        )
    if n_steps == "auto":
        steps = 8
        while True:
            result = _integrated(
                run, clean, baseline_score, integration_rule("riemann_middle", steps)
            )
            scale = result.delta.abs().max().clamp_min(1e-12)
            if result.completeness_error.max() <= rtol * scale or steps * 2 > max_steps:
                return result
            steps *= 2
    return _integrated(run, clean, baseline_score, integration_rule(integration, n_steps))


def _integrated(
    run: Any, clean: tuple, baseline_score: torch.Tensor, rule: Any
) -> FeatureAttribution:
    _, _, _, df, de = clean
    gf = torch.zeros_like(df)
    ge = torch.zeros_like(de)
    for alpha, w in zip(rule.alphas.tolist(), rule.weights.tolist()):
        _, g_f, g_e, *_ = run(alpha)
        gf += w * g_f
        ge += w * g_e
    return FeatureAttribution(
        (gf * df).sum(1).float().cpu(),
        (ge * de).sum((1, 2)).float().cpu(),
        clean[0],
        baseline_score,
        "ig",
        rule.n_steps,
    )


@torch.no_grad()
def node_means(
    sae: Any, acts: Float[torch.Tensor, "n d"]
) -> tuple[Float[torch.Tensor, " d_sae"], Float[torch.Tensor, " d"]]:
    """Mean features and mean error node over activation rows (a baseline for
    :func:`feature_attribution`: ``feature_baseline=means[0], error_baseline=means[1]``)."""
    x = acts.to(sae.device, sae.dtype)
    f = encode(sae, x)
    return f.mean(0).float().cpu(), (x - decode(sae, f)).mean(0).float().cpu()


def feature_ablation_effects(
    model: HookedReranker,
    batch: CrossEncoderBatch,
    sae: Any,
    features: Sequence[int],
    *,
    site: str | None = None,
) -> Float[torch.Tensor, "batch n_features"]:
    """Exact effects ``s(clean) - s(feature i ablated at every token, error kept)``, one column
    per feature of ``features`` (one forward pass each)."""
    site = check_site(model, site or sae_site(sae))
    clean = model.score(batch)
    cols = [
        clean - model.score(batch, hooks=sae_hooks(model, {site: sae}, edit=FeatureEdit((i,))))
        for i in features
    ]
    return torch.stack(cols, -1) if cols else torch.zeros(len(batch), 0)


__all__ = [
    "BASELINES",
    "METHODS",
    "FeatureAttribution",
    "feature_ablation_effects",
    "feature_attribution",
    "node_means",
]
