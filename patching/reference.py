"""The per-cell oracle of the batched sweep: one full forward per (pair, cell), plain hooks.

For pair ``i`` and cell ``c``: ``s_patch[i, c] = f(corrupted_i | a_c <- a_c(clean_i))``, with the
cell's mask built by plain indexing (:meth:`PatchTarget.cell_mask`), not by the engine's batched
:meth:`PatchTarget.row_mask`, and a full forward pass of the model (no start layers, no [CLS]-only
last block).
"""

from __future__ import annotations

import torch

from mechir.interface import HookedReranker
from patching.perturbations import AlignedPairs
from patching.results import PatchingResult
from patching.sweep import empty_result
from patching.targets import PatchTarget


def patch_sweep_reference(
    model: HookedReranker, pairs: AlignedPairs, target: PatchTarget
) -> PatchingResult:
    """The oracle of :func:`patching.sweep.patch_sweep`: one full forward per (pair, cell)."""
    result, cells, flat, valid = empty_result(model, pairs, target, "exact")
    patched = result.patched.view(len(pairs), -1)
    names = target.hook_names(model)
    with torch.no_grad():
        for i in range(len(pairs)):
            pair = pairs[i]
            clean_score, cache = model.run_with_cache(
                pair.clean, names_filter=lambda name: name in names
            )
            result.clean[i] = clean_score.float().cpu()[0]
            result.corrupted[i] = model(pair.corrupted).float().cpu()[0]
            for c in valid[i].nonzero()[:, 0].tolist():
                layer, *sub = cells[c].tolist()
                hooks = target.reference_hooks(layer, sub, cache, pair.corrupted.parts[0])
                score = model.run_with_hooks(pair.corrupted, fwd_hooks=hooks)
                patched[i, flat[c]] = score.float().cpu()[0]
    return result


__all__ = ["patch_sweep_reference"]
