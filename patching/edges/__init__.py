"""Edge-level circuits for post- and pre-LayerNorm encoders (see :mod:`patching.edges.engine`)."""

from patching.edges.graph import EdgeGraph, Receiver, Sender, edge_graph
from patching.edges.inputs import EdgeInputs, edge_inputs
from patching.edges.patch import patch_edge_sets, patch_edges, single_edge_scores

__all__ = [
    "EdgeGraph",
    "EdgeInputs",
    "Receiver",
    "Sender",
    "edge_graph",
    "edge_inputs",
    "patch_edge_sets",
    "patch_edges",
    "single_edge_scores",
]
