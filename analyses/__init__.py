"""Bundled studies: runnable, resumable reproductions of the cross-encoder interpretability papers,
each a thin composition of :mod:`mechir` and :mod:`patching` calls.

Studies (``python -m analyses.<name> --help``): :mod:`~analyses.direction_ablation`,
:mod:`~analyses.matching_heads`, :mod:`~analyses.qk_svd`, :mod:`~analyses.neuron_attribution`,
:mod:`~analyses.patching_tfc1`; :mod:`~analyses.report` gathers their outputs into one HTML page.

Shared pieces: :mod:`~analyses.base` (:class:`~analyses.base.Study`, the base every study
subclasses), :mod:`~analyses.common` (options, config check, unit loop), :mod:`mechir.store`
(append-only JSONL results), :mod:`~analyses.reranking` and :mod:`~analyses.floors` (reranking
units, comparisons and reference rankings), :mod:`~analyses.summary` (summary.md / .json) and
:mod:`~analyses.plots` (PNG plots). See ``analyses/README.md``.
"""
