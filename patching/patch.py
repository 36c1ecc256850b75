"""Deprecated module path: activation patching now lives in :mod:`patching.targets` (what is
patched), :mod:`patching.sweep` (the batched engine) and :mod:`patching.reference` (the per-cell
oracle). Import from ``patching`` directly; this module re-exports the old names."""

from patching.reference import patch_sweep_reference
from patching.sweep import DEFAULT_MEMORY_BUDGET, patch_sweep, rows_per_chunk, run_from_layers
from patching.targets import (
    COMPONENTS,
    PART_LABELS,
    PatchTarget,
    head_patch_hooks,
    head_target,
    neuron_patch_hooks,
    neuron_target,
    pattern_patch_hooks,
    pattern_target,
    pooled_patch_hooks,
    pooled_target,
    resid_patch_hooks,
    resid_target,
)

__all__ = [
    "COMPONENTS",
    "DEFAULT_MEMORY_BUDGET",
    "PART_LABELS",
    "PatchTarget",
    "head_patch_hooks",
    "head_target",
    "neuron_patch_hooks",
    "neuron_target",
    "patch_sweep",
    "patch_sweep_reference",
    "pattern_patch_hooks",
    "pattern_target",
    "pooled_patch_hooks",
    "pooled_target",
    "resid_patch_hooks",
    "resid_target",
    "rows_per_chunk",
    "run_from_layers",
]
