"""What every hooked reranker shares: the running batch, scoped hooks, backward hooks that read
the batch, caches that record their batch, and scoring.

:class:`HookedRerankerMixin` goes first in the bases of a family's model class (a TransformerLens
``HookedRootModule`` subclass: ``HookedEncoder``, ``HookedEncoderDecoder``, ``HookedTransformer``
or a module of its own with hook points), which calls :meth:`HookedRerankerMixin.init_reranker`
in its constructor and ends it with ``self.setup()``. The model then satisfies
:class:`mechir.interface.HookedReranker`, and every hook factory, patching engine and study works
with it.
"""

from __future__ import annotations

import contextlib
import contextvars
import difflib
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal

import torch
import torch.nn as nn
from jaxtyping import Float
from torch import Tensor

from mechir.models.tl import ActivationCache, HookPoint, LensHandle, retype_hook_point
from mechir.parts import CrossEncoderBatch, Part
from mechir.running import (
    Frame,
    HookFn,
    Hooks,
    RunningInput,
    RunningKey,
    current_batch,
    hook_scope,
    running,
    running_frames,
    scope_active,
)

#: Hooks for :meth:`HookedRerankerMixin.score`: a list, or a function building one per sub-batch.
HooksArg = Hooks | Callable[[CrossEncoderBatch], Hooks] | None


class FrameAwareHookPoint(HookPoint):
    """A TransformerLens ``HookPoint`` whose backward hooks run in the execution context of the
    forward pass that built their graph, so :func:`running_batch` works in them too (that
    forward pass has returned, possibly on another thread, by the time gradients flow).

    A backward hook ``fn(grad, hook)`` is registered as a forward hook that runs after every
    other forward hook and puts a tensor hook on the final output: ``fn`` receives the gradient
    of that output (what TransformerLens's full backward hook receives) and may return a
    replacement, as there. The handle is listed among the backward hooks (``has_hooks``,
    ``remove_hooks`` and ``reset_hooks`` treat it as one). :meth:`add_hook` returns the handle it
    added."""

    def add_hook(  # type: ignore[override]
        self,
        hook: HookFn,
        dir: Literal["fwd", "bwd"] = "fwd",
        is_permanent: bool = False,
        level: int | None = None,
        prepend: bool = False,
        alias_names: list[str] | None = None,
    ) -> LensHandle:
        if dir != "bwd" or alias_names is not None or self.backward_scale != 1.0:
            super().add_hook(hook, dir, is_permanent, level, prepend, alias_names)
            self._keep_gradient_hooks_last()
            handles = self.fwd_hooks if dir == "fwd" else self.bwd_hooks
            return handles[0 if prepend else -1]

        def on_forward(module: nn.Module, args: Any, output: Tensor) -> None:
            if not (isinstance(output, Tensor) and output.requires_grad):
                return
            context = contextvars.copy_context()
            output.register_hook(lambda grad: context.run(hook, grad, hook=self))

        pt_handle = self.register_forward_hook(on_forward)
        handle = LensHandle(pt_handle, is_permanent, level, user_hook=hook)
        ids = self.__dict__.setdefault("_mechir_gradient_hook_ids", [])
        if prepend:
            ids.insert(0, pt_handle.id)
            self.bwd_hooks.insert(0, handle)
        else:
            ids.append(pt_handle.id)
            self.bwd_hooks.append(handle)
        self._keep_gradient_hooks_last()
        return handle

    def _keep_gradient_hooks_last(self) -> None:
        """Forward hooks run in insertion order: move the gradient hooks to the end (in their
        own order) so they see the output after every forward hook has replaced it."""
        ids = self.__dict__.get("_mechir_gradient_hook_ids", ())
        ids = [i for i in ids if i in self._forward_hooks]
        self.__dict__["_mechir_gradient_hook_ids"] = ids
        for hook_id in ids:
            self._forward_hooks.move_to_end(hook_id)


class ScopedHook:
    """``fn``, firing only where the hook scope ``scope`` is active (see
    :meth:`HookedRerankerMixin.hooks`)."""

    __slots__ = ("fn", "scope", "__name__")

    def __init__(self, fn: HookFn, scope: object):
        self.fn, self.scope = fn, scope
        self.__name__ = getattr(fn, "__name__", "hook")

    def __call__(self, act: Any, hook: HookPoint) -> Any:
        return self.fn(act, hook=hook) if scope_active(self.scope) else None


def fires_here(point: nn.Module) -> bool:
    """Whether a hook on ``point`` (forward or backward, any kind) runs for a forward pass of this
    execution context: an unscoped hook always does; a hook added by ``with model.hooks(...)``
    only in the thread or asyncio task that added it, while its block runs (another thread's
    hooks leave this thread's forward passes unwatched). Fast paths that skip a hook point's
    tensor (fused attention: no ``hook_pattern``) ask this first."""
    hooks = (
        point._forward_hooks,
        point._forward_pre_hooks,
        point._backward_hooks,
        point._backward_pre_hooks,
    )
    if not any(hooks):
        return False
    idle = {
        handle.hook.id
        for handle in (*getattr(point, "fwd_hooks", ()), *getattr(point, "bwd_hooks", ()))
        if isinstance(handle.user_hook, ScopedHook) and not scope_active(handle.user_hook.scope)
    }
    return any(hook_id not in idle for registered in hooks for hook_id in registered)


class HookedRerankerMixin:
    """The shared behaviour of mechir's hooked rerankers (see the module docstring)."""

    tokenizer: Any
    cfg: Any

    def init_reranker(self, tokenizer: Any, family: Any) -> None:
        """Call in the constructor, before building modules that read the running batch."""
        self.tokenizer = tokenizer
        self.family = family
        self._running_key = RunningKey()

    def setup(self) -> None:
        """TransformerLens's hook-point registry; each hook point also carries its model's running
        key, so a hook function can read the batch it runs on with :func:`running_batch`, and
        becomes a :class:`FrameAwareHookPoint` (backward hooks read the batch too)."""
        super().setup()  # type: ignore[misc]
        for point in self.hook_dict.values():
            point.__dict__["_mechir_running"] = self._running_key
            if type(point) is HookPoint:
                retype_hook_point(point, FrameAwareHookPoint)

    def impossible_direction(
        self, attending: Sequence[Part | str | int], attended: Sequence[Part | str | int]
    ) -> str | None:
        """Why attention from ``attending`` to ``attended`` parts cannot exist, or None: every
        direction exists unless the family's model says otherwise (causal decoders do)."""
        return None

    # ------------------------------------------------------------------ the running batch
    @property
    def running_batch(self) -> CrossEncoderBatch:
        """The batch of the forward pass now running (on the model's device).

        Part-dependent hooks call this inside the hook function. For a forward pass on bare token
        ids the parts are inferred from the tokenizer's [CLS]/[SEP] ids.

        Raises:
            RuntimeError: no forward pass is running (a hook called outside the model).
        """
        return current_batch(self._running_key)

    @property
    def _running(self) -> tuple[Frame, ...]:
        """This model's running frames in the current execution context, innermost last."""
        return running_frames(self._running_key)

    @contextlib.contextmanager
    def forward_frame(
        self,
        input: CrossEncoderBatch | Tensor,
        token_type_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
    ) -> Iterator[RunningInput]:
        """Wrap a forward pass: its input (moved to the model's device) is the running batch of
        every hook inside (bare ids get their parts inferred on first use)."""
        input_now = RunningInput.of(self, input, token_type_ids, attention_mask)
        with running(self._running_key, input_now):
            yield input_now

    @contextlib.contextmanager
    def running_on(self, batch: CrossEncoderBatch) -> Iterator[CrossEncoderBatch]:
        """Make ``batch`` the :attr:`running_batch` for code that runs blocks itself (e.g. a
        patching engine calling :meth:`run_block`); :meth:`forward` does this on its own."""
        batch = batch.to(self.cfg.device)
        with running(self._running_key, RunningInput(batch=batch)):
            yield batch

    def _check_hook_name(self, name: Any) -> None:
        if not isinstance(name, str) or name in self.mod_dict:
            return
        match = re.match(r"blocks\.(\d+)\.", name)
        n = self.cfg.n_layers
        if match and int(match.group(1)) >= n:
            raise ValueError(
                f"no hook point {name!r}: layer {match.group(1)} out of range, the model has "
                f"{n} layers (0-{n - 1})"
            )
        close = difflib.get_close_matches(name, list(self.hook_dict), n=3)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ValueError(f"no hook point {name!r} in this model{hint}")

    def add_hook(self, name: Any, hook: Any, *args: Any, **kwargs: Any) -> None:  # type: ignore[override]
        self._check_hook_name(name)
        super().add_hook(name, hook, *args, **kwargs)

    def _enable_hook_with_name(self, name: str, hook: Callable, dir: Any) -> None:  # type: ignore[override]
        self._check_hook_name(name)
        super()._enable_hook_with_name(name, hook, dir)

    def _hook_points(self, name: str | Callable[[str], bool]) -> list[HookPoint]:
        """The hook points a hook list entry names: one name, or every name a filter accepts."""
        if isinstance(name, str):
            self._check_hook_name(name)
            return [self.mod_dict[name]]
        return [point for point_name, point in self.hook_dict.items() if name(point_name)]

    def active_hooks(self) -> list[str]:
        """The hook point of every hook that fires for a forward pass started here: hooks of
        the ``with model.hooks(...)`` blocks active in this execution context (thread or task),
        and hooks added without a scope (``reset_hooks_end=False``, ``add_hook``), which fire
        everywhere. One entry per hook, in hook-point order."""
        out = []
        for name, point in self.hook_dict.items():
            for handle in (*point.fwd_hooks, *point.bwd_hooks):
                user = handle.user_hook
                if not isinstance(user, ScopedHook) or scope_active(user.scope):
                    out.append(name)
        return out

    @contextlib.contextmanager
    def hooks(  # type: ignore[override]
        self,
        fwd_hooks: Hooks = (),  # type: ignore[assignment]
        bwd_hooks: Hooks = (),  # type: ignore[assignment]
        reset_hooks_end: bool = True,
        clear_contexts: bool = False,
    ) -> Iterator[Any]:
        """TransformerLens's ``hooks`` context, scoped to the execution context that enters it.

        The hooks fire only for forward passes (and their backward passes) of this thread or
        asyncio task while the block runs, so threads scoring the same model at once with
        different hooks never run each other's hooks; on exit exactly the hooks this block added
        are removed, whatever other blocks (other threads, nested blocks) do meanwhile. With
        ``reset_hooks_end=False`` the hooks stay, unscoped, as in TransformerLens (they then fire
        for every forward pass until ``model.reset_hooks()``)."""
        if not reset_hooks_end:
            for direction, pairs in (("fwd", fwd_hooks), ("bwd", bwd_hooks)):
                for name, fn in pairs:
                    for point in self._hook_points(name):
                        point.add_hook(fn, dir=direction)
            yield self
            return
        added: list[tuple[HookPoint, LensHandle]] = []
        with hook_scope() as scope:
            try:
                for direction, pairs in (("fwd", fwd_hooks), ("bwd", bwd_hooks)):
                    for name, fn in pairs:
                        scoped = ScopedHook(fn, scope)
                        for point in self._hook_points(name):
                            added.append((point, point.add_hook(scoped, dir=direction)))
                yield self
            finally:
                for point, handle in added:
                    handle.hook.remove()
                    for handles in (point.fwd_hooks, point.bwd_hooks):
                        if any(h is handle for h in handles):
                            handles[:] = [h for h in handles if h is not handle]
                    if clear_contexts:
                        point.clear_context()

    def run_with_cache(  # type: ignore[override]
        self,
        *model_args: Any,
        incl_bwd: bool = False,
        names_filter: Any = None,
        device: Any = None,
        remove_batch_dim: bool = False,
        return_cache_object: bool = True,
        **model_kwargs: Any,
    ) -> tuple[Any, Any]:
        """TransformerLens ``run_with_cache``. With ``incl_bwd=True`` the cached gradients
        (``<name>_grad``) are those of the **summed** output, e.g. ``sum_b score_b`` for a batch of
        scores. Pairs do not interact in the encoder, so each pair's cached gradient is the
        gradient of its own score.

        Run on a :class:`CrossEncoderBatch`, the cache records it as ``cache.batch``, so it can be
        the source of patching hooks (:func:`mechir.hooks.patch_hooks`)."""
        if not incl_bwd:
            out, cache = super().run_with_cache(
                *model_args,
                names_filter=names_filter,
                device=device,
                remove_batch_dim=remove_batch_dim,
                return_cache_object=return_cache_object,
                **model_kwargs,
            )
        else:
            cache, fwd, bwd = self.get_caching_hooks(
                names_filter, True, device, remove_batch_dim=remove_batch_dim
            )
            with self.hooks(fwd_hooks=fwd, bwd_hooks=bwd):
                out = self(*model_args, **model_kwargs)
                out.sum().backward()
            if return_cache_object:
                cache = ActivationCache(cache, self, has_batch_dim=not remove_batch_dim)
        batch = model_args[0] if model_args else model_kwargs.get("input")
        if return_cache_object and not remove_batch_dim and isinstance(batch, CrossEncoderBatch):
            cache.batch = batch
        return out, cache

    def score(
        self,
        batch: CrossEncoderBatch,
        *,
        batch_size: int | Literal["auto"] | None = None,
        hooks: HooksArg = None,
        check_finite: bool = True,
        autocast: torch.dtype | None = None,
        memory_budget: int | None = None,
    ) -> Float[Tensor, " batch"]:
        """Relevance scores of a batch, without gradients, returned as float32 **on the CPU**.

        Hooks already active (``with model.hooks(...)``) apply. ``hooks`` adds more for this call:
        a list (part-dependent hooks read the parts of each sub-batch they run on), or, for
        hooks that must be rebuilt per sub-batch, a function ``sub_batch -> list``.

        ``batch_size``: pairs per forward pass (None: all at once); ``"auto"``: the most that
        fit ``memory_budget`` bytes (default: half the free GPU memory, 2 GiB on the CPU) by the
        per-row activation cost of one forward pass without gradients
        (:func:`mechir.attribution.rows_for_memory` with ``backward=False``). ``autocast``:
        ``torch.bfloat16`` / ``torch.float16`` runs the forward under ``torch.autocast`` (faster
        on GPUs; the error against float32 is reported by ``benchmarks/bench_scoring.py``);
        None (default): the model's own dtype, float32 unless loaded otherwise. TF32 matmuls on
        CUDA are PyTorch's process-wide switch (``torch.backends.cuda.matmul.fp32_precision =
        "tf32"``), left to the caller; it does nothing on the CPU.

        Raises:
            FloatingPointError: a score is NaN or infinite (corrupted weights, or hooks producing
                non-finite activations); the message names the pairs. ``check_finite=False``
                leaves the check to the caller (e.g. ``score_pairs``, which names qid and docid).
            ValueError: ``memory_budget`` without ``batch_size="auto"``, or an ``autocast``
                dtype other than bfloat16 / float16.
        """
        from mechir.attribution.common import (
            autocast_context,
            default_memory_budget,
            rows_for_memory,
        )

        if batch_size == "auto":
            budget = default_memory_budget(self) if memory_budget is None else memory_budget
            batch_size = rows_for_memory(
                self,  # type: ignore[arg-type]
                batch.input_ids.shape[1],
                budget,
                bytes_per_value=2 if autocast is not None else 4,
                backward=False,
            )
        elif memory_budget is not None:
            raise ValueError('memory_budget sizes batches only with batch_size="auto"')
        out = []
        with torch.no_grad(), autocast_context(self, autocast):  # type: ignore[arg-type]
            for chunk in batch.chunks(batch_size):
                fwd = hooks(chunk) if callable(hooks) else (hooks or [])
                with self.hooks(fwd_hooks=fwd):
                    out.append(self(chunk).float().cpu())
        scores = torch.cat(out)
        bad = (~torch.isfinite(scores)).nonzero().flatten().tolist() if check_finite else []
        if bad:
            shown = ", ".join(map(str, bad[:10])) + (", ..." if len(bad) > 10 else "")
            raise FloatingPointError(
                f"{len(bad)} of {len(scores)} scores are NaN or infinite (pairs {shown}): check "
                "the model's weights are finite and that the hooks keep activations finite"
            )
        return scores
