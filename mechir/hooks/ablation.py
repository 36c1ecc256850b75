"""Shared pieces of the hook factories: the parts of the running batch, streaming reference
means and masked replacement."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

from jaxtyping import Bool, Float

from mechir.lazy import lazy_import
from mechir.parts import CrossEncoderBatch, PartLike, parse_parts
from mechir.running import per_forward, running_batch

torch = lazy_import("torch")


def part_positions(
    parts: PartLike | Iterable[PartLike] | None,
) -> Callable[[Any], Bool[torch.Tensor, "batch pos"]] | None:
    """``get(hook) -> [batch, pos]`` mask of the running batch's tokens in ``parts`` (None: no
    restriction)."""
    if parts is None:
        return None
    selected = parse_parts(parts)
    return per_forward(lambda batch: batch.mask(selected))


def bound_to(batch: CrossEncoderBatch, what: str) -> Callable[[Any], None]:
    """A check for hooks of the deprecated batch-bound factories: running them on a batch other
    than ``batch`` (other parts) is an error, never a wrong number."""

    def check(hook: Any) -> None:
        running = running_batch(hook)
        same = running.parts.shape == batch.parts.shape and torch.equal(
            running.parts, batch.parts.to(running.parts.device)
        )
        if not same:
            raise ValueError(
                f"{hook.name}: these {what} hooks were built for another batch (its parts differ "
                "from the batch the model runs on); build them once with the model instead, e.g. "
                "direction_ablation_hooks(model, ...), and they read each batch's own parts"
            )

    return check


def activation_means(
    model: Any,
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


def masked_replace(
    act: Float[torch.Tensor, "batch pos ..."],
    selected: Bool[torch.Tensor, "..."],
    positions: Bool[torch.Tensor, "batch pos"] | None,
    value: Float[torch.Tensor, "..."] | None,
) -> Float[torch.Tensor, "batch pos ..."]:
    """``act`` with the ``selected`` trailing entries replaced by ``value`` (zero when None), at
    ``positions`` only (every position when None). Out of place, so gradients flow."""
    where = selected.to(act.device)[None, None]
    if positions is not None:
        extra = (1,) * (act.dim() - 2)
        where = where & positions.to(act.device).view(*positions.shape, *extra)
    replacement = (
        torch.zeros_like(act) if value is None else value.to(act)[None, None].expand_as(act)
    )
    return torch.where(where, replacement, act)
