"""IR axioms in a cross-encoder: how often does it agree with TFC1, TFC2, STMC1, LNC1 and LNC2,
which components carry each effect, and does it compute a semantic BM25 (term matching x IDF)?
(``python -m analyses.axioms``; what it computes: :mod:`analyses.axioms.study`.)

One module per concept: :mod:`~analyses.axioms.diagnostics`, :mod:`~analyses.axioms.knockouts`,
:mod:`~analyses.axioms.activation_patching`, :mod:`~analyses.axioms.idf` (SVD, IDF direction
edit), :mod:`~analyses.axioms.regression` (the soft-TF x IDF fit),
:mod:`~analyses.axioms.seed_checks`, :mod:`~analyses.axioms.nig`,
:mod:`~analyses.axioms.replication`, :mod:`~analyses.axioms.study` (options, stages) and
:mod:`~analyses.axioms.report` (the summary's sections).
"""

from analyses.axioms.activation_patching import (
    compute_patching,
    compute_pattern,
    decode_result,
    encode_result,
    patch_pairs,
    top_heads,
)
from analyses.axioms.diagnostics import (
    ALIGNED,
    AXIOM_NAMES,
    BASELINE,
    BLOCKS,
    build_sets,
    compute_diagnostic,
    diagnostic_frame,
    idf_statistics,
    require_cross_encoder,
)
from analyses.axioms.idf import (
    compute_duplicates,
    compute_idf_svd,
    compute_rerank,
    random_direction,
    token_statistics,
)
from analyses.axioms.knockouts import compute_components, knockout_hooks
from analyses.axioms.nig import compute_nig, nig_selection, nig_split
from analyses.axioms.regression import compute_fit, fit_pairs, fit_table
from analyses.axioms.replication import compute_replicate
from analyses.axioms.report import summarize
from analyses.axioms.seed_checks import matching_head_list, qk_directions, random_heads
from analyses.axioms.study import Axioms, build_parser, main, pd, plots, torch

__all__ = [
    "ALIGNED",
    "AXIOM_NAMES",
    "Axioms",
    "BASELINE",
    "BLOCKS",
    "build_parser",
    "build_sets",
    "compute_components",
    "compute_diagnostic",
    "compute_duplicates",
    "compute_fit",
    "compute_idf_svd",
    "compute_nig",
    "compute_patching",
    "compute_pattern",
    "compute_replicate",
    "compute_rerank",
    "decode_result",
    "diagnostic_frame",
    "encode_result",
    "fit_pairs",
    "fit_table",
    "idf_statistics",
    "knockout_hooks",
    "main",
    "matching_head_list",
    "nig_selection",
    "nig_split",
    "patch_pairs",
    "pd",
    "plots",
    "qk_directions",
    "random_direction",
    "random_heads",
    "require_cross_encoder",
    "summarize",
    "token_statistics",
    "top_heads",
    "torch",
]
