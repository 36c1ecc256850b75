"""The batch a forward pass runs on, readable from inside any hook function.

While :class:`~mechir.model.HookedCrossEncoder` runs, it keeps the input (a
:class:`~mechir.parts.CrossEncoderBatch`, or bare ids whose parts are inferred on first use) on a
small stack that every one of its hook points shares; :func:`running_batch` reads the top. This
module imports no model library, so hook factories stay light to import.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from mechir.lazy import lazy_import
from mechir.parts import CrossEncoderBatch, infer_parts

torch = lazy_import("torch")

HookFn = Callable[..., Any]
#: What every hook factory returns: TransformerLens ``(hook_name, fn)`` pairs (compose with +).
Hooks = list[tuple[str | Callable[[str], bool], HookFn]]


class RunningInput:
    """What a forward pass runs on: a batch with parts, or bare ids whose parts are inferred on
    first use (most forward passes have no part-dependent hook)."""

    __slots__ = ("batch_", "tokens", "token_type_ids", "attention_mask", "tokenizer")

    def __init__(
        self,
        batch: CrossEncoderBatch | None = None,
        tokenizer: Any = None,
        **ids: torch.Tensor | None,
    ):
        self.batch_ = batch
        self.tokenizer = tokenizer
        if batch is not None:
            ids = {
                "tokens": batch.input_ids,
                "token_type_ids": batch.token_type_ids,
                "attention_mask": batch.attention_mask,
            }
        self.tokens = ids.get("tokens")
        self.token_type_ids = ids.get("token_type_ids")
        self.attention_mask = ids.get("attention_mask")

    @classmethod
    def of(
        cls,
        model: Any,
        input: CrossEncoderBatch | torch.Tensor,
        token_type_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
    ) -> RunningInput:
        device = model.cfg.device
        if isinstance(input, CrossEncoderBatch):
            return cls(batch=input if input.device == torch.device(device) else input.to(device))
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return cls(
            tokenizer=model.tokenizer,
            tokens=input.to(device),
            token_type_ids=move(token_type_ids),
            attention_mask=move(attention_mask),
        )

    def batch(self) -> CrossEncoderBatch:
        if self.batch_ is None:
            tok = self.tokenizer
            if tok is None or tok.cls_token_id is None or tok.sep_token_id is None:
                raise RuntimeError(
                    "the model runs on bare token ids and has no tokenizer to infer their parts "
                    "from: run it on a CrossEncoderBatch (model.encode(...))"
                )
            tokens = self.tokens
            mask = torch.ones_like(tokens) if self.attention_mask is None else self.attention_mask
            types = torch.zeros_like(tokens) if self.token_type_ids is None else self.token_type_ids
            parts = infer_parts(
                tokens, mask, cls_token_id=tok.cls_token_id, sep_token_id=tok.sep_token_id
            )
            self.batch_ = CrossEncoderBatch(tokens, types, mask, parts)
        return self.batch_


def running_batch(hook: Any) -> CrossEncoderBatch:
    """The batch the model is running on, from inside a hook function ``fn(act, hook)``.

    Example (a hand-written hook zeroing the document positions of the residual stream)::

        def zero_document(resid, hook):
            doc = running_batch(hook).mask("document")        # [batch, pos]
            return resid * ~doc[..., None]
    """
    running = hook.__dict__.get("_mechir_running")
    if running is None:
        raise RuntimeError(
            f"hook point {getattr(hook, 'name', hook)!r} does not belong to a HookedCrossEncoder"
        )
    return current_batch(running)


def current_batch(running: list[RunningInput]) -> CrossEncoderBatch:
    if not running:
        raise RuntimeError(
            "no forward pass is running: part-dependent hooks read the parts of the batch the "
            "model runs on, so call them through the model (score, run_with_hooks, ...)"
        )
    return running[-1].batch()
