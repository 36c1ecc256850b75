"""Neuron integrated gradients (NIG) of FFN neurons: a batched kernel and a naive reference.

Neurons are the FFN activations ``a_l = blocks.{l}.mlp.hook_post`` (post-GELU; ``hook_pre`` with
``neurons="pre"``), one per (layer, position, neuron). ``F`` is the :class:`Target` (by default
the relevance score). An integration rule gives nodes ``alpha_k``, weights ``w_k`` and cells
``[b_{k-1}, b_k]`` (:mod:`mechir.attribution.integration`).

**Activation path** (``path="activation"``, Knowledge-Neurons style). For each layer ``l`` on its
own, replace ``a_l`` by ``a'_l + alpha (a_l - a'_l)`` (other layers' activations are recomputed
as usual, never interpolated); the baseline activation ``a'_l`` is zero or the activation of the
baseline input (``activation_baseline``)::

    NIG_i = (a_i - a'_i) * sum_k w_k dF/da_i (alpha_k)

Completeness (exact in the limit): ``sum_i NIG_i = F(x) - F(x with a_l := a'_l)``.

**Input path** (``path="input"``, neuron conductance, what the paper's authors use). Interpolate
the embedding output ``hook_full_embed`` (LayerNorm(word + position + token type), the output of
``bert.embeddings`` that ``captum``'s BERT recipes interpolate) from the baseline input's to the
real one, ``e(alpha) = e' + alpha (e - e')`` (the attention mask and token types are the real
input's); with ``x_k = x(b_k)``::

    NIG_i = sum_k [a_i(x_k) - a_i(x_{k-1})] dF/da_i (x(alpha_k))

For ``riemann_right`` (``alpha_k = b_k = k/m``) this is the paper's formula
``sum_k [a_i(x_k) - a_i(x_{k-1})] dF/da_i(x_k)``; ``riemann_left`` is captum's
``LayerConductance(method="riemann_trapezoid")``. One forward and backward per path point gives
every layer at once (``n_steps`` points for ``riemann_right``/``riemann_left``; the other rules
add their interior cell boundaries, about twice the points). An FFN layer is not a cut of the
network (the residual stream bypasses it), so a layer's sum is the part of ``F(x) - F(x')`` that
flows through its neurons and is *not* expected to equal it; the reported ``completeness`` is
that difference per layer. The numerical error of the path integral itself is
``embedding_completeness``: ``F(x) - F(x')`` minus the integrated gradients of the interpolated
embedding, ``sum (e - e') * sum_k w_k dF/de(alpha_k)``, which vanishes as ``n_steps`` grows.

:func:`neuron_integrated_gradients` batches (examples x path points, and layers on the
activation path) in chunks of ``max_batch`` rows; :func:`neuron_integrated_gradients_reference`
is the loop a researcher writes first (one example, one layer, one path point per forward and
backward) and is kept as the oracle.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from mechir.attribution.baselines import baseline_batch
from mechir.attribution.integration import IntegrationRule, integration_rule
from mechir.attribution.targets import Target, check_target, target_from_logits
from mechir.model import HooksArg
from mechir.parts import PARTS, CrossEncoderBatch
from mechir.selection import check_layers

PathFamily = Literal["input", "activation"]
NeuronSite = Literal["post", "pre"]
Aggregate = Literal["sequence", "part", "position"]
ActivationBaseline = Literal["zero", "input"]
PATHS: tuple[str, ...] = ("input", "activation")
AGGREGATES: tuple[str, ...] = ("sequence", "part", "position")
EMBEDDING_HOOK = "hook_full_embed"
#: Default memory budget for one chunk (forward + backward activations), when none is given:
#: half the free GPU memory on CUDA, this many bytes elsewhere.
DEFAULT_CPU_BUDGET = 2 * 1024**3


@dataclass
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
        completeness: ``[batch, layer]``: ``scores - baseline_scores - sum_i attributions``.
        embedding_completeness: input path only, ``[batch]``: ``F(x) - F(x')`` minus the
            integrated gradients of the embedding (the path integral's numerical error).
    """

    attributions: Tensor
    layers: list[int]
    scores: Float[Tensor, " batch"]
    baseline_scores: Float[Tensor, "batch layer"]
    completeness: Float[Tensor, "batch layer"]
    path: str
    neurons: str
    aggregate: str
    target: Target
    method: str
    n_steps: int
    embedding_completeness: Float[Tensor, " batch"] | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.attributions.shape[0]

    def per_neuron(self) -> Float[Tensor, "batch layer d_mlp"]:
        """Attributions summed over positions (or parts): one value per example and neuron."""
        a = self.attributions
        return a if a.dim() == 3 else a.sum(2)

    def completeness_error(self) -> float:
        """Largest ``|completeness|`` relative to the largest ``|F(x) - F(baseline)|``; on the
        input path the embedding's (see the module doc for why per-layer sums differ there)."""
        delta = self.embedding_completeness if self.path == "input" else self.completeness
        scale = (self.scores[:, None] - self.baseline_scores).abs().max().clamp_min(1e-12)
        return float(delta.abs().max() / scale)

    def frame(self) -> pd.DataFrame:
        """Long form: one row per (example, layer, neuron), attributions summed over positions."""
        per = self.per_neuron()
        b, n_layers, d = per.shape
        index = pd.MultiIndex.from_product(
            [range(b), self.layers, range(d)], names=["example", "layer", "neuron"]
        )
        return pd.DataFrame({"attribution": per.reshape(-1).numpy()}, index=index).reset_index()


# ---------------------------------------------------------------------- shared set-up
@dataclass
class _Setup:
    path: str
    layers: list[int]
    names: list[str]
    neurons: str
    rule: IntegrationRule
    target: Target
    aggregate: str
    activation_baseline: str
    batch: CrossEncoderBatch
    base: CrossEncoderBatch
    hooks: Any


def _setup(
    model: Any,
    batch: CrossEncoderBatch,
    *,
    path: str,
    layers: int | Sequence[int] | None,
    neurons: str,
    target: Target | str,
    baseline: str | CrossEncoderBatch,
    activation_baseline: str,
    method: str,
    n_steps: int,
    aggregate: str,
    hooks: Any,
) -> _Setup:
    if not isinstance(batch, CrossEncoderBatch):
        raise ValueError(f"batch must be a CrossEncoderBatch (model.encode(...)), got {batch!r}")
    if len(batch) == 0:
        raise ValueError("empty batch: pass at least one (query, document) pair")
    if path not in PATHS:
        raise ValueError(f"unknown path {path!r}: choose 'input' (conductance) or 'activation'")
    if neurons not in ("post", "pre"):
        raise ValueError(f"unknown neurons {neurons!r}: use 'post' (after GELU) or 'pre'")
    if aggregate not in AGGREGATES:
        raise ValueError(f"unknown aggregate {aggregate!r}: choose one of {AGGREGATES}")
    if activation_baseline not in ("zero", "input"):
        raise ValueError(
            f"unknown activation_baseline {activation_baseline!r}: use 'zero' or 'input'"
        )
    layer_list = check_layers(model, layers)
    batch = batch.to(model.cfg.device)
    base = baseline_batch(model, batch, baseline)
    return _Setup(
        path=path,
        layers=layer_list,
        names=[f"blocks.{layer}.mlp.hook_{neurons}" for layer in layer_list],
        neurons=neurons,
        rule=integration_rule(method, n_steps),
        target=check_target(model, target),
        aggregate=aggregate,
        activation_baseline=activation_baseline,
        batch=batch,
        base=base,
        hooks=hooks,
    )


def _user_hooks(hooks: Any, batch: CrossEncoderBatch) -> list:
    if hooks is None:
        return []
    return list(hooks(batch)) if callable(hooks) else list(hooks)


def _forward(
    model: Any, batch: CrossEncoderBatch, hooks: list, target: Target
) -> Float[Tensor, " rows"]:
    with model.hooks(fwd_hooks=hooks):
        logits = model(batch, return_type="logits")
    return target_from_logits(model, logits, target)


def _autocast(model: Any, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    if dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"autocast dtype must be torch.bfloat16 or torch.float16, got {dtype}")
    return torch.autocast(device_type=torch.device(model.cfg.device).type, dtype=dtype)


def _clean_pass(
    model: Any, batch: CrossEncoderBatch, s: _Setup, *, embed: bool = False
) -> tuple[Tensor, list[Tensor], Tensor | None]:
    """``F``, the activations of ``s.names`` and (optionally) the embedding, without gradients."""
    caught: dict[str, Tensor] = {}

    def catch(act: Tensor, hook: Any) -> None:
        caught[hook.name] = act.detach()

    names = s.names + ([EMBEDDING_HOOK] if embed else [])
    with torch.no_grad():
        f = _forward(
            model, batch, _user_hooks(s.hooks, batch) + [(n, catch) for n in names], s.target
        )
    return f.float(), [caught[n].float() for n in s.names], caught.get(EMBEDDING_HOOK)


def _aggregate(
    attr: Float[Tensor, "layer len d_mlp"], parts: Tensor, how: str, width: int
) -> Tensor:
    if how == "sequence":
        return attr.sum(1)
    if how == "part":
        onehot = torch.stack([parts == int(p) for p in PARTS], dim=-1).to(attr)  # [len, 5]
        return torch.einsum("lpd,pk->lkd", attr, onehot)
    out = attr.new_zeros(attr.shape[0], width, attr.shape[2])
    out[:, : attr.shape[1]] = attr
    return out


def _output_shape(s: _Setup, model: Any) -> tuple[int, ...]:
    b, width, n, d = len(s.batch), s.batch.input_ids.shape[1], len(s.layers), model.cfg.d_mlp
    return {"sequence": (b, n, d), "part": (b, n, len(PARTS), d), "position": (b, n, width, d)}[
        s.aggregate
    ]


def rows_for_memory(
    model: Any, seq_len: int, budget_bytes: int, *, bytes_per_value: int = 4
) -> int:
    """How many rows (sequences of ``seq_len``) one forward + backward fits in ``budget_bytes``.

    A rough upper estimate of the activations autograd keeps per row and layer:
    ``seq_len * (12 d_model + 4 d_mlp + 3 n_heads seq_len)`` values.
    """
    cfg = model.cfg
    per_layer = seq_len * (12 * cfg.d_model + 4 * cfg.d_mlp + 3 * cfg.n_heads * seq_len)
    per_row = bytes_per_value * cfg.n_layers * per_layer
    return max(1, int(budget_bytes // per_row))


def _max_batch(
    model: Any, seq_len: int, max_batch: int | None, memory_budget: int | None, autocast: Any
) -> int:
    if max_batch is not None and memory_budget is not None:
        raise ValueError("give max_batch (rows) or memory_budget (bytes), not both")
    if max_batch is not None:
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch must be a positive int, got {max_batch!r}")
        return max_batch
    if memory_budget is None:
        device = torch.device(model.cfg.device)
        if device.type == "cuda":
            memory_budget = torch.cuda.mem_get_info(device)[0] // 2
        else:
            memory_budget = DEFAULT_CPU_BUDGET
    return rows_for_memory(model, seq_len, memory_budget, bytes_per_value=2 if autocast else 4)


# ---------------------------------------------------------------------- batched kernel
def neuron_integrated_gradients(
    model: Any,
    batch: CrossEncoderBatch,
    *,
    path: PathFamily = "input",
    layers: int | Sequence[int] | None = None,
    neurons: NeuronSite = "post",
    target: Target | str = "score",
    baseline: str | CrossEncoderBatch = "pad",
    activation_baseline: ActivationBaseline = "zero",
    method: str = "riemann_right",
    n_steps: int = 50,
    aggregate: Aggregate = "sequence",
    max_batch: int | None = None,
    memory_budget: int | None = None,
    autocast: torch.dtype | None = None,
    hooks: HooksArg = None,
) -> NeuronAttributions:
    """Neuron integrated gradients of FFN neurons (see the module doc for both path formulas).

    Args:
        model: a :class:`mechir.HookedCrossEncoder`.
        batch: the pairs to explain.
        path: ``"input"`` (conductance, the default) or ``"activation"``.
        layers: layers to attribute (None: all).
        neurons: ``"post"`` (``mlp.hook_post``, after GELU) or ``"pre"`` (``mlp.hook_pre``).
        target: ``"score"`` or ``"kind:label"`` (see :class:`Target`).
        baseline: baseline input (see :func:`mechir.attribution.baseline_batch`).
        activation_baseline: activation path: ``a' = 0`` or the baseline input's activation.
        method, n_steps: integration rule (:func:`mechir.attribution.integration_rule`).
        aggregate: ``"sequence"`` (sum over tokens), ``"part"`` (per part) or ``"position"``.
        max_batch: rows (sequences) per forward/backward; default from ``memory_budget``.
        memory_budget: bytes for one chunk's activations (default: half the free GPU memory,
            or 2 GiB on CPU), see :func:`rows_for_memory`.
        autocast: ``torch.bfloat16`` / ``torch.float16`` to run the model under autocast;
            gradients are accumulated in float32 either way and ``completeness`` shows the error.
        hooks: extra hooks (list, or ``sub_batch -> list``) active in every pass, before the
            attribution's own. On the activation path each forward starts with one example and
            grows to its interpolated rows at the attributed layers, so hooks after that point
            see more rows than the batch they were built for and must broadcast over rows.

    Returns:
        :class:`NeuronAttributions` with completeness.
    """
    s = _setup(
        model,
        batch,
        path=path,
        layers=layers,
        neurons=neurons,
        target=target,
        baseline=baseline,
        activation_baseline=activation_baseline,
        method=method,
        n_steps=n_steps,
        aggregate=aggregate,
        hooks=hooks,
    )
    rows = _max_batch(model, s.batch.input_ids.shape[1], max_batch, memory_budget, autocast)
    ac = _autocast(model, autocast)
    if path == "input":
        return _input_path(model, s, rows, ac)
    return _activation_path(model, s, rows, ac)


class _Conductance:
    """Per-example running sums of the cell formula, fed path point by path point in order."""

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
    model: Any, s: _Setup, rows: CrossEncoderBatch, embeddings: Tensor, ac: Any
) -> tuple[list[Tensor], list[Tensor], Tensor]:
    """One forward + backward of ``rows`` with their embedding output set to ``embeddings``:
    the activations of every attributed layer, ``dF/da`` of each and ``dF/de`` (float32)."""
    leaf = embeddings.detach().requires_grad_(True)
    caught: dict[str, Tensor] = {}
    hooks = _user_hooks(s.hooks, rows) + [(EMBEDDING_HOOK, _embedding_hook(leaf))]
    hooks += [(name, _catch_hook(caught)) for name in s.names]
    with torch.enable_grad():
        with ac:
            f = _forward(model, rows, hooks, s.target)
        acts = [caught[name] for name in s.names]
        grads = torch.autograd.grad(f.sum(), [leaf, *acts])
    return [a.detach().float() for a in acts], [g.float() for g in grads[1:]], grads[0].float()


def _input_path(model: Any, s: _Setup, max_batch: int, ac: Any) -> NeuronAttributions:
    cond = _Conductance(s.rule)
    row_points = cond.needs_row()
    points32 = cond.points.to(torch.float32)
    last_point = len(cond.points) - 1
    n_rows = len(row_points)
    group_size = max(1, max_batch // max(1, n_rows))
    out = torch.zeros(_output_shape(s, model), dtype=torch.float32)
    f_x = torch.zeros(len(s.batch))
    f_base = torch.zeros(len(s.batch))
    emb_ig = torch.zeros(len(s.batch))
    device = s.batch.device
    for start in range(0, len(s.batch), group_size):
        ex = list(range(start, min(start + group_size, len(s.batch))))
        gb, gbase = s.batch[ex], s.base[ex]
        with ac:
            fx, acts_x, emb_x = _clean_pass(model, gb, s, embed=True)
            fb, acts_b, emb_b = _clean_pass(model, gbase, s, embed=True)
        f_x[ex], f_base[ex] = fx.cpu(), fb.cpu()
        lengths = gb.lengths.tolist()
        states = [
            cond.start([a[i, : lengths[i]] for a in acts_b], model.cfg.d_model, lengths[i])
            for i in range(len(ex))
        ]
        rows = [(i, p) for i in range(len(ex)) for p in row_points]
        for c in range(0, len(rows), max_batch):
            chunk = rows[c : c + max_batch]
            who = torch.tensor([i for i, _ in chunk], device=device)
            alpha = points32[[p for _, p in chunk]].to(device)[:, None, None]
            rb = gb[who]
            width = rb.input_ids.shape[1]
            e0, e1 = emb_b[who, :width].float(), emb_x[who, :width].float()
            acts, g_acts, g_emb = _input_chunk(model, s, rb, e0 + alpha * (e1 - e0), ac)
            for r, (i, p) in enumerate(chunk):
                n_tok = lengths[i]
                cond.feed(
                    states[i],
                    p,
                    [a[r, :n_tok] for a in acts],
                    [g[r, :n_tok] for g in g_acts],
                    g_emb[r, :n_tok],
                )
        for i, e in enumerate(ex):
            n_tok = lengths[i]
            if cond.break_of[last_point] >= 0 and last_point not in row_points:
                cond.feed(states[i], last_point, [a[i, :n_tok] for a in acts_x], None, None)
            attr = torch.stack(states[i]["attr"]).cpu()
            out[e] = _aggregate(attr, gb.parts[i, :n_tok].cpu(), s.aggregate, out.shape[-2])
            diff = (emb_x[i, :n_tok] - emb_b[i, :n_tok]).float()
            emb_ig[e] = float((diff * states[i]["emb"]).sum())
    return _result(s, out, f_x, f_base[:, None].expand(-1, len(s.layers)), emb_ig)


def _result(
    s: _Setup,
    out: Tensor,
    f_x: Tensor,
    f_base: Tensor,
    emb_ig: Tensor | None,
) -> NeuronAttributions:
    totals = out.flatten(2).sum(-1) if out.dim() > 3 else out.sum(-1)
    completeness = f_x[:, None] - f_base - totals
    embedding = None if emb_ig is None else f_x - f_base[:, 0] - emb_ig
    return NeuronAttributions(
        attributions=out,
        layers=list(s.layers),
        scores=f_x,
        baseline_scores=f_base.contiguous(),
        completeness=completeness,
        path=s.path,
        neurons=s.neurons,
        aggregate=s.aggregate,
        target=s.target,
        method=s.rule.method,
        n_steps=s.rule.n_steps,
        embedding_completeness=embedding,
        meta={"activation_baseline": s.activation_baseline} if s.path == "activation" else {},
    )


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
    s: _Setup, rows: list[tuple[int, float]] | None, a_b: list[Tensor], leaves: list[Tensor]
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


def _activation_path(model: Any, s: _Setup, max_batch: int, ac: Any) -> NeuronAttributions:
    out = torch.zeros(_output_shape(s, model), dtype=torch.float32)
    f_x = torch.zeros(len(s.batch))
    f_zero = torch.zeros(len(s.batch), len(s.layers))
    alphas, weights = s.rule.alphas.tolist(), s.rule.weights.tolist()
    rows = [(lp, a) for lp in range(len(s.layers)) for a in alphas]  # layer-major
    w = torch.tensor(weights, dtype=torch.float32)
    per_chunk = max(1, max_batch - 1)  # the clean example rides along up to its last layer
    for start in range(0, len(s.batch), max_batch):
        ex = list(range(start, min(start + max_batch, len(s.batch))))
        gb = s.batch[ex]
        with ac:
            fx, acts_x, _ = _clean_pass(model, gb, s)
            if s.activation_baseline == "input":
                _, acts_b, _ = _clean_pass(model, s.base[ex], s)
            else:
                acts_b = [torch.zeros_like(a) for a in acts_x]
        f_x[ex] = fx.cpu()
        for i, e in enumerate(ex):
            one = s.batch[e]
            n_tok = one.input_ids.shape[1]
            a_x = [a[i : i + 1, :n_tok] for a in acts_x]
            a_b = [a[i : i + 1, :n_tok] for a in acts_b]
            with torch.no_grad(), ac:  # F(x with a_l := a'_l), every layer in one forward
                hooks = _user_hooks(s.hooks, one) + _activation_hooks(s, None, a_b, [])
                f_zero[e] = _forward(model, one, hooks, s.target).float().cpu()
            grad_sum = [torch.zeros_like(a[0]) for a in a_x]
            for c in range(0, len(rows), per_chunk):
                chunk = rows[c : c + per_chunk]
                leaves: list[Tensor] = []
                hooks = _user_hooks(s.hooks, one) + _activation_hooks(s, chunk, a_b, leaves)
                with torch.enable_grad():
                    with ac:
                        f = _forward(model, one, hooks, s.target)
                    grads = torch.autograd.grad(f.sum(), leaves)
                for lp, g in zip(sorted({lp for lp, _ in chunk}), grads):
                    k = [alphas.index(a) for p, a in chunk if p == lp]
                    grad_sum[lp] += torch.einsum("r,rpd->pd", w[k].to(g.device), g.float())
            attr = torch.stack([(x[0] - b[0]) * g for x, b, g in zip(a_x, a_b, grad_sum)])
            out[e] = _aggregate(attr.cpu(), one.parts[0].cpu(), s.aggregate, out.shape[-2])
    return _result(s, out, f_x, f_zero, None)


# ---------------------------------------------------------------------- naive reference
def neuron_integrated_gradients_reference(
    model: Any,
    batch: CrossEncoderBatch,
    *,
    path: PathFamily = "input",
    layers: int | Sequence[int] | None = None,
    neurons: NeuronSite = "post",
    target: Target | str = "score",
    baseline: str | CrossEncoderBatch = "pad",
    activation_baseline: ActivationBaseline = "zero",
    method: str = "riemann_right",
    n_steps: int = 50,
    aggregate: Aggregate = "sequence",
    hooks: HooksArg = None,
) -> NeuronAttributions:
    """The naive loop, kept as the oracle of :func:`neuron_integrated_gradients`: for every
    example, every layer and every path point, one forward and one backward on one sequence.
    Same arguments and result (no chunking, no autocast)."""
    s = _setup(
        model,
        batch,
        path=path,
        layers=layers,
        neurons=neurons,
        target=target,
        baseline=baseline,
        activation_baseline=activation_baseline,
        method=method,
        n_steps=n_steps,
        aggregate=aggregate,
        hooks=hooks,
    )
    out = torch.zeros(_output_shape(s, model), dtype=torch.float32)
    n = len(s.layers)
    f_x, f_base, emb_ig = (
        torch.zeros(len(batch)),
        torch.zeros(len(batch), n),
        torch.zeros(len(batch)),
    )
    for e in range(len(s.batch)):
        one, one_base = s.batch[e], s.base[e]
        fx, acts_x, emb_x = _clean_pass(model, one, s, embed=True)
        fb, acts_b, emb_b = _clean_pass(model, one_base, s, embed=True)
        f_x[e] = fx[0]
        attr = []
        for i, name in enumerate(s.names):
            if s.path == "activation":
                base = (
                    acts_b[i] if s.activation_baseline == "input" else torch.zeros_like(acts_x[i])
                )
                a_i, f0 = _reference_activation_layer(model, one, s, name, base)
                f_base[e, i] = f0
            else:
                a_i, ig = _reference_input_layer(model, one, s, name, emb_x, emb_b, i == 0)
                f_base[e, i] = fb[0]
                if i == 0:
                    emb_ig[e] = ig
            attr.append(a_i)
        out[e] = _aggregate(torch.stack(attr).cpu(), one.parts[0].cpu(), s.aggregate, out.shape[-2])
    return _result(s, out, f_x, f_base, emb_ig if s.path == "input" else None)


def _reference_activation_layer(
    model: Any, one: CrossEncoderBatch, s: _Setup, name: str, base: Tensor
) -> tuple[Tensor, float]:
    grad_sum = torch.zeros_like(base[0])
    actual: list[Tensor] = []
    for alpha, w in zip(s.rule.alphas.tolist(), s.rule.weights.tolist()):
        box: dict[str, Tensor] = {}

        def scale(act: Tensor, hook: Any, alpha: float = alpha, box: dict = box) -> Tensor:
            actual.append(act.detach())
            box["h"] = (base + alpha * (act - base)).detach().requires_grad_(True)
            return box["h"]

        with torch.enable_grad():
            f = _forward(model, one, _user_hooks(s.hooks, one) + [(name, scale)], s.target)
            (g,) = torch.autograd.grad(f.sum(), [box["h"]])
        grad_sum += w * g[0].float()

    def at_baseline(act: Tensor, hook: Any) -> Tensor:
        return base.expand_as(act)

    with torch.no_grad():
        f0 = _forward(model, one, _user_hooks(s.hooks, one) + [(name, at_baseline)], s.target)
    return (actual[0][0].float() - base[0]) * grad_sum, float(f0[0])


def _reference_input_layer(
    model: Any,
    one: CrossEncoderBatch,
    s: _Setup,
    name: str,
    emb_x: Tensor,
    emb_b: Tensor,
    with_embedding: bool,
) -> tuple[Tensor, float]:
    """Conductance of one layer: every path point's activation and gradient, then the cell sum.
    With ``with_embedding`` also the embedding's integrated gradients (full backward)."""
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

        fwd = _user_hooks(s.hooks, one) + [(EMBEDDING_HOOK, embed), (name, catch)]
        with torch.enable_grad():
            f = _forward(model, one, fwd, s.target)
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
