"""What every hooked reranker offers the tools: the :class:`HookedReranker` protocol.

Hook factories, attribution, circuits, patching and the studies take ``model: HookedReranker``:
any model with TransformerLens hook points that scores (query, document) pairs and knows the
parts of the batch it runs on (:class:`mechir.models.HookedCrossEncoder` and every family mechir
loads). This module imports no model library, so annotating with it costs nothing at import.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Any, Protocol, runtime_checkable

from mechir.parts import CrossEncoderBatch


@runtime_checkable
class HookedReranker(Protocol):
    """A hooked reranker: TransformerLens hook points, pair encoding, scoring, running batch.

    Attributes:
        cfg: the TransformerLens config (``n_layers``, ``n_heads``, ``d_model``, ``d_head``,
            ``d_mlp``, ``device``, ``dtype``).
        tokenizer: the Hugging Face tokenizer (or None).
        family: the :class:`~mechir.models.Family` the model was loaded as.
        hook_dict: hook name -> ``HookPoint``.
        qk_norm: whether queries and keys are RMS-normalized per head after ``hook_q`` /
            ``hook_k`` (QK-norm, Qwen3): the attention scores are then not bilinear in them,
            and the normalized vectors are at ``blocks.{l}.attn.q_norm.hook_normalized`` /
            ``k_norm.hook_normalized`` (``[batch * pos * head, d_head]``, before the norm
            weight).
    """

    cfg: Any
    tokenizer: Any
    family: Any
    hook_dict: dict[str, Any]
    qk_norm: bool

    def encode(
        self,
        queries: str | Sequence[str],
        documents: str | Sequence[str],
        *,
        max_length: int | None = None,
        pair_ids: Sequence[str] | None = None,
    ) -> CrossEncoderBatch: ...

    def score(
        self,
        batch: CrossEncoderBatch,
        *,
        batch_size: Any = None,
        hooks: Any = None,
        check_finite: bool = True,
        autocast: Any = None,
        memory_budget: int | None = None,
    ) -> Any: ...

    def hooks(
        self,
        fwd_hooks: Any = (),
        bwd_hooks: Any = (),
        reset_hooks_end: bool = True,
        clear_contexts: bool = False,
    ) -> AbstractContextManager[Any]: ...

    def run_with_hooks(self, *model_args: Any, **kwargs: Any) -> Any: ...

    def run_with_cache(self, *model_args: Any, **kwargs: Any) -> tuple[Any, Any]: ...

    def running_on(self, batch: CrossEncoderBatch) -> AbstractContextManager[CrossEncoderBatch]: ...

    def block_output_name(self, layer: int) -> str: ...

    def active_hooks(self) -> list[str]:
        """The hook point of every hook that fires for a forward pass started in this execution
        context (active ``with model.hooks(...)`` blocks, and hooks added without a scope)."""
        ...


__all__ = ["HookedReranker"]


@runtime_checkable
class HookedTwoTower(Protocol):
    """A model embedding query and document in separate towers (bi-encoders, late
    interaction): each tower runs on its own batch, and :meth:`tower_of` says which tower a
    running batch belongs to (the hook factories' ``tower=``, :mod:`mechir.hooks.towers`).

    Attributes:
        towers: the towers' names (``("query", "document")``).
    """

    towers: tuple[str, ...]

    def tower_of(self, batch: CrossEncoderBatch) -> str: ...


__all__ += ["HookedTwoTower"]
