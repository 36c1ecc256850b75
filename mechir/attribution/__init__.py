"""Attribution of cross-encoder relevance to FFN neurons (neuron integrated gradients).

::

    from mechir.attribution import neuron_integrated_gradients
    result = neuron_integrated_gradients(model, batch, path="input", n_steps=50)
    result.attributions        # [batch, layer, d_mlp]
    result.completeness_error()
    result.error               # [batch, layer]: estimated error of the attributions

Modules: ``conductance`` (input path), ``layer_ig`` (activation path), ``result``,
``integration`` (rules), ``neuron_selection`` (top-p% selections), ``accumulate``.
"""

from mechir.attribution.accumulate import (
    AttributionMeans,
    GroupedMeans,
    StreamingMean,
    mean_neuron_attributions,
    pair_batches,
)
from mechir.attribution.baselines import BASELINES, baseline_batch
from mechir.attribution.integration import (
    METHODS,
    IntegrationRule,
    integration_rule,
    parse_method,
)
from mechir.attribution.neuron_selection import (
    NeuronSelection,
    fuse_scores,
    intersect,
    n_selected,
    random_control,
    top_neurons,
)
from mechir.attribution.nig import (
    AGGREGATES,
    PATHS,
    NeuronAttributions,
    neuron_integrated_gradients,
    neuron_integrated_gradients_reference,
    rows_for_memory,
)
from mechir.attribution.pruning import PruningResult, pruning_evaluation
from mechir.attribution.targets import AttributionTarget, parse_target, target_from_logits

__all__ = [
    "AGGREGATES",
    "AttributionMeans",
    "GroupedMeans",
    "NeuronSelection",
    "PruningResult",
    "StreamingMean",
    "fuse_scores",
    "intersect",
    "mean_neuron_attributions",
    "n_selected",
    "pair_batches",
    "pruning_evaluation",
    "random_control",
    "top_neurons",
    "BASELINES",
    "METHODS",
    "PATHS",
    "IntegrationRule",
    "NeuronAttributions",
    "AttributionTarget",
    "baseline_batch",
    "integration_rule",
    "neuron_integrated_gradients",
    "neuron_integrated_gradients_reference",
    "parse_method",
    "parse_target",
    "rows_for_memory",
    "target_from_logits",
]
