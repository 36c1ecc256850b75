"""Deprecated: renamed :mod:`mechir.attribution.neuron_selection` (so that it is not confused with
:mod:`mechir.selection`, the layer/head/neuron selection grammar)."""

import warnings

from mechir.attribution.neuron_selection import (  # noqa: F401
    SIGNS,
    NeuronSelection,
    fuse_scores,
    intersect,
    n_selected,
    random_control,
    top_neurons,
)

warnings.warn(
    "mechir.attribution.selection is renamed mechir.attribution.neuron_selection",
    DeprecationWarning,
    stacklevel=2,
)
