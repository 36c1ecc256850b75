"""What both neuron-attribution paths share: argument checks, the forward of the target, clean
passes, aggregation over positions, chunk sizing and autocast.

Used by :mod:`mechir.attribution.conductance` (input path) and :mod:`mechir.attribution.layer_ig`
(activation path); not a public module.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from mechir.attribution.baselines import baseline_batch
from mechir.attribution.integration import IntegrationRule, integration_rule
from mechir.attribution.targets import AttributionTarget, check_target, target_from_logits
from mechir.interface import HookedReranker
from mechir.parts import PARTS, CrossEncoderBatch
from mechir.selection import select_layers

PATHS: tuple[str, ...] = ("input", "activation")
AGGREGATES: tuple[str, ...] = ("sequence", "part", "position")
EMBEDDING_HOOK = "hook_full_embed"
#: Default memory budget for one chunk (forward + backward activations), when none is given:
#: half the free GPU memory on CUDA, this many bytes elsewhere.
DEFAULT_CPU_BUDGET = 2 * 1024**3
#: ``n_steps="auto"``: the largest number of path intervals refinement may reach.
DEFAULT_MAX_STEPS = 1024
#: ``n_steps="auto"``: the first grid (intervals); the estimate needs three nested levels.
AUTO_START = 8
#: ``n_steps="auto"`` on the input path: the first grid at which refinement may stop (an estimate
#: from 4 and 8 midpoint cells is too coarse to trust).
AUTO_MIN_GRID = 16


@dataclass
class AttributionSetup:
    """Checked arguments of one attribution call (see :func:`prepare`)."""

    path: str
    layers: list[int]
    names: list[str]
    neurons: str
    rule: IntegrationRule | None  # None: n_steps="auto"
    companion: IntegrationRule | None  # the coarser rule of the error estimate
    target: AttributionTarget
    aggregate: str
    activation_baseline: str
    batch: CrossEncoderBatch
    base: CrossEncoderBatch
    hooks: Any
    rtol: float
    max_steps: int


def companion_rule(rule: IntegrationRule) -> IntegrationRule:
    """The coarser rule whose difference from ``rule`` estimates ``rule``'s error: the same method
    at half the steps (nested, so free, for the Riemann rules with an even ``n_steps``; other
    rules add the coarse rule's points)."""
    coarse = max(1, rule.n_steps // 2)
    if rule.method == "riemann_trapezoid":
        coarse = max(2, (rule.n_steps + 1) // 2)  # odd n_steps: nested nodes
    return integration_rule(rule.method, coarse)


def prepare(
    model: HookedReranker,
    batch: CrossEncoderBatch,
    *,
    path: str,
    layers: int | Sequence[int] | None,
    neurons: str,
    target: AttributionTarget | str,
    baseline: str | CrossEncoderBatch,
    activation_baseline: str,
    method: str | None,
    n_steps: int | str,
    aggregate: str,
    hooks: Any,
    rtol: float = 0.01,
    max_steps: int = DEFAULT_MAX_STEPS,
    error_estimate: bool = True,
) -> AttributionSetup:
    """Check every argument (raising ``ValueError`` with what to do) and build the baseline."""
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
    if not (isinstance(rtol, (int, float)) and 0 < rtol < 1):
        raise ValueError(f"rtol must be in (0, 1), e.g. 0.01 for 1%, got {rtol!r}")
    if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 8:
        raise ValueError(f"max_steps must be an int >= 8, got {max_steps!r}")
    if n_steps == "auto":
        if method not in (None, "auto"):
            raise ValueError(
                f"n_steps='auto' refines its own nested rule (midpoint cells on the input "
                f"path, Romberg on the activation path): leave method unset or 'auto', got "
                f"method={method!r}"
            )
        rule = companion = None
    else:
        if method == "auto":
            raise ValueError("method='auto' goes with n_steps='auto' (give both or neither)")
        rule = integration_rule(method or "riemann_right", n_steps)  # type: ignore[arg-type]
        companion = companion_rule(rule) if error_estimate and rule.n_steps > 1 else None
    layer_list = select_layers(model, layers)
    batch = batch.to(model.cfg.device)
    base = baseline_batch(model, batch, baseline)
    return AttributionSetup(
        path=path,
        layers=layer_list,
        names=[f"blocks.{layer}.mlp.hook_{neurons}" for layer in layer_list],
        neurons=neurons,
        rule=rule,
        companion=companion,
        target=check_target(model, target),
        aggregate=aggregate,
        activation_baseline=activation_baseline,
        batch=batch,
        base=base,
        hooks=hooks,
        rtol=float(rtol),
        max_steps=max_steps,
    )


def user_hooks(hooks: Any, batch: CrossEncoderBatch) -> list:
    """The caller's extra hooks (a list, or ``batch -> list``) for ``batch``."""
    if hooks is None:
        return []
    return list(hooks(batch)) if callable(hooks) else list(hooks)


def forward(
    model: HookedReranker, batch: CrossEncoderBatch, hooks: list, target: AttributionTarget
) -> Float[Tensor, " rows"]:
    """``F`` of every row of ``batch`` under ``hooks``."""
    with model.hooks(fwd_hooks=hooks):
        logits = model(batch, return_type="logits")
    return target_from_logits(model, logits, target)


def autocast_context(
    model: HookedReranker, dtype: torch.dtype | None
) -> contextlib.AbstractContextManager:
    """``torch.autocast`` to ``dtype`` on the model's device (None: no autocast)."""
    if dtype is None:
        return contextlib.nullcontext()
    if dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"autocast dtype must be torch.bfloat16 or torch.float16, got {dtype}")
    return torch.autocast(device_type=torch.device(model.cfg.device).type, dtype=dtype)


def check_finite(value: Tensor, what: str, batch_index: Sequence[int] | None = None) -> None:
    """Raise ``ValueError`` naming the examples where ``value`` (``[batch, ...]``) is NaN/inf."""
    bad = ~torch.isfinite(value.reshape(value.shape[0], -1)).all(-1)
    if bool(bad.any()):
        rows = bad.nonzero().flatten().tolist()
        who = [batch_index[r] for r in rows] if batch_index is not None else rows
        raise ValueError(
            f"non-finite values (NaN/inf) in {what} of example(s) {who}: the attributions would "
            "all be NaN; check the model weights (e.g. load_cross_encoder on a clean checkpoint), "
            "the hooks and the inputs"
        )


def clean_pass(
    model: HookedReranker, batch: CrossEncoderBatch, s: AttributionSetup, *, embed: bool = False
) -> tuple[Tensor, list[Tensor], Tensor | None]:
    """``F``, the activations of ``s.names`` and (optionally) the embedding, without gradients;
    raises if any of them is not finite."""
    caught: dict[str, Tensor] = {}

    def catch(act: Tensor, hook: Any) -> None:
        caught[hook.name] = act.detach()

    names = s.names + ([EMBEDDING_HOOK] if embed else [])
    with torch.no_grad():
        f = forward(
            model, batch, user_hooks(s.hooks, batch) + [(n, catch) for n in names], s.target
        )
    emb = caught.get(EMBEDDING_HOOK)
    if emb is not None:
        check_finite(emb * batch.attention_mask[..., None], f"the embedding ({EMBEDDING_HOOK})")
    for name in s.names:
        check_finite(caught[name] * batch.attention_mask[..., None], name)
    check_finite(f[:, None], "the target F")
    return f.float(), [caught[n].float() for n in s.names], emb


def aggregate_positions(
    attr: Float[Tensor, "layer len d_mlp"], parts: Tensor, how: str, width: int
) -> Tensor:
    """Sum over positions (``"sequence"``), per part (``"part"``) or pad to ``width``."""
    if how == "sequence":
        return attr.sum(1)
    if how == "part":
        onehot = torch.stack([parts == int(p) for p in PARTS], dim=-1).to(attr)  # [len, 5]
        return torch.einsum("lpd,pk->lkd", attr, onehot)
    out = attr.new_zeros(attr.shape[0], width, attr.shape[2])
    out[:, : attr.shape[1]] = attr
    return out


def output_shape(s: AttributionSetup, model: HookedReranker) -> tuple[int, ...]:
    """Shape of ``NeuronAttributions.attributions`` for this call."""
    b, width, n, d = len(s.batch), s.batch.input_ids.shape[1], len(s.layers), model.cfg.d_mlp
    return {"sequence": (b, n, d), "part": (b, n, len(PARTS), d), "position": (b, n, width, d)}[
        s.aggregate
    ]


def rows_for_memory(
    model: HookedReranker,
    seq_len: int,
    budget_bytes: int,
    *,
    bytes_per_value: int = 4,
    backward: bool = True,
) -> int:
    """How many rows (sequences of ``seq_len``) one forward + backward fits in ``budget_bytes``.

    A rough upper estimate of the activations autograd keeps per row and layer:
    ``seq_len * (12 d_model + 4 d_mlp + 3 n_heads seq_len)`` values, in every layer; with
    ``backward=False`` (a forward pass without gradients, e.g. scoring) one layer's are alive at
    a time, so the cost of one layer bounds a row.
    """
    cfg = model.cfg
    per_layer = seq_len * (12 * cfg.d_model + 4 * cfg.d_mlp + 3 * cfg.n_heads * seq_len)
    per_row = bytes_per_value * (cfg.n_layers if backward else 1) * per_layer
    return max(1, int(budget_bytes // per_row))


def default_memory_budget(model: HookedReranker) -> int:
    """Bytes one chunk's activations may take when no budget is given: half the free memory of
    the model's CUDA device, :data:`DEFAULT_CPU_BUDGET` elsewhere."""
    device = torch.device(model.cfg.device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] // 2
    return DEFAULT_CPU_BUDGET


def max_batch_rows(
    model: HookedReranker,
    seq_len: int,
    max_batch: int | None,
    memory_budget: int | None,
    autocast: Any,
) -> int:
    """Rows per forward/backward: ``max_batch``, or what ``memory_budget`` allows."""
    if max_batch is not None and memory_budget is not None:
        raise ValueError("give max_batch (rows) or memory_budget (bytes), not both")
    if max_batch is not None:
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch must be a positive int, got {max_batch!r}")
        return max_batch
    if memory_budget is None:
        memory_budget = default_memory_budget(model)
    return rows_for_memory(model, seq_len, memory_budget, bytes_per_value=2 if autocast else 4)
