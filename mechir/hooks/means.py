"""Reference means of activations for mean ablation, streamed without a cache."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from jaxtyping import Float

from mechir.interface import HookedReranker
from mechir.lazy import lazy_import
from mechir.parts import CrossEncoderBatch, PartLike

torch = lazy_import("torch")


def activation_means(
    model: HookedReranker,
    batch: CrossEncoderBatch,
    names: Sequence[str],
    *,
    batch_size: int = 32,
    parts: PartLike | Iterable[PartLike] | None = None,
) -> dict[str, Float[torch.Tensor, "..."]]:
    """Mean of each named activation over every real token of ``batch`` (or over the tokens of
    ``parts``), streamed sub-batch by sub-batch: only running sums are kept, never a cache.

    For an activation ``[batch, pos, *rest]`` the result has shape ``rest``:
    ``mean = sum_{b,p in tokens} act[b, p] / #tokens``.
    """
    sums: dict[str, torch.Tensor] = {}
    count = 0
    for chunk in batch.chunks(batch_size):
        tokens = chunk.mask(parts) if parts is not None else chunk.attention_mask.bool()
        tokens = tokens.to(model.cfg.device)
        count += int(tokens.sum())

        def accumulate(act: torch.Tensor, hook: Any, tokens: torch.Tensor = tokens) -> None:
            s = act[tokens].double().sum(0)
            sums[hook.name] = sums[hook.name] + s if hook.name in sums else s

        with torch.no_grad():
            model.run_with_hooks(chunk, fwd_hooks=[(n, accumulate) for n in names])
    if count == 0:
        raise ValueError("no tokens to average over (empty batch or part selection)")
    return {n: (sums[n] / count).to(torch.float32) for n in names}
