"""Sparse features inside rerankers: activations streamed from candidate pairs, SAEs and
transcoders trained through SAELens, spliced into the hooked forward with their error term,
attributed to the score, measured for ranking fidelity and shown as feature cards.

One concept per module (imported on use; nothing here imports ``sae_lens``, the optional extra
``mechir[features]``, until a function that needs it runs):

* :mod:`mechir.features.source`: tagged activations of any hook site over (query, document)
  pairs, and the endless, shuffled, exactly-sized training stream;
* :mod:`mechir.features.saes`: SAELens configs, loading (SAELens's own save format), encode and
  decode of a site's activation whatever its shape;
* :mod:`mechir.features.training`: training through SAELens's ``SAETrainer`` with mechir's own
  periodic evaluation (JSONL), and the transcoder loop;
* :mod:`mechir.features.splice`: :func:`sae_hooks`, the splicing hook factory (error kept,
  dropped or detached; feature edits restricted to parts);
* :mod:`mechir.features.attribution`: feature and error-node attribution to the score
  (attribution patching, integrated gradients) with the completeness check;
* :mod:`mechir.features.fidelity`: reconstruction and ranking-aware fidelity, PCA baseline;
* :mod:`mechir.features.cards`: per-feature statistics, HTML cards and JSON export;
* :mod:`mechir.features.circuits`: two-SAE feature circuits with attention patterns and norm
  scales frozen by hooks, pruning, exact faithfulness by node budget.
"""
