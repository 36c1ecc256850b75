"""Composable hook factories ``xxx_hooks(model, *, <what>, <how>) -> Hooks``: each returns
``list[tuple[hook_name, hook_fn]]`` (TransformerLens form); lists compose with ``+`` and run with
``model.run_with_hooks``, ``model.hooks`` or ``model.score(..., hooks=...)``. Hooks that depend on
the input parts read them from the batch the model runs on (:func:`running_batch`), so a list is
built once and reused for every batch."""

from mechir.hooks.ablation import activation_means
from mechir.hooks.attention import (
    ALL_DIRECTIONS,
    DIRECTION_GROUPS,
    cumulative_layer_ranges,
    direction_ablation,
    direction_ablation_hooks,
    direction_group,
    direction_label,
    direction_mask,
    sliding_layer_windows,
)
from mechir.hooks.heads import head_knockout_hooks, head_output_means
from mechir.hooks.neurons import neuron_ablation_hooks, neuron_means
from mechir.running import Hooks, per_forward, running_batch

__all__ = [
    "ALL_DIRECTIONS",
    "DIRECTION_GROUPS",
    "activation_means",
    "cumulative_layer_ranges",
    "Hooks",
    "direction_ablation",
    "direction_ablation_hooks",
    "direction_group",
    "direction_label",
    "direction_mask",
    "head_knockout_hooks",
    "head_output_means",
    "neuron_ablation_hooks",
    "neuron_means",
    "per_forward",
    "running_batch",
    "sliding_layer_windows",
]
