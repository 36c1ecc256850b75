"""Neuron integrated gradients (NIG) of FFN neurons: the public entry points.

Neurons are the FFN activations ``a_l = blocks.{l}.mlp.hook_post`` (post-GELU; ``hook_pre`` with
``neurons="pre"``), one per (layer, position, neuron). ``F`` is the
:class:`~mechir.attribution.targets.AttributionTarget` (by default the model's relevance score,
``model.score_type``). Two algorithms, one room each, captum-style:

* ``path="input"``: neuron conductance, :mod:`mechir.attribution.conductance`;
* ``path="activation"``: layer integrated gradients, :mod:`mechir.attribution.layer_ig`.

Rules come from :mod:`mechir.attribution.integration`; the result and its error estimate from
:mod:`mechir.attribution.result`. :func:`neuron_integrated_gradients` batches (examples x path
points, and layers on the activation path) in chunks of ``max_batch`` rows;
:func:`neuron_integrated_gradients_reference` is the loop a researcher writes first (one example,
one layer, one path point per forward and backward) and is kept as the oracle.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

from mechir.attribution.common import (
    AGGREGATES,
    DEFAULT_CPU_BUDGET,
    DEFAULT_MAX_STEPS,
    EMBEDDING_HOOK,
    PATHS,
    aggregate_positions,
    autocast_context,
    clean_pass,
    max_batch_rows,
    output_shape,
    prepare,
    rows_for_memory,
)
from mechir.attribution.conductance import conductance_attributions, conductance_reference_layer
from mechir.attribution.layer_ig import layer_ig_attributions, layer_ig_reference_layer
from mechir.attribution.result import NeuronAttributions, make_result
from mechir.attribution.targets import AttributionTarget
from mechir.interface import HookedReranker
from mechir.models.hooked import HooksArg
from mechir.parts import CrossEncoderBatch

PathFamily = Literal["input", "activation"]
NeuronSite = Literal["post", "pre"]
Aggregate = Literal["sequence", "part", "position"]
ActivationBaseline = Literal["zero", "input"]

__all__ = [
    "AGGREGATES",
    "DEFAULT_CPU_BUDGET",
    "EMBEDDING_HOOK",
    "PATHS",
    "NeuronAttributions",
    "neuron_integrated_gradients",
    "neuron_integrated_gradients_reference",
    "rows_for_memory",
]


def neuron_integrated_gradients(
    model: HookedReranker,
    batch: CrossEncoderBatch,
    *,
    path: PathFamily = "input",
    layers: int | Sequence[int] | None = None,
    neurons: NeuronSite = "post",
    target: AttributionTarget | str = "score",
    baseline: str | CrossEncoderBatch = "pad",
    activation_baseline: ActivationBaseline = "zero",
    method: str | None = None,
    n_steps: int | Literal["auto"] = 50,
    rtol: float = 0.01,
    max_steps: int = DEFAULT_MAX_STEPS,
    error_estimate: bool = True,
    aggregate: Aggregate = "sequence",
    max_batch: int | None = None,
    memory_budget: int | None = None,
    autocast: torch.dtype | None = None,
    hooks: HooksArg = None,
) -> NeuronAttributions:
    """Neuron integrated gradients of FFN neurons, with an estimate of their numerical error.

    Args:
        model: a :class:`mechir.HookedCrossEncoder`.
        batch: the pairs to explain.
        path: ``"input"`` (conductance, the default) or ``"activation"`` (layer IG).
        layers: layers to attribute (None: all).
        neurons: ``"post"`` (``mlp.hook_post``, after GELU) or ``"pre"`` (``mlp.hook_pre``).
        target: ``"score"`` or ``"kind:label"`` (see :class:`AttributionTarget`).
        baseline: baseline input (see :func:`mechir.attribution.baseline_batch`).
        activation_baseline: activation path: ``a' = 0`` or the baseline input's activation.
        method, n_steps: a fixed rule (:func:`mechir.attribution.integration_rule`; default
            ``riemann_right``, the paper's recipe, at 50 steps), or ``n_steps="auto"``: nested
            refinement until the estimated error is below ``rtol`` (nested midpoint cells on the
            input path, Romberg on the activation path).
        rtol: ``"auto"``: target of ``max_l error[b, l] / max_i |A_i|`` per example.
        max_steps: ``"auto"``: the most path intervals refinement may reach (then it warns).
        error_estimate: fixed rules: also evaluate the half-step rule for ``result.error`` (free
            for the Riemann rules with an even ``n_steps``).
        aggregate: ``"sequence"`` (sum over tokens), ``"part"`` (per part) or ``"position"``.
        max_batch: rows (sequences) per forward/backward; default from ``memory_budget``.
        memory_budget: bytes for one chunk's activations (default: half the free GPU memory,
            or 2 GiB on CPU), see :func:`rows_for_memory`.
        autocast: ``torch.bfloat16`` / ``torch.float16`` to run the model under autocast;
            gradients are accumulated in float32 either way and the completeness shows the error.
        hooks: extra hooks (list, or ``sub_batch -> list``) active in every pass, before the
            attribution's own. On the activation path each forward starts with one example and
            grows to its interpolated rows at the attributed layers, so hooks after that point
            see more rows than the batch they were built for and must broadcast over rows.

    Returns:
        :class:`NeuronAttributions` with completeness, ``error`` (per example and layer),
        ``coarse`` (for :meth:`NeuronAttributions.selection_overlap`) and ``n_points``.

    Raises:
        ValueError: bad arguments, or NaN/inf in the embedding, activations, target or result.
    """
    s = prepare(
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
        rtol=rtol,
        max_steps=max_steps,
        error_estimate=error_estimate,
    )
    rows = max_batch_rows(model, s.batch.input_ids.shape[1], max_batch, memory_budget, autocast)
    ac = autocast_context(model, autocast)
    if path == "input":
        return conductance_attributions(model, s, rows, ac)
    return layer_ig_attributions(model, s, rows, ac)


def neuron_integrated_gradients_reference(
    model: HookedReranker,
    batch: CrossEncoderBatch,
    *,
    path: PathFamily = "input",
    layers: int | Sequence[int] | None = None,
    neurons: NeuronSite = "post",
    target: AttributionTarget | str = "score",
    baseline: str | CrossEncoderBatch = "pad",
    activation_baseline: ActivationBaseline = "zero",
    method: str | None = None,
    n_steps: int = 50,
    aggregate: Aggregate = "sequence",
    hooks: HooksArg = None,
) -> NeuronAttributions:
    """The naive loop, kept as the oracle of :func:`neuron_integrated_gradients`: for every
    example, every layer and every path point, one forward and one backward on one sequence.
    Same arguments and result for a fixed rule (no chunking, no autocast, no error estimate)."""
    if n_steps == "auto":
        raise ValueError("the reference takes a fixed rule: give method and an int n_steps")
    s = prepare(
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
        error_estimate=False,
    )
    out = torch.zeros(output_shape(s, model), dtype=torch.float32)
    n = len(s.layers)
    f_x, f_base, emb_ig = (
        torch.zeros(len(batch)),
        torch.zeros(len(batch), n),
        torch.zeros(len(batch)),
    )
    for e in range(len(s.batch)):
        one, one_base = s.batch[e], s.base[e]
        fx, acts_x, emb_x = clean_pass(model, one, s, embed=True)
        fb, acts_b, emb_b = clean_pass(model, one_base, s, embed=True)
        f_x[e] = fx[0]
        attr = []
        for i, name in enumerate(s.names):
            if s.path == "activation":
                zero = torch.zeros_like(acts_x[i])
                base = acts_b[i] if s.activation_baseline == "input" else zero
                a_i, f0 = layer_ig_reference_layer(model, one, s, name, base)
                f_base[e, i] = f0
            else:
                a_i, ig = conductance_reference_layer(model, one, s, name, emb_x, emb_b, i == 0)
                f_base[e, i] = fb[0]
                if i == 0:
                    emb_ig[e] = ig
            attr.append(a_i)
        parts = one.parts[0].cpu()
        out[e] = aggregate_positions(torch.stack(attr).cpu(), parts, s.aggregate, out.shape[-2])
    return make_result(
        s,
        out,
        f_x,
        f_base,
        emb_ig if s.path == "input" else None,
        method=s.rule.method,
        n_steps=s.rule.n_steps,
        coarse=None,
        error=None,
        n_points=torch.full((len(batch),), s.rule.n_steps),
    )
