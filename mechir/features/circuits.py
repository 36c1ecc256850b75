"""Feature circuits between two spliced SAEs and the score, on the model's hooked forward.

Two SAEs at successive sites, ``up`` (earlier) and ``down`` (later), are spliced with their
error terms kept, so the model scores exactly as before; their features and error nodes are the
circuit's nodes (in :meth:`FeatureCircuit.node_effects` order: up features, up error, down
features, down error). Every node ``a`` is measured against a baseline value ``a0``: zero
(``corrupted=None``) or its value on a token-aligned **corrupted** batch (the contrastive form,
e.g. relevant pairs against copies whose query words are replaced). With ``s`` the summed score
of the batch and ``delta a = a - a0``:

* node effect (attribution patching, the model's true gradient, nothing frozen):
  ``A(a) = sum_pos ds/da . delta a``, the first-order estimate of ``s - s(a patched to a0)``.
  Contrastive completeness: each site carries the whole residual stream, so the effects of one
  SAE's nodes (features + error) sum to ``s(clean) - s(corrupted)`` up to the second-order
  terms of the patch (:meth:`FeatureCircuit.completeness_error`);
* edge ``up_i -> down_j`` with the attention patterns and LayerNorm (RMSNorm) scales frozen at
  the clean run (:func:`frozen_hooks`; in a post-LN encoder every layer's scale is carried the
  same way) and the downstream error node a leaf (no incoming edges): ``E_ij = sum_pos'
  delta f_up_i(pos') d/df_up_i(pos') [sum_pos g_j(pos) f_down_j(pos)]`` with ``g_j =
  ds/df_down_j`` detached, one backward pass per downstream node kept, so that ``sum_i E_ij +
  E_(err_up -> j)`` estimates ``A(down_j)`` (frozen: the share of the path through the MLPs and
  value/output maps); the edges ``down_j -> score`` are ``A(down_j)``;
* pruning: nodes sorted by ``|A|``, the smallest set whose ``|A|`` sum reaches ``influence``
  of the total is kept (:func:`prune_by_influence`);
* replacement and completeness scores (circuit-tracer's, on this three-layer graph; error
  nodes count as non-feature inputs, the up site's features are fed by the tokens):
  ``c(score) = sum |A_down| / (sum |A_down| + |A_down_err|)``, ``c(j) = sum_i |E_ij| /
  (sum_i |E_ij| + |E_err_up,j|)`` for each downstream node with edges, ``w_j = |A_down_j| /
  (sum |A_down| + |A_down_err|)``; replacement ``= sum_j w_j c(j)`` (the share of the score's
  influence on feature-only paths; a lower bound when edges were computed for fewer than every
  downstream node), completeness ``= (c(score) + sum_j w_j c(j)) / (1 + sum_j w_j)``;
* faithfulness, measured **exactly** by running the model with every node outside the circuit
  set to its baseline (features and error nodes alike; a node inside keeps the value the
  running forward gives it): zero form, :func:`faithfulness_curve` (the ``n`` features of
  largest ``|A|`` of each SAE kept, error nodes kept, ``(s(circuit) - s(empty)) / (s(model) -
  s(empty))``); contrastive form, :func:`contrastive_faithfulness` (the ``n`` nodes of largest
  ``|A|`` over both SAEs, ``(s(circuit) - s(corrupted)) / (s(clean) - s(corrupted))``: 0 for
  the empty circuit, 1 for all nodes).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from jaxtyping import Bool, Float

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
        up_effect, down_effect: ``[d_sae]`` node effects on the score (attribution patching
            against the baseline).
        up_error, down_error: the error nodes' effects.
        down_nodes: the downstream features whose incoming edges were computed.
        edges: ``[len(down_nodes), d_sae_up + 1]`` edge weights ``up_i -> down_j`` (last column:
            the upstream error node).
        clean: the summed score of the batch; baseline: of the corrupted batch (contrastive
            form) or NaN (zero form).
    """

    up_effect: Float[torch.Tensor, " d_up"]
    down_effect: Float[torch.Tensor, " d_down"]
    up_error: float
    down_error: float
    down_nodes: list[int]
    edges: Float[torch.Tensor, "n_down d_up_plus_1"]
    clean: float = math.nan
    baseline: float = math.nan

    @property
    def contrastive(self) -> bool:
        return not math.isnan(self.baseline)

    @property
    def n_nodes(self) -> int:
        return len(self.up_effect) + len(self.down_effect) + 2

    def node_effects(self) -> Float[torch.Tensor, " nodes"]:
        """``[up features, up error, down features, down error]`` effects."""
        return torch.cat(
            [
                self.up_effect,
                torch.tensor([self.up_error]),
                self.down_effect,
                torch.tensor([self.down_error]),
            ]
        )

    def node_label(self, node: int) -> str:
        """``"up:17"``, ``"up:error"``, ``"down:3"`` or ``"down:error"``."""
        d_up = len(self.up_effect)
        if node < d_up:
            return f"up:{node}"
        if node == d_up:
            return "up:error"
        if node < self.n_nodes - 1:
            return f"down:{node - d_up - 1}"
        return "down:error"

    def completeness_error(self) -> dict[str, float]:
        """Per SAE, ``|sum of its node effects - (clean - baseline)| / |clean - baseline|``
        (contrastive form; module docstring)."""
        if not self.contrastive:
            raise ValueError(
                "completeness against the score change needs the contrastive form: build the "
                "circuit with corrupted= (a zero baseline has no measured baseline score)"
            )
        delta = self.clean - self.baseline
        scale = max(abs(delta), 1e-12)
        return {
            "up": abs(float(self.up_effect.sum()) + self.up_error - delta) / scale,
            "down": abs(float(self.down_effect.sum()) + self.down_error - delta) / scale,
        }

    def _shares(self) -> tuple[float, list[float], list[float]]:
        down = self.down_effect.abs()
        total = float(down.sum()) + abs(self.down_error)
        c_score = float(down.sum()) / total if total else 0.0
        weights = [float(down[j]) / total if total else 0.0 for j in self.down_nodes]
        shares = []
        for row in self.edges.abs():
            inputs = float(row.sum())
            shares.append(float(row[:-1].sum()) / inputs if inputs else 0.0)
        return c_score, weights, shares

    def replacement_score(self) -> float:
        """The share of the score's influence on feature-only paths (module docstring)."""
        _, weights, shares = self._shares()
        return sum(w * c for w, c in zip(weights, shares))

    def completeness_score(self) -> float:
        """Influence-weighted share of the nodes' inputs that are features (module docstring)."""
        c_score, weights, shares = self._shares()
        return (c_score + sum(w * c for w, c in zip(weights, shares))) / (1 + sum(weights))


# ---------------------------------------------------------------------- node values
def _real_mask(real: Any, hook: Any, x: torch.Tensor) -> torch.Tensor:
    mask = real(hook)
    if mask.shape[1] != x.shape[1]:  # decoder site: every position
        mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
    return mask.to(x.device)[..., None]


def _flat(act: torch.Tensor) -> torch.Tensor:
    return act.reshape(*act.shape[:2], -1)


def baseline_nodes(
    model: HookedReranker, corrupted: CrossEncoderBatch, saes: dict[str, Any]
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{site: (features, error)}`` of the corrupted batch's own forward pass (no patching):
    ``[batch, pos, d_sae]`` and ``[batch, pos, d]``."""
    seen: dict[str, torch.Tensor] = {}

    def record(site: str) -> Any:
        def fn(act: torch.Tensor, hook: Any) -> None:
            seen[site] = _flat(act).detach()

        return fn

    with torch.no_grad():
        with model.hooks(fwd_hooks=[(site, record(site)) for site in saes]):
            model(corrupted)
        out = {}
        for site, sae in saes.items():
            f = encode(sae, seen[site])
            out[site] = (f, seen[site] - decode(sae, f).to(seen[site].dtype))
    return out


def _check_aligned(batch: CrossEncoderBatch, corrupted: CrossEncoderBatch) -> None:
    if batch.input_ids.shape != corrupted.input_ids.shape or bool(
        (batch.attention_mask != corrupted.attention_mask).any()
    ):
        raise ValueError(
            f"clean batch {tuple(batch.input_ids.shape)} and corrupted batch "
            f"{tuple(corrupted.input_ids.shape)} are not token-aligned (same shape and padding): "
            "build them aligned (e.g. patching.edges.replace_query_words)"
        )


def _gradient_hooks(saes: dict[str, Any], held: dict[str, Any], real: Any) -> Hooks:
    """The model's true gradient at every node: the first site's features and error are leaves;
    at a later site ``f = encode(x)`` and ``e = x - decode(encode(x))`` (a second encode, so the
    spliced ``decode(f) + e`` has derivative 1 in ``x``) are read as intermediate nodes."""
    first = next(iter(saes))

    def make(site: str, sae: Any) -> Any:
        def fn(act: torch.Tensor, hook: Any) -> torch.Tensor:
            shape, x = act.shape, _flat(act)
            if site == first:
                with torch.no_grad():
                    f0 = encode(sae, x.detach())
                    e0 = x.detach() - decode(sae, f0).to(x.dtype)
                f, e = f0.requires_grad_(True), e0.requires_grad_(True)
            else:
                f = encode(sae, x)
                e = x - decode(sae, encode(sae, x)).to(x.dtype)
            mask = _real_mask(real, hook, x)
            held[site] = {"f": f, "e": e, "mask": mask}
            return torch.where(mask, decode(sae, f).to(x.dtype) + e, x).reshape(shape)

        return fn

    return [(site, make(site, sae)) for site, sae in saes.items()]


def _edge_hooks(saes: dict[str, Any], held: dict[str, Any], real: Any) -> Hooks:
    """Splice each SAE with its error kept: the first site's features and error are leaves, the
    later site's features a function of the upstream nodes through the model, its error a
    leaf (no incoming edges)."""
    first = next(iter(saes))

    def make(site: str, sae: Any) -> Any:
        def fn(act: torch.Tensor, hook: Any) -> torch.Tensor:
            shape, x = act.shape, _flat(act)
            with torch.no_grad():
                f0 = encode(sae, x.detach())
            if site != first and x.requires_grad:
                f = encode(sae, x)
                f = f + (f0 - f).detach()  # value exactly f0, gradient through encode(x)
            else:
                f = f0.clone().requires_grad_(True)
            e = (x - decode(sae, f0)).detach().requires_grad_(True)
            mask = _real_mask(real, hook, x)
            held[site] = {"f": f, "e": e, "mask": mask}
            return torch.where(mask, decode(sae, f).to(x.dtype) + e, x).reshape(shape)

        return fn

    return [(site, make(site, sae)) for site, sae in saes.items()]


def _path_hooks(
    site: str,
    sae: Any,
    base: tuple[torch.Tensor, torch.Tensor] | None,
    alpha: float,
    held: dict[str, Any],
    real: Any,
) -> Hooks:
    """The site's nodes on the straight path ``a0 + alpha (a - a0)`` from the baseline, as
    leaves (integrated gradients of one site)."""

    def fn(act: torch.Tensor, hook: Any) -> torch.Tensor:
        shape, x = act.shape, _flat(act).detach()
        with torch.no_grad():
            f = encode(sae, x)
            e = x - decode(sae, f).to(x.dtype)
            f0, e0 = (torch.zeros_like(f), torch.zeros_like(e)) if base is None else base
            fa = (f0 + alpha * (f - f0)).requires_grad_(True)
            ea = (e0 + alpha * (e - e0)).requires_grad_(True)
        held.update(f=fa, e=ea)
        out = decode(sae, fa).to(x.dtype) + ea
        return torch.where(_real_mask(real, hook, x), out, x).reshape(shape)

    return [(site, fn)]


def _integrated_gradients(
    model: HookedReranker,
    batch: CrossEncoderBatch,
    site: str,
    sae: Any,
    base: tuple[torch.Tensor, torch.Tensor] | None,
    n_steps: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum_k w_k ds/df(alpha_k), sum_k w_k ds/de(alpha_k))`` over the midpoint rule."""
    from mechir.attribution.integration import integration_rule

    rule = integration_rule("riemann_middle", n_steps)
    real = per_forward(lambda b: b.attention_mask.bool())
    held: dict[str, Any] = {}
    gf = ge = None
    for alpha, w in zip(rule.alphas.tolist(), rule.weights.tolist()):
        with (
            torch.enable_grad(),
            model.hooks(fwd_hooks=_path_hooks(site, sae, base, alpha, held, real)),
        ):
            score = model(batch)
            g_f, g_e = torch.autograd.grad(score.sum(), [held["f"], held["e"]])
        gf = w * g_f if gf is None else gf + w * g_f
        ge = w * g_e if ge is None else ge + w * g_e
    return gf, ge


METHODS: tuple[str, ...] = ("atp", "ig")


def feature_circuit(
    model: HookedReranker,
    batch: CrossEncoderBatch,
    up: Any,
    down: Any,
    *,
    corrupted: CrossEncoderBatch | None = None,
    n_down: int = 10,
    freeze: bool = True,
    method: str = "atp",
    n_steps: int = 16,
) -> FeatureCircuit:
    """Node effects of both SAEs and the edges from ``up``'s nodes into the ``n_down``
    downstream features of largest ``|effect|`` (module docstring). ``corrupted``: a batch
    token-aligned with ``batch`` (same shape and padding) whose node values are the baseline
    (contrastive form); ``None``: a zero baseline. ``freeze``: edges with the clean attention
    patterns and norm scales frozen (node effects always use the true gradient).
    ``method="ig"``: node effects by integrated gradients instead (``n_steps`` midpoint steps
    per site, each site's path alone from its baseline to the clean run; each site's effects
    then sum to the score change up to the quadrature error)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: choose one of {METHODS}")
    site_up, site_down = check_site(model, sae_site(up)), check_site(model, sae_site(down))
    names = list(model.hook_dict)
    if names.index(site_up) >= names.index(site_down):
        raise ValueError(f"{site_up!r} must come before {site_down!r} in the forward pass")
    saes = {site_up: up, site_down: down}
    if corrupted is not None:
        _check_aligned(batch, corrupted)
        base = baseline_nodes(model, corrupted, saes)
        with torch.no_grad():
            baseline_score = float(model(corrupted).sum())
    else:
        base, baseline_score = None, math.nan

    def delta(site: str, node: dict[str, Any], key: str) -> torch.Tensor:
        value = node[key].detach()
        if base is None:
            return value * node["mask"]
        return (value - base[site][0 if key == "f" else 1]) * node["mask"]

    real = per_forward(lambda b: b.attention_mask.bool())
    held: dict[str, Any] = {}
    with torch.enable_grad():
        with model.hooks(fwd_hooks=_gradient_hooks(saes, held, real)):
            score = model(batch)
        u, d = held[site_up], held[site_down]
        if method == "ig":
            g = [
                *_integrated_gradients(model, batch, site_up, up, base and base[site_up], n_steps),
                *_integrated_gradients(
                    model, batch, site_down, down, base and base[site_down], n_steps
                ),
            ]
        else:
            g = torch.autograd.grad(score.sum(), [u["f"], u["e"], d["f"], d["e"]])
        up_effect = (g[0] * delta(site_up, u, "f")).sum((0, 1)).detach()
        up_error = float((g[1] * delta(site_up, u, "e")).sum())
        down_effect = (g[2] * delta(site_down, d, "f")).sum((0, 1)).detach()
        down_error = float((g[3] * delta(site_down, d, "e")).sum())
        clean_score = float(score.detach().sum())
        nodes = down_effect.abs().topk(min(n_down, len(down_effect))).indices.tolist()

        held.clear()
        frozen = frozen_hooks(model, batch) if freeze else []
        with model.hooks(fwd_hooks=frozen + _edge_hooks(saes, held, real)):
            score = model(batch)
        u, d = held[site_up], held[site_down]
        (g_fd,) = torch.autograd.grad(score.sum(), [d["f"]], retain_graph=True)
        g_fd = g_fd.detach()
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
            row_f = (gf * delta(site_up, u, "f")).sum((0, 1))
            row_e = (ge * delta(site_up, u, "e")).sum()
            rows.append(torch.cat([row_f, row_e[None]]).detach().float().cpu())
    return FeatureCircuit(
        up_effect.float().cpu(),
        down_effect.float().cpu(),
        up_error,
        down_error,
        nodes,
        torch.stack(rows) if rows else torch.zeros(0, up.cfg.d_sae + 1),
        clean=clean_score,
        baseline=baseline_score,
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
    each budget ``n`` (zero form; module docstring)."""
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


# ---------------------------------------------------------------------- contrastive patching
def node_patch_hooks(
    model: HookedReranker,
    saes: dict[str, Any],
    baseline: dict[str, tuple[torch.Tensor, torch.Tensor]],
    keep: dict[str, tuple[Bool[torch.Tensor, " d_sae"], bool]],
) -> Hooks:
    """Hooks setting every node outside ``keep`` to its baseline value: at each site ``x ->
    decode(f') + e'`` with ``f'_i = f_i`` (the running forward's) where ``keep[site][0][i]``,
    else the baseline's; ``e' = e`` if ``keep[site][1]`` else the baseline's (computed as ``x +
    (decode(f') - decode(f)) + (e' - e)``, so keeping everything leaves ``x`` bit for bit).
    Real tokens only; built for the batch ``baseline`` was measured on."""
    real = per_forward(lambda b: b.attention_mask.bool())

    def make(site: str, sae: Any) -> Any:
        f_base, e_base = baseline[site]
        keep_f, keep_e = keep[site]

        def fn(act: torch.Tensor, hook: Any) -> torch.Tensor:
            shape, x = act.shape, _flat(act)
            if x.shape[:2] != f_base.shape[:2]:
                raise ValueError(
                    f"baseline nodes at {site!r} were measured on {tuple(f_base.shape[:2])} "
                    f"(batch, pos), the model now runs on {tuple(x.shape[:2])}"
                )
            f = encode(sae, x)
            x_hat = decode(sae, f).to(x.dtype)
            mixed = torch.where(keep_f.to(f.device), f, f_base.to(f))
            out = x + (decode(sae, mixed).to(x.dtype) - x_hat)
            if not keep_e:
                out = out + (e_base.to(x) - (x - x_hat))
            return torch.where(_real_mask(real, hook, x), out, x).reshape(shape)

        return fn

    for site in saes:
        check_site(model, site)
    return [(site, make(site, sae)) for site, sae in saes.items()]


def _keep_masks(
    circuit: FeatureCircuit, nodes: Sequence[int], d_up: int, d_down: int
) -> tuple[tuple[torch.Tensor, bool], tuple[torch.Tensor, bool]]:
    chosen = torch.zeros(circuit.n_nodes, dtype=torch.bool)
    chosen[list(nodes)] = True
    return (chosen[:d_up], bool(chosen[d_up])), (
        chosen[d_up + 1 : d_up + 1 + d_down],
        bool(chosen[-1]),
    )


def contrastive_faithfulness(
    model: HookedReranker,
    batch: CrossEncoderBatch,
    corrupted: CrossEncoderBatch,
    up: Any,
    down: Any,
    circuit: FeatureCircuit,
    budgets: Sequence[int],
    *,
    per_site: bool = False,
) -> list[dict[str, float]]:
    """Exact faithfulness ``(s(circuit) - s(corrupted)) / (s(clean) - s(corrupted))`` (summed
    scores) of the ``n`` nodes of largest ``|A|`` over both SAEs (features and error nodes), for
    each budget ``n``; every other node takes its value on ``corrupted`` (module docstring).

    ``per_site``: the budget is split evenly between the two sites (the ``n // 2`` nodes of
    largest ``|A|`` of each, the upstream site getting the odd one). Each site carries the whole
    residual stream, so a circuit without a node at one site scores as the corrupted run
    whatever it keeps at the other: a single ranking over both sites can spend a small budget
    on one site alone."""
    if not circuit.contrastive:
        raise ValueError("contrastive_faithfulness needs a circuit built with corrupted=")
    _check_aligned(batch, corrupted)
    saes = {sae_site(up): up, sae_site(down): down}
    base = baseline_nodes(model, corrupted, saes)
    effect = circuit.node_effects().abs()
    order = effect.argsort(descending=True).tolist()
    n_up = up.cfg.d_sae + 1
    up_order = effect[:n_up].argsort(descending=True).tolist()
    down_order = (effect[n_up:].argsort(descending=True) + n_up).tolist()
    with torch.no_grad():
        clean = float(model(batch).sum())
        corrupt = float(model(corrupted).sum())
    out = []
    for n in budgets:
        if not 0 <= n <= circuit.n_nodes:
            raise ValueError(f"budget {n} out of range: the circuit has {circuit.n_nodes} nodes")
        chosen = up_order[: n - n // 2] + down_order[: n // 2] if per_site else order[:n]
        up_keep, down_keep = _keep_masks(circuit, chosen, up.cfg.d_sae, down.cfg.d_sae)
        hooks = node_patch_hooks(
            model, saes, base, {sae_site(up): up_keep, sae_site(down): down_keep}
        )
        with torch.no_grad():
            s = float(model.score(batch, hooks=hooks).sum())
        out.append(
            {
                "nodes": n,
                "fraction_of_nodes": n / circuit.n_nodes,
                "score": s,
                "faithfulness": (s - corrupt) / (clean - corrupt) if clean != corrupt else math.nan,
            }
        )
    return out


__all__ = [
    "FeatureCircuit",
    "baseline_nodes",
    "contrastive_faithfulness",
    "faithfulness_curve",
    "feature_circuit",
    "frozen_hooks",
    "node_patch_hooks",
    "prune_by_influence",
]
