"""Edge-level circuits for post- and pre-LayerNorm encoders (see :mod:`patching.edges.engine`)."""

from patching.edges.attribution import EdgeScores, edge_attribution, n_edges_of
from patching.edges.circuits import (
    DEFAULT_BUDGETS,
    FaithfulnessCurve,
    circuit_metric,
    cpr_cmd,
    faithfulness_curve,
    greedy_circuit,
    heads_in,
)
from patching.edges.drawing import circuit_svg
from patching.edges.graph import EdgeGraph, Receiver, Sender, edge_graph
from patching.edges.inputs import EdgeInputs, edge_inputs
from patching.edges.metrics import metric_matrix
from patching.edges.patch import patch_edge_sets, patch_edges, single_edge_scores

__all__ = [
    "DEFAULT_BUDGETS",
    "EdgeGraph",
    "EdgeInputs",
    "EdgeScores",
    "FaithfulnessCurve",
    "Receiver",
    "Sender",
    "circuit_metric",
    "circuit_svg",
    "cpr_cmd",
    "edge_attribution",
    "edge_graph",
    "edge_inputs",
    "faithfulness_curve",
    "greedy_circuit",
    "heads_in",
    "metric_matrix",
    "n_edges_of",
    "patch_edge_sets",
    "patch_edges",
    "single_edge_scores",
]
