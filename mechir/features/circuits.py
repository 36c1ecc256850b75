"""Feature circuits between two spliced SAEs and the score, on the model's hooked forward.

Two SAEs at successive sites, ``up`` (earlier) and ``down`` (later), are spliced with their
error terms kept, so the model scores exactly as before; their features and error nodes are the
circuit's nodes. Attention patterns and LayerNorm (RMSNorm) scales are frozen at the clean run
by :func:`frozen_hooks` (hooks that return the clean run's detached values; in a post-LN encoder
every layer's scale is carried the same way), so that the graph between the nodes is linear up
to the MLPs. With ``g_j = ds/df_down_j`` and features measured against a zero baseline:

* node effect (attribution patching): ``A(down_j) = sum_pos g_j f_down_j`` and ``A(up_i) =
  sum_pos ds/df_up_i f_up_i`` (error nodes: ``ds/de . e``);
* edge ``up_i -> down_j``: ``E_ij = sum_pos' f_up_i(pos') d/df_up_i(pos') [sum_pos g_j(pos)
  f_down_j(pos)]``, one backward pass per downstream node kept (``g`` detached), so that
  ``sum_i E_ij + E_(err_up -> j)`` estimates ``A(down_j)``'s share that flows from ``up``
  (the downstream error node is a leaf: it has no incoming edges);
* pruning: nodes sorted by ``|A|``, the smallest set whose ``|A|`` sum reaches ``influence``
  of the total is kept (:func:`prune_by_influence`);
* faithfulness at a node budget ``n`` (:func:`faithfulness_curve`), measured **exactly**: the
  ``n`` nodes of largest ``|A|`` of each SAE keep their values, every other feature of both SAEs
  is ablated (error nodes kept), and ``(s(circuit) - s(empty)) / (s(model) - s(empty))`` with
  ``s(empty)`` every feature of both SAEs ablated.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from jaxtyping import Float

from mechir.features.saes import decode, encode, sae_site
from mechir.features.source import check_site
from mechir.features.splice import FeatureEdit, sae_hooks
from mechir.interface import HookedReranker
from mechir.lazy import lazy_import
from mechir.parts import CrossEncoderBatch
from mechir.running import Hooks, per_forward

torch = lazy_import("torch")


def _frozen_name(name: str) -> bool:
    return name.endswith("attn.hook_pattern") or name.endswith("hook_scale")


def frozen_hooks(model: HookedReranker, batch: CrossEncoderBatch) -> Hooks:
    """Hooks returning the clean run's attention patterns and normalisation scales on ``batch``
    (detached): the forward keeps its values on ``batch`` and gradients do not flow through
    them. Built for that batch only (they carry its values)."""
    with torch.no_grad():
        _, cache = model.run_with_cache(batch, names_filter=_frozen_name)
    frozen = {name: cache[name].detach() for name in cache.keys()}

    def substitute(name: str) -> Any:
        value = frozen[name]

        def fn(act: torch.Tensor, hook: Any) -> torch.Tensor:
            if act.shape != value.shape:
                raise ValueError(
                    f"frozen {name!r} was recorded on a batch of shape {tuple(value.shape)}, the "
                    f"model now runs on {tuple(act.shape)}: build frozen_hooks for this batch"
                )
            return value

        return fn

    return [(name, substitute(name)) for name in frozen]


@dataclass
class FeatureCircuit:
    """Nodes and edges of a two-SAE feature circuit (summed over the batch's pairs).

    Attributes:
        up_effect, down_effect: ``[d_sae]`` node effects on the score (attribution patching).
        up_error, down_error: the error nodes' effects.
        down_nodes: the downstream features whose incoming edges were computed.
        edges: ``[len(down_nodes), d_sae_up + 1]`` edge weights ``up_i -> down_j`` (last column:
            the upstream error node).
    """

    up_effect: Float[torch.Tensor, " d_up"]
    down_effect: Float[torch.Tensor, " d_down"]
    up_error: float
    down_error: float
    down_nodes: list[int]
    edges: Float[torch.Tensor, "n_down d_up_plus_1"]


def _capture_hooks(saes: dict[str, Any], held: dict[str, Any], real: Any) -> Hooks:
    """Splice each SAE with its error kept, exposing its features and error as leaves."""

    def make(site: str, sae: Any) -> Any:
        def fn(act: torch.Tensor, hook: Any) -> torch.Tensor:
            shape = act.shape
            x = act.reshape(*shape[:2], -1)
            with torch.no_grad():
                f0 = encode(sae, x.detach())
            # the features as a function of the (possibly upstream-dependent) input x, so that
            # gradients flow from downstream features to upstream nodes through the model
            if x.requires_grad:  # downstream: the features depend on the upstream nodes
                f = encode(sae, x)
                f = f + (f0 - f).detach()  # value exactly f0, gradient through encode(x)
            else:  # upstream: the features are leaves
                f = f0.clone().requires_grad_(True)
            e = (x - decode(sae, f0)).detach().requires_grad_(True)
            f_used = f
            mask = real(hook)
            if mask.shape[1] != x.shape[1]:
                mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
            mask = mask.to(x.device)[..., None]
            held[site] = {"f": f_used, "e": e, "mask": mask}
            out = torch.where(mask, decode(sae, f_used) + e, x)
            return out.reshape(shape)

        return fn

    return [(site, make(site, sae)) for site, sae in saes.items()]


def feature_circuit(
    model: HookedReranker,
    batch: CrossEncoderBatch,
    up: Any,
    down: Any,
    *,
    n_down: int = 10,
    freeze: bool = True,
) -> FeatureCircuit:
    """Node effects of both SAEs and the edges from ``up``'s nodes into the ``n_down``
    downstream features of largest ``|effect|`` (module docstring)."""
    site_up, site_down = check_site(model, sae_site(up)), check_site(model, sae_site(down))
    names = list(model.hook_dict)
    if names.index(site_up) >= names.index(site_down):
        raise ValueError(f"{site_up!r} must come before {site_down!r} in the forward pass")
    frozen = frozen_hooks(model, batch) if freeze else []
    real = per_forward(lambda b: b.attention_mask.bool())
    held: dict[str, Any] = {}

    def run() -> torch.Tensor:
        held.clear()
        hooks = frozen + _capture_hooks({site_up: up, site_down: down}, held, real)
        with model.hooks(fwd_hooks=hooks):
            return model(batch)

    with torch.enable_grad():
        # node effects: the upstream features are leaves, the downstream ones depend on them
        # through the model (gradients are taken with respect to both)
        score = run()
        u, d = held[site_up], held[site_down]
        g_fu, g_eu = torch.autograd.grad(score.sum(), [u["f"], u["e"]], retain_graph=True)
        g_fd_in, g_ed = torch.autograd.grad(
            score.sum(), [d["f"], d["e"]], retain_graph=True, allow_unused=True
        )
        up_effect = (g_fu * u["f"] * u["mask"]).sum((0, 1)).detach()
        up_error = float((g_eu * u["e"] * u["mask"]).sum().detach())
        down_effect = (g_fd_in * d["f"] * d["mask"]).sum((0, 1)).detach()
        down_error = float((g_ed * d["e"] * d["mask"]).sum().detach()) if g_ed is not None else 0.0
        nodes = down_effect.abs().topk(min(n_down, len(down_effect))).indices.tolist()
        g_fd = g_fd_in.detach()
        rows = []
        for j in nodes:
            # sum_pos g_j(pos) f_down_j(pos), f_down_j a function of the upstream nodes
            target = (g_fd[..., j] * d["f"][..., j] * d["mask"][..., 0]).sum()
            if not target.requires_grad:
                rows.append(torch.zeros(up.cfg.d_sae + 1))
                continue
            gf, ge = torch.autograd.grad(
                target, [u["f"], u["e"]], retain_graph=True, allow_unused=True
            )
            gf = torch.zeros_like(u["f"]) if gf is None else gf
            ge = torch.zeros_like(u["e"]) if ge is None else ge
            row_f = (gf * u["f"] * u["mask"]).sum((0, 1))
            row_e = (ge * u["e"] * u["mask"]).sum()
            rows.append(torch.cat([row_f, row_e[None]]).detach().float().cpu())
    return FeatureCircuit(
        up_effect.float().cpu(),
        down_effect.float().cpu(),
        up_error,
        down_error,
        nodes,
        torch.stack(rows) if rows else torch.zeros(0, up.cfg.d_sae + 1),
    )


def prune_by_influence(effect: Float[torch.Tensor, " d"], influence: float = 0.9) -> list[int]:
    """The fewest nodes (largest ``|effect|`` first) whose ``|effect|`` sums to at least
    ``influence`` of the total."""
    if not 0 < influence <= 1:
        raise ValueError(f"influence must be in (0, 1], got {influence}")
    mag = effect.abs()
    order = mag.argsort(descending=True)
    total = float(mag.sum())
    if total == 0:
        return []
    cum = mag[order].cumsum(0) / total
    n = int((cum < influence - 1e-12).sum()) + 1
    return order[:n].tolist()


def faithfulness_curve(
    model: HookedReranker,
    batch: CrossEncoderBatch,
    up: Any,
    down: Any,
    circuit: FeatureCircuit,
    budgets: Sequence[int],
) -> list[dict[str, float]]:
    """Exact faithfulness ``(s(circuit) - s(empty)) / (s(model) - s(empty))`` (summed scores of
    the batch) when only the ``n`` features of largest ``|effect|`` of each SAE are kept, for
    each budget ``n`` (module docstring)."""
    sites = {sae_site(up): up, sae_site(down): down}
    effects = {sae_site(up): circuit.up_effect, sae_site(down): circuit.down_effect}

    def score_keeping(n: int) -> float:
        edits = {}
        for site, sae in sites.items():
            keep = set(effects[site].abs().argsort(descending=True)[:n].tolist()) if n else set()
            drop = tuple(i for i in range(sae.cfg.d_sae) if i not in keep)
            if drop:
                edits[site] = FeatureEdit(drop, "ablate")
        hooks = sae_hooks(model, sites, error="keep", edit=edits or None)
        return float(model.score(batch, hooks=hooks).sum())

    full = float(model.score(batch).sum())
    empty = score_keeping(0)
    total_nodes = up.cfg.d_sae + down.cfg.d_sae
    out = []
    for n in budgets:
        s = score_keeping(n)
        out.append(
            {
                "nodes_per_sae": n,
                "fraction_of_nodes": 2 * n / total_nodes,
                "faithfulness": (s - empty) / (full - empty) if full != empty else float("nan"),
            }
        )
    return out


__all__ = [
    "FeatureCircuit",
    "faithfulness_curve",
    "feature_circuit",
    "frozen_hooks",
    "prune_by_influence",
]
