"""Composable hook factories ``xxx_hooks(model, *, <what>, <how>) -> Hooks``: each returns
``list[tuple[hook_name, hook_fn]]`` (TransformerLens form); lists compose with ``+`` and run with
``model.run_with_hooks``, ``model.hooks`` or ``model.score(..., hooks=...)``.

Every factory is one intervention on a site (:mod:`mechir.hooks.site`): a hook name template,
the axes of its activation, a selection (layers, heads or neurons, parts, positions) in the one
grammar of :mod:`mechir.selection`, and an action (``mode="zero" | "mean" | "renormalize"``,
``factor=``, or a patch from cached activations). Hooks that depend on the input parts read them
from the batch the model runs on (:func:`running_batch`), so a list is built once and reused for
every batch."""

from mechir.hooks.attention import (
    ALL_DIRECTIONS,
    DIRECTION_GROUPS,
    cumulative_layer_ranges,
    direction_ablation_hooks,
    direction_group,
    direction_label,
    direction_mask,
    sliding_layer_windows,
)
from mechir.hooks.heads import head_knockout_hooks, head_output_means, head_scaling_hooks
from mechir.hooks.means import activation_means
from mechir.hooks.neurons import neuron_ablation_hooks, neuron_means
from mechir.hooks.patch import ActivationSource, activation_source, patch_hooks, tower_source
from mechir.hooks.qk import qk_subspace_ablation_hooks, qk_subspace_projections
from mechir.hooks.site import MODES, SITES, Action, Site, get_site, site_hooks
from mechir.hooks.towers import in_tower, output_patch_hooks
from mechir.running import Hooks, per_forward, running_batch

__all__ = [
    "ALL_DIRECTIONS",
    "DIRECTION_GROUPS",
    "MODES",
    "SITES",
    "Action",
    "ActivationSource",
    "Hooks",
    "Site",
    "activation_means",
    "activation_source",
    "cumulative_layer_ranges",
    "direction_ablation_hooks",
    "direction_group",
    "direction_label",
    "direction_mask",
    "get_site",
    "head_knockout_hooks",
    "head_output_means",
    "head_scaling_hooks",
    "in_tower",
    "output_patch_hooks",
    "tower_source",
    "neuron_ablation_hooks",
    "neuron_means",
    "patch_hooks",
    "per_forward",
    "qk_subspace_ablation_hooks",
    "qk_subspace_projections",
    "running_batch",
    "site_hooks",
    "sliding_layer_windows",
]
