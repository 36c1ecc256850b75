"""The batch a forward pass runs on, readable from inside any hook function.

While a model runs, the input it runs on (a :class:`~mechir.parts.CrossEncoderBatch`, or bare ids
whose parts are inferred on first use) is held in a :class:`contextvars.ContextVar` as one
*frame* per running forward pass, keyed by the model. :func:`running_batch` reads the innermost
frame of the model a hook point belongs to. Because the frames live in the execution context and
not on the model:

* threads and asyncio tasks each see their own forward passes (two threads scoring at once never
  read each other's batch);
* a forward pass of one model inside a hook of another (nested models) reads its own frame;
* contexts exited out of order remove their own frame, never another one;
* backward hooks read the frame of the forward pass that built the graph they run in (the
  model runs each backward hook in a copy of the context of that forward pass).

Hooks added for a block of code (``with model.hooks(...)``, ``model.score(..., hooks=...)``)
are scoped the same way (:func:`hook_scope`): they fire only for forward passes of the
execution context that added them.

Every factory that needs something computed once per forward pass (e.g. the attention mask of
the parts) keeps it in the frame (:func:`per_forward`), so no hook shares mutable state across
threads. This module imports no model library, so hook factories stay light to import.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from mechir.interface import HookedReranker
from mechir.lazy import lazy_import
from mechir.parts import CrossEncoderBatch, infer_parts

torch = lazy_import("torch")

T = TypeVar("T")
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
        model: HookedReranker,
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


class RunningKey:
    """Identifies one model's frames (a model owns one; its hook points carry it)."""

    __slots__ = ("__weakref__",)


class Frame:
    """One running forward pass: its model's key, its input, and the values hooks computed once
    for it (:func:`per_forward`)."""

    __slots__ = ("key", "input", "values")

    def __init__(self, key: RunningKey, input: RunningInput):
        self.key, self.input, self.values = key, input, {}


#: The running forward passes of this execution context, innermost last.
_FRAMES: contextvars.ContextVar[tuple[Frame, ...]] = contextvars.ContextVar(
    "mechir_running_frames", default=()
)
#: The active hook scopes of this execution context (:func:`hook_scope`).
_SCOPES: contextvars.ContextVar[tuple[object, ...]] = contextvars.ContextVar(
    "mechir_hook_scopes", default=()
)


@contextlib.contextmanager
def running(key: RunningKey, input: RunningInput) -> Iterator[Frame]:
    """Make ``input`` the running input of the model ``key`` while the block runs. On exit the
    frame removes itself (and only itself), whatever order contexts exit in."""
    frame = Frame(key, input)
    _FRAMES.set((*_FRAMES.get(), frame))
    try:
        yield frame
    finally:
        _FRAMES.set(tuple(f for f in _FRAMES.get() if f is not frame))


@contextlib.contextmanager
def hook_scope() -> Iterator[object]:
    """A scope for hooks added by a ``with model.hooks(...)`` block: while the block runs, the
    scope is active in this execution context only, so the hooks fire for this thread's (or
    task's) forward passes and not for another thread's running at the same time
    (:func:`scope_active`). Scopes exit in any order."""
    scope = object()
    _SCOPES.set((*_SCOPES.get(), scope))
    try:
        yield scope
    finally:
        _SCOPES.set(tuple(s for s in _SCOPES.get() if s is not scope))


def scope_active(scope: object) -> bool:
    """Whether the hook scope ``scope`` (from :func:`hook_scope`) is active here."""
    return scope in _SCOPES.get()


def refuse_active_hooks(model: HookedReranker, engine: str) -> None:
    """Refuse to run an engine that computes its own forward pass (the edge engine: its own
    attention and LayerNorms) while user hooks are active on ``model`` here (a ``with
    model.hooks(...)`` block of this thread or task, or hooks added without a scope): such an
    engine would apply some of them (the model modules it calls) and silently skip the rest.
    One intervention dialect: hooks go to the model's own forward; an engine runs without
    them. Call at the entry of every public function of such an engine, before it adds any
    hook of its own.

    Raises:
        ValueError: ``model`` has active hooks (the message names the engine, how many hooks,
            one or two of their hook points, and what to do).
    """
    names = model.active_hooks()
    if names:
        shown = ", ".join(dict.fromkeys(names[:2]))
        more = ", ..." if len(set(names)) > len(dict.fromkeys(names[:2])) else ""
        raise ValueError(
            f"{engine} runs its own forward pass and would skip hooks on the model, but "
            f"{len(names)} hook{'s are' if len(names) > 1 else ' is'} active ({shown}{more}): "
            "call it outside the `with model.hooks(...)` block (and remove hooks added with "
            "add_hook or reset_hooks_end=False: model.reset_hooks())"
        )


def running_frames(key: RunningKey) -> tuple[Frame, ...]:
    """The running frames of the model ``key`` in this execution context, innermost last."""
    return tuple(f for f in _FRAMES.get() if f.key is key)


def current_frame(key: RunningKey) -> Frame:
    """The innermost running frame of the model ``key``.

    Raises:
        RuntimeError: no forward pass of that model is running here.
    """
    for frame in reversed(_FRAMES.get()):
        if frame.key is key:
            return frame
    raise RuntimeError(
        "no forward pass is running: part-dependent hooks read the parts of the batch the "
        "model runs on, so call them through the model (score, run_with_hooks, ...)"
    )


def current_batch(key: RunningKey) -> CrossEncoderBatch:
    """The batch of the innermost running forward pass of the model ``key``."""
    return current_frame(key).input.batch()


def _hook_key(hook: Any) -> RunningKey:
    key = hook.__dict__.get("_mechir_running")
    if key is None:
        raise RuntimeError(
            f"hook point {getattr(hook, 'name', hook)!r} does not belong to a mechir model"
        )
    return key


def running_batch(hook: Any) -> CrossEncoderBatch:
    """The batch the model is running on, from inside a hook function ``fn(act, hook)``
    (forward or backward).

    Example (a hand-written hook zeroing the document positions of the residual stream)::

        def zero_document(resid, hook):
            doc = running_batch(hook).mask("document")        # [batch, pos]
            return resid * ~doc[..., None]
    """
    return current_batch(_hook_key(hook))


def per_forward(compute: Callable[[CrossEncoderBatch], T]) -> Callable[[Any], T]:
    """``get(hook) -> compute(running batch)``, computed once per forward pass and shared by
    every hook of a factory (e.g. one attention mask for all layers), recomputed for the next
    forward pass. The value is kept in the running frame, so concurrent forward passes (threads,
    tasks) never see each other's values."""
    slot = object()

    def get(hook: Any) -> T:
        frame = current_frame(_hook_key(hook))
        if slot not in frame.values:
            frame.values[slot] = compute(frame.input.batch())
        return frame.values[slot]

    return get
