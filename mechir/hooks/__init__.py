"""Composable hook factories: each returns ``list[tuple[hook_name, hook_fn]]`` (TransformerLens
form); lists compose with ``+`` and run with ``model.run_with_hooks``, ``model.hooks`` or
``model.score(..., hooks=...)``."""

from mechir.hooks.ablation import activation_means
from mechir.hooks.attention import (
    ALL_DIRECTIONS,
    DIRECTION_GROUPS,
    cumulative_layer_ranges,
    direction_ablation,
    direction_group,
    direction_label,
    direction_mask,
    sliding_layer_windows,
)
from mechir.hooks.heads import head_knockout_hooks, head_output_means
from mechir.hooks.neurons import neuron_ablation_hooks, neuron_means

__all__ = [
    "ALL_DIRECTIONS",
    "DIRECTION_GROUPS",
    "activation_means",
    "cumulative_layer_ranges",
    "direction_ablation",
    "direction_group",
    "direction_label",
    "direction_mask",
    "head_knockout_hooks",
    "head_output_means",
    "neuron_ablation_hooks",
    "neuron_means",
    "sliding_layer_windows",
]
