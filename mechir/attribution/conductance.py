"""Input path of neuron integrated gradients: neuron conductance (what the paper's authors use),
a batched kernel with an error estimate, ``n_steps="auto"`` refinement, and the naive reference.

Interpolate the embedding output ``hook_full_embed`` (LayerNorm(word + position + token type),
the output of ``bert.embeddings`` that captum's BERT recipes interpolate) from the baseline
input's to the real one, ``e(alpha) = e' + alpha (e - e')`` (attention mask and token types are
the real input's); with cells ``[b_{k-1}, b_k]`` around nodes ``alpha_k`` and ``x_k = x(b_k)``::

    NIG_i = sum_k [a_i(x_k) - a_i(x_{k-1})] dF/da_i (x(alpha_k))

For ``riemann_right`` (``alpha_k = b_k = k/m``) this is the paper's formula; ``riemann_left`` is
captum's ``LayerConductance(method="riemann_trapezoid")``. One forward and backward per path point
gives every layer at once. Cells whose node is off-centre (Riemann left/right, Gauss-Legendre's
cumulative-weight cells) are first order in ``1/m``; midpoint cells are second order, with an
error expansion in even powers of ``1/m``.

``n_steps="auto"`` (the default rule for a target accuracy): midpoint cells on dyadic grids
``j/N``, ``N = 8, 16, 32, ...``. Every grid point is the node of exactly one midpoint level
(``j`` odd on grid ``N``: level ``m = N/2``, cell ``[(j-1)/N, (j+1)/N]``), so doubling ``N``
evaluates only the new odd points and reuses every activation already computed. The reported
value is the finest midpoint sum ``A(m)``, its error estimate ``|A(m) - A(m/2)|`` per neuron
(see :mod:`mechir.attribution.result`; in the asymptotic regime the error of ``A(m)`` is a third
of it, so the estimate carries a safety factor of about 3); refinement stops per example, from
``N = 16`` on, when the largest estimate is below ``rtol`` times the example's largest per-neuron
attribution (or at ``max_steps``, with a warning). Richardson extrapolation
``(4 A(m) - A(m/2)) / 3`` is not applied: on the shared SciFact model it was 5-14x *less*
accurate than ``A(m)`` itself up to ``N = 64`` (the integrand is not yet in its asymptotic
regime there; ``benchmarks/bench_nig_accuracy.py``), which made refinement run two grids longer.
Reuse has a memory price: the activations
at every grid point stay in memory until the example is done (``(N + 1) x layers x tokens x
d_mlp`` float32 values per example: ~0.8 GB at ``N = 128`` for 6 layers, 160 tokens, 1536
neurons).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from fractions import Fraction
from typing import Any

import torch
from torch import Tensor

from mechir.attribution.common import (
    AUTO_MIN_GRID,
    AUTO_START,
    EMBEDDING_HOOK,
    AttributionSetup,
    aggregate_positions,
    clean_pass,
    forward,
    output_shape,
    user_hooks,
)
from mechir.attribution.integration import IntegrationRule
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


class _CellFormula:
    """Per-example running sums of the cell formula of one rule, fed its points in order."""

    def __init__(self, rule: IntegrationRule):
        points, node_index, break_index = rule.points()
        n = len(points)
        self.points = points
        self.node_of = torch.full((n,), -1, dtype=torch.long)
        self.node_of[node_index] = torch.arange(rule.n_steps)
        self.break_of = torch.full((n,), -1, dtype=torch.long)
        self.break_of[break_index] = torch.arange(rule.n_steps + 1)
        self.weights = rule.weights.tolist()

    def needs_row(self) -> list[int]:
        """Points that need a forward: nodes, and breakpoints strictly inside (0, 1) (the end
        points' activations come from the clean passes over the baseline and the input)."""
        inside = (self.points > 0) & (self.points < 1)
        return torch.nonzero((self.node_of >= 0) | inside).flatten().tolist()

    @staticmethod
    def start(acts0: list[Tensor], d_model: int, length: int) -> dict[str, Any]:
        zeros = [torch.zeros_like(a) for a in acts0]
        emb = torch.zeros(length, d_model, dtype=torch.float32, device=acts0[0].device)
        return {"prev": acts0, "pending": None, "attr": zeros, "emb": emb}

    def feed(
        self,
        state: dict[str, Any],
        point: int,
        acts: list[Tensor] | None,
        grads: list[Tensor] | None,
        emb_grad: Tensor | None,
    ) -> None:
        k, j = int(self.node_of[point]), int(self.break_of[point])
        node_first = k >= 0 and j == k + 1  # cell k+1 (1-based) closes at its own node (right)
        if k >= 0 and node_first:
            self._node(state, k, grads, emb_grad)
        if j >= 0:
            if j >= 1:
                for attr, a, a_prev, g in zip(state["attr"], acts, state["prev"], state["pending"]):
                    attr.add_((a - a_prev) * g)
            state["prev"] = acts
        if k >= 0 and not node_first:
            self._node(state, k, grads, emb_grad)

    def _node(self, state: dict[str, Any], k: int, grads: Any, emb_grad: Tensor | None) -> None:
        state["pending"] = grads
        if emb_grad is not None:
            state["emb"].add_(emb_grad, alpha=self.weights[k])


def _embedding_hook(leaf: Tensor) -> Callable[[Tensor, Any], Tensor]:
    """Replace the embedding output by ``leaf`` (the interpolated embeddings)."""

    def replace(act: Tensor, hook: Any) -> Tensor:
        return leaf.to(act.dtype)

    return replace


def _catch_hook(store: dict[str, Tensor]) -> Callable[[Tensor, Any], None]:
    """Keep the activation (in the graph, for ``torch.autograd.grad``) under its hook name."""

    def catch(act: Tensor, hook: Any) -> None:
        store[hook.name] = act

    return catch


def _input_chunk(
    model: HookedReranker, s: AttributionSetup, rows: CrossEncoderBatch, embeddings: Tensor, ac: Any
) -> tuple[list[Tensor], list[Tensor], Tensor]:
    """One forward + backward of ``rows`` with their embedding output set to ``embeddings``:
    the activations of every attributed layer, ``dF/da`` of each and ``dF/de`` (float32)."""
    leaf = embeddings.detach().requires_grad_(True)
    caught: dict[str, Tensor] = {}
    hooks = user_hooks(s.hooks, rows) + [(EMBEDDING_HOOK, _embedding_hook(leaf))]
    hooks += [(name, _catch_hook(caught)) for name in s.names]
    with torch.enable_grad():
        with ac:
            f = forward(model, rows, hooks, s.target)
        acts = [caught[name] for name in s.names]
        grads = torch.autograd.grad(f.sum(), [leaf, *acts])
    return [a.detach().float() for a in acts], [g.float() for g in grads[1:]], grads[0].float()


class _PathRows:
    """Runs (example, alpha) rows of one group in chunks of ``max_batch`` and hands every row's
    activations, activation gradients and embedding gradient (cut to the example's tokens) to
    ``take(i, alpha, acts, grads, emb_grad)``."""

    def __init__(
        self, model: HookedReranker, s: AttributionSetup, gb: CrossEncoderBatch, emb_b, emb_x, ac
    ):
        self.model, self.s, self.gb, self.ac = model, s, gb, ac
        self.emb_b, self.emb_x = emb_b, emb_x
        self.lengths = gb.lengths.tolist()
        self.forwards = 0  # rows run (one forward + backward each)

    def run(self, rows: list[tuple[int, float]], max_batch: int, take: Callable) -> None:
        device = self.gb.device
        for c in range(0, len(rows), max_batch):
            chunk = rows[c : c + max_batch]
            who = torch.tensor([i for i, _ in chunk], device=device)
            alpha = torch.tensor([a for _, a in chunk], dtype=torch.float32, device=device)
            rb = self.gb[who]
            width = rb.input_ids.shape[1]
            e0, e1 = self.emb_b[who, :width].float(), self.emb_x[who, :width].float()
            emb = e0 + alpha[:, None, None] * (e1 - e0)
            acts, g_acts, g_emb = _input_chunk(self.model, self.s, rb, emb, self.ac)
            self.forwards += len(chunk)
            for r, (i, a) in enumerate(chunk):
                n = self.lengths[i]
                take(i, a, [x[r, :n] for x in acts], [g[r, :n] for g in g_acts], g_emb[r, :n])


def _groups(
    model: HookedReranker,
    s: AttributionSetup,
    group_size: int,
    ac: Any,
    f_x: Tensor,
    f_base: Tensor,
) -> Iterator[tuple]:
    """Groups of ``group_size`` examples with their clean passes over the input and the
    baseline (``F`` written into ``f_x`` / ``f_base``) and a :class:`_PathRows` runner."""
    for start in range(0, len(s.batch), group_size):
        ex = list(range(start, min(start + group_size, len(s.batch))))
        gb, gbase = s.batch[ex], s.base[ex]
        with ac:
            fx, acts_x, emb_x = clean_pass(model, gb, s, embed=True)
            fb, acts_b, emb_b = clean_pass(model, gbase, s, embed=True)
        f_x[ex], f_base[ex] = fx.cpu(), fb.cpu()
        yield ex, gb, acts_x, emb_x, acts_b, emb_b, _PathRows(model, s, gb, emb_b, emb_x, ac)


def conductance_attributions(
    model: HookedReranker, s: AttributionSetup, max_batch: int, ac: Any
) -> NeuronAttributions:
    """The batched input path (see the module doc); ``s`` from :func:`common.prepare`."""
    if s.rule is None:
        return _auto(model, s, max_batch, ac)
    rules = [s.rule] + ([s.companion] if s.companion is not None else [])
    cells = [_CellFormula(r) for r in rules]
    union = torch.unique(torch.cat([c.points for c in cells]))
    own = []  # per rule: union point -> its own point index (-1: not its point)
    for c in cells:
        m = torch.full((len(union),), -1, dtype=torch.long)
        m[torch.searchsorted(union, c.points)] = torch.arange(len(c.points))
        own.append(m.tolist())
    row_points = sorted(
        {u for c, m in zip(cells, own) for u in range(len(union)) if m[u] in set(c.needs_row())}
    )
    alphas = union.tolist()
    group_size = max(1, max_batch // max(1, len(row_points)))
    out = torch.zeros(output_shape(s, model), dtype=torch.float32)
    coarse = torch.zeros(len(s.batch), len(s.layers), model.cfg.d_mlp)
    f_x, f_base, emb_ig = (torch.zeros(len(s.batch)) for _ in range(3))
    for ex, gb, acts_x, emb_x, acts_b, emb_b, runner in _groups(
        model, s, group_size, ac, f_x, f_base
    ):
        lengths = runner.lengths
        states = [
            [
                c.start([a[i, : lengths[i]] for a in acts_b], model.cfg.d_model, lengths[i])
                for c in cells
            ]
            for i in range(len(ex))
        ]
        index = {a: u for u, a in enumerate(alphas)}

        def take(
            i: int, a: float, acts: list, grads: list, g_emb: Tensor, states=states, index=index
        ) -> None:
            u = index[a]
            for r, (c, m) in enumerate(zip(cells, own)):
                if m[u] >= 0:
                    c.feed(states[i][r], m[u], acts, grads, g_emb if r == 0 else None)

        rows = [(i, alphas[u]) for i in range(len(ex)) for u in row_points]
        runner.run(rows, max_batch, take)
        for i, e in enumerate(ex):
            n_tok = lengths[i]
            for r, c in enumerate(cells):
                last = len(c.points) - 1
                if c.break_of[last] >= 0 and last not in c.needs_row():
                    c.feed(states[i][r], last, [a[i, :n_tok] for a in acts_x], None, None)
            attr = torch.stack(states[i][0]["attr"]).cpu()
            out[e] = aggregate_positions(
                attr, gb.parts[i, :n_tok].cpu(), s.aggregate, out.shape[-2]
            )
            if len(cells) > 1:
                coarse[e] = torch.stack(states[i][1]["attr"]).sum(1).cpu()
            diff = (emb_x[i, :n_tok] - emb_b[i, :n_tok]).float()
            emb_ig[e] = float((diff * states[i][0]["emb"]).sum())
    per = out if out.dim() == 3 else out.sum(2)
    has = s.companion is not None
    return make_result(
        s,
        out,
        f_x,
        f_base[:, None].expand(-1, len(s.layers)),
        emb_ig,
        method=s.rule.method,
        n_steps=s.rule.n_steps,
        coarse=coarse if has else None,
        error=layer_errors(per, coarse, error_factor(s.rule.method)) if has else None,
        n_points=torch.full((len(s.batch),), len(row_points)),
        meta={"coarse_n_steps": s.companion.n_steps} if has else {},
    )


# ---------------------------------------------------------------------- n_steps="auto"
def _level(alpha: float) -> int:
    """The midpoint level ``m`` whose node ``alpha`` is (``alpha = odd / (2 m)``)."""
    return Fraction(alpha).denominator // 2


def _auto(
    model: HookedReranker, s: AttributionSetup, max_batch: int, ac: Any
) -> NeuronAttributions:
    out = torch.zeros(output_shape(s, model), dtype=torch.float32)
    n_layers, d_mlp = len(s.layers), model.cfg.d_mlp
    coarse = torch.zeros(len(s.batch), n_layers, d_mlp)
    error = torch.zeros(len(s.batch), n_layers)
    f_x, f_base, emb_ig = (torch.zeros(len(s.batch)) for _ in range(3))
    n_points = torch.zeros(len(s.batch), dtype=torch.long)
    relative = torch.zeros(len(s.batch))
    group_size = max(1, max_batch // (AUTO_START - 1))
    forwards = 0
    for ex, gb, acts_x, emb_x, acts_b, emb_b, runner in _groups(
        model, s, group_size, ac, f_x, f_base
    ):
        lengths = runner.lengths
        st = [
            {
                "acts": {0.0: [a[i, :n] for a in acts_b], 1.0: [a[i, :n] for a in acts_x]},
                "pending": {},
                "levels": {},  # m -> per-layer [n_tok, d_mlp] sums of the midpoint rule A(m)
                "emb": {},  # m -> [n_tok, d_model] sum_k w_k dF/de(alpha_k)
            }
            for i, n in enumerate(lengths)
        ]

        def take(i: int, a: float, acts: list, grads: list, g_emb: Tensor, st=st) -> None:
            state = st[i]
            state["acts"][a] = acts
            state["pending"][a] = (grads, g_emb)
            for p in list(state["pending"]):  # settle every node whose cell ends are known
                m = _level(p)
                lo, hi = p - 1 / (2 * m), p + 1 / (2 * m)
                if lo in state["acts"] and hi in state["acts"]:
                    g, ge = state["pending"].pop(p)
                    a_lo, a_hi = state["acts"][lo], state["acts"][hi]
                    sums = state["levels"].setdefault(m, [torch.zeros_like(x) for x in a_lo])
                    for acc, x1, x0, gg in zip(sums, a_hi, a_lo, g):
                        acc.add_((x1 - x0) * gg)
                    emb = state["emb"].setdefault(m, torch.zeros_like(ge))
                    emb.add_(ge, alpha=1 / m)

        active, grid = list(range(len(ex))), 1
        while active:
            new = AUTO_START if grid == 1 else 2 * grid
            alphas = [j / new for j in range(1, new) if grid == 1 or j % 2 == 1]
            runner.run([(i, a) for i in active for a in alphas], max_batch, take)
            grid = new
            m = grid // 2
            still = []
            for i in active:
                levels = st[i]["levels"]
                fine = torch.stack(levels[m]).sum(1)  # [layer, d_mlp]: A(m)
                prev = torch.stack(levels[m // 2]).sum(1)  # A(m/2)
                e = ex[i]
                error[e] = (fine - prev).abs().max(-1).values.cpu() / AUTO_SAFETY
                coarse[e] = prev.cpu()
                n_points[e] = grid - 1
                relative[e] = error[e].max() / fine.abs().max().clamp_min(1e-30).cpu()
                if (relative[e] > s.rtol or grid < AUTO_MIN_GRID) and grid < s.max_steps:
                    still.append(i)
            active = still
        for i, e in enumerate(ex):
            n_tok, levels = lengths[i], st[i]["levels"]
            m = int(n_points[e] + 1) // 2
            attr = torch.stack(levels[m]).cpu()
            out[e] = aggregate_positions(
                attr, gb.parts[i, :n_tok].cpu(), s.aggregate, out.shape[-2]
            )
            diff = (emb_x[i, :n_tok] - emb_b[i, :n_tok]).float()
            emb_ig[e] = float((diff * st[i]["emb"][m]).sum())
        forwards += runner.forwards
    warn_unconverged(relative, s)
    return make_result(
        s,
        out,
        f_x,
        f_base[:, None].expand(-1, n_layers),
        emb_ig,
        method="auto",
        n_steps=int(n_points.max()) + 1,
        coarse=coarse,
        error=error,
        n_points=n_points,
        meta={"rule": "nested riemann_middle cells", "rtol": s.rtol, "forwards": forwards},
    )


# ---------------------------------------------------------------------- naive reference
def conductance_reference_layer(
    model: HookedReranker,
    one: CrossEncoderBatch,
    s: AttributionSetup,
    name: str,
    emb_x: Tensor,
    emb_b: Tensor,
    with_embedding: bool,
) -> tuple[Tensor, float]:
    """Conductance of one layer of one example, one path point per forward and backward: every
    point's activation and gradient, then the cell sum. With ``with_embedding`` also the
    embedding's integrated gradients."""
    rule = s.rule
    acts: dict[float, Tensor] = {}
    grads: dict[float, Tensor] = {}
    emb_grads: dict[float, Tensor] = {}
    for alpha in sorted(set(rule.alphas.tolist()) | set(rule.breakpoints.tolist())):
        alpha32 = torch.tensor(alpha, dtype=torch.float32)
        leaf = (emb_b + alpha32 * (emb_x - emb_b)).requires_grad_(True)
        box: dict[str, Tensor] = {}

        def embed(act: Tensor, hook: Any, leaf: Tensor = leaf) -> Tensor:
            return leaf

        def catch(act: Tensor, hook: Any, box: dict = box) -> None:
            box["a"] = act

        fwd = user_hooks(s.hooks, one) + [(EMBEDDING_HOOK, embed), (name, catch)]
        with torch.enable_grad():
            f = forward(model, one, fwd, s.target)
            wrt = [box["a"], leaf] if with_embedding else [box["a"]]
            g = torch.autograd.grad(f.sum(), wrt)
        acts[alpha], grads[alpha] = box["a"][0].detach(), g[0][0]
        if with_embedding:
            emb_grads[alpha] = g[1][0]
    b, a = rule.breakpoints.tolist(), rule.alphas.tolist()
    attr = sum((acts[b[k + 1]] - acts[b[k]]) * grads[a[k]] for k in range(rule.n_steps))
    if not with_embedding:
        return attr, float("nan")
    emb_sum = sum(w * emb_grads[alpha] for alpha, w in zip(a, rule.weights.tolist()))
    return attr, float(((emb_x[0] - emb_b[0]) * emb_sum).sum())
