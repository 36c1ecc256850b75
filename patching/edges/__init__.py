"""Edge-level circuits for post- and pre-LayerNorm encoders (see :mod:`patching.edges.engine`).

One stage per module; data passes down, each stage taking the previous stages' objects and never
calling back up:

* :mod:`~patching.edges.graph`: the model's senders, receivers and edges -> :class:`EdgeGraph`
  (edge labels, edge sets as masks).
* :mod:`~patching.edges.sources`: clean and corrupted inputs, checked -> :class:`EdgeInputs`;
  per group of pairs, their rows in one batch and the source-minus-current contributions
  (``Lockstep``); query-word corruption (:func:`replace_query_words`); metrics as
  ``[unit, pair]`` maps (:func:`metric_matrix`).
* :mod:`~patching.edges.engine`: graph + sources -> forward passes with edges: the tracked walk
  (every sender's contribution), the plain forward (receiver inputs for gradients), the
  ``"mean"`` source's per-part means, exact patching of edge sets -> scores
  (:func:`patch_edge_sets`, :func:`patch_edges`).
* :mod:`~patching.edges.attribution`: graph + sources + engine -> :class:`EdgeScores` (EAP,
  EAP-IG, and exact single edges: :func:`edge_attribution`, :func:`single_edge_scores`).
* :mod:`~patching.edges.circuits`: :class:`EdgeScores` + engine -> :class:`FaithfulnessCurve`
  (top-n and greedy circuits, each checked by exact patching; CPR/CMD).
* :mod:`~patching.edges.drawing`: graph + circuit (+ :class:`EdgeScores`) -> SVG.

:mod:`~patching.edges.reference` is the naive oracle beside the fast path (the model's own
forward with hooks; it shares only the graph and the sources with it).
"""

from patching.edges.attribution import EdgeScores, edge_attribution, n_edges_of, single_edge_scores
from patching.edges.circuits import (
    DEFAULT_BUDGETS,
    FaithfulnessCurve,
    budget_edges,
    circuit_metric,
    cpr_cmd,
    faithfulness,
    faithfulness_curve,
    greedy_circuit,
    heads_in,
)
from patching.edges.drawing import circuit_svg
from patching.edges.engine import patch_edge_sets, patch_edges
from patching.edges.graph import EdgeGraph, Receiver, Sender, edge_graph
from patching.edges.sources import EdgeInputs, edge_inputs, metric_matrix, replace_query_words

__all__ = [
    "DEFAULT_BUDGETS",
    "EdgeGraph",
    "EdgeInputs",
    "EdgeScores",
    "FaithfulnessCurve",
    "Receiver",
    "Sender",
    "budget_edges",
    "circuit_metric",
    "circuit_svg",
    "cpr_cmd",
    "edge_attribution",
    "edge_graph",
    "edge_inputs",
    "faithfulness",
    "faithfulness_curve",
    "greedy_circuit",
    "heads_in",
    "metric_matrix",
    "n_edges_of",
    "patch_edge_sets",
    "patch_edges",
    "replace_query_words",
    "single_edge_scores",
]
