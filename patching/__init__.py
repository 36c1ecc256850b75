"""Activation patching for cross-encoders: perturbations, batched sweeps, path and attribution
patching, tidy results and heatmaps.

A typical study::

    from patching import PairBuilder, TermStatistics, head_target, patch_sweep, plot_patching

    builder = PairBuilder(model.tokenizer, max_length=160,
                          stats=TermStatistics.from_documents(collection.docs.values()))
    built = builder.build(collection.candidates(depth=20), "tfc1", qrels=collection.qrels)
    pairs = built.batch(model.tokenizer)
    result = patch_sweep(model, pairs, head_target())       # every layer x head
    result.to_frame()                                       # tidy table
    plot_patching(result).savefig("heads.png")              # per relevance grade
    top = patch_top_cells(model, pairs, head_target(by="part"), k=10)  # exact top 10, guided
"""

from patching.attribution import attribution_estimates, attribution_patch, attribution_vs_exact
from patching.guided import SimulatedTopCells, TopCells, patch_top_cells, simulate_top_cells
from patching.path import (
    CHANNELS,
    path_freeze_hooks,
    path_patch,
    path_patch_reference,
    receiver_input_hooks,
    split_qkv_input,
)
from patching.perturbations import (
    DEFAULT_FILLER,
    STOPWORDS,
    AlignedPairs,
    BuiltPairs,
    PairBuilder,
    PerturbedPair,
    TermStatistics,
    default_analyzer,
    pad_differing_span,
)
from patching.plotting import plot_heatmap, plot_patching
from patching.reference import patch_sweep_reference
from patching.results import DEFAULT_MIN_DELTA, HeatmapData, PatchingResult, patching_metric
from patching.sweep import (
    DEFAULT_MEMORY_BUDGET,
    PROGRESS_MIN_CELLS,
    patch_sweep,
    rows_per_chunk,
    run_from_layers,
)
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
    qk_target,
    resid_patch_hooks,
    resid_target,
)

__all__ = [
    "CHANNELS",
    "COMPONENTS",
    "DEFAULT_FILLER",
    "DEFAULT_MEMORY_BUDGET",
    "DEFAULT_MIN_DELTA",
    "PART_LABELS",
    "STOPWORDS",
    "AlignedPairs",
    "BuiltPairs",
    "HeatmapData",
    "PairBuilder",
    "PatchTarget",
    "PROGRESS_MIN_CELLS",
    "PatchingResult",
    "PerturbedPair",
    "TermStatistics",
    "SimulatedTopCells",
    "TopCells",
    "attribution_estimates",
    "attribution_patch",
    "attribution_vs_exact",
    "default_analyzer",
    "head_patch_hooks",
    "head_target",
    "neuron_patch_hooks",
    "neuron_target",
    "pad_differing_span",
    "patch_sweep",
    "patch_sweep_reference",
    "patch_top_cells",
    "simulate_top_cells",
    "patching_metric",
    "path_freeze_hooks",
    "path_patch",
    "path_patch_reference",
    "pattern_patch_hooks",
    "pattern_target",
    "plot_heatmap",
    "plot_patching",
    "pooled_patch_hooks",
    "pooled_target",
    "receiver_input_hooks",
    "qk_target",
    "resid_patch_hooks",
    "resid_target",
    "rows_per_chunk",
    "run_from_layers",
    "split_qkv_input",
]
