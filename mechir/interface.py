"""What every hooked reranker offers the tools: the :class:`HookedReranker` protocol, and the
:class:`Abilities` a model declares.

Hook factories, attribution, circuits, patching and the studies take ``model: HookedReranker``:
any model with TransformerLens hook points that scores (query, document) pairs and knows the
parts of the batch it runs on (:class:`mechir.models.HookedCrossEncoder` and every family mechir
loads). What an architecture has or lacks (causal attention, post-LN blocks, QK-norm, grouped
k/v heads, cross-attention, a prompt, edge support) is declared by its family in
``model.abilities``: tools read it, they never probe a model with ``getattr`` or list families by
name. A prompt-based reranker (``abilities.prompt``) is also a :class:`PromptReranker`.

This module imports no model library (TransformerLens, Transformers and torch types are named for
type checkers only), so annotating with it costs nothing at import.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

from mechir.models.registry import Family
from mechir.parts import CrossEncoderBatch, Part

if TYPE_CHECKING:
    import torch
    from transformer_lens import HookedTransformerConfig
    from transformer_lens.hook_points import HookPoint
    from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True, kw_only=True)
class Abilities:
    """What a hooked reranker's architecture has, declared by its family's model class.

    Attributes:
        causal: each token attends only to itself and earlier tokens (decoder LLM rerankers),
            so some part-to-part attention cannot exist (``model.impossible_direction``).
        post_ln: LayerNorm after each residual sum (BERT blocks: the stream a block writes is
            normalized); False: pre-norm blocks (ModernBERT, T5, LLMs).
        qk_norm: queries and keys are RMS-normalized per head after ``hook_q`` / ``hook_k``
            (QK-norm, Qwen3): the attention scores are then not bilinear in them, and the
            normalized vectors are at ``blocks.{l}.attn.q_norm.hook_normalized`` /
            ``k_norm.hook_normalized`` (``[batch * pos * head, d_head]``, before the norm
            weight).
        grouped_kv: fewer key/value heads than query heads (``cfg.n_key_value_heads``).
        cross_attention: a decoder reads the encoder's input through cross-attention (MonoT5).
        prompt: inputs are a rendered prompt around the query and the document; the model is a
            :class:`PromptReranker` (``n_special``, ``field_tokens``, ``batch_from_tokens``).
        edges: :mod:`patching.edges` follows its blocks (attention, MLP and LayerNorms of an
            ``EncoderSpec``, post-LN or pre-LN): its family's ``Family.edge_circuits``.
    """

    causal: bool
    post_ln: bool
    qk_norm: bool
    grouped_kv: bool
    cross_attention: bool
    prompt: bool
    edges: bool


@runtime_checkable
class HookedReranker(Protocol):
    """A hooked reranker: TransformerLens hook points, pair encoding, scoring, running batch.

    Attributes:
        cfg: the TransformerLens config (``n_layers``, ``n_heads``, ``d_model``, ``d_head``,
            ``d_mlp``, ``n_key_value_heads``, ``device``, ``dtype``).
        tokenizer: the Hugging Face tokenizer (or None).
        family: the :class:`~mechir.models.Family` the model was loaded as.
        abilities: what its architecture has (:class:`Abilities`).
        hook_dict: hook name -> ``HookPoint``.
        score_type: what :meth:`score` returns (``"binary_logit"``, ``"logit"``, ...).
        max_length: the longest input, in tokens.
        final_hidden_name: hook of the final hidden states, the input of the score head.
        num_labels: the score head's outputs (1: the score is the logit; >= 2: classes).
        embed: the embedding module (token, position and type embeddings; for MonoT5 the
            shared token embedding); its ``pad_token_id`` is the padding id.
        blocks: the transformer blocks, in order (MonoT5: the encoder's).
        ln_final: the final norm before the score head, or None (post-LN encoders).
    """

    cfg: HookedTransformerConfig
    tokenizer: PreTrainedTokenizerBase | None
    family: Family
    abilities: Abilities
    hook_dict: dict[str, HookPoint]
    score_type: str
    num_labels: int
    embed: torch.nn.Module
    blocks: torch.nn.ModuleList
    ln_final: torch.nn.Module | None

    @property
    def max_length(self) -> int: ...

    @property
    def final_hidden_name(self) -> str: ...

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
    ) -> torch.Tensor:
        """Float32 relevance scores on the CPU, ``[batch]``."""
        ...

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

    def additive_attention_mask(self, attention_mask: torch.Tensor) -> torch.Tensor:
        """The mask in the form :meth:`run_block` takes, from a ``[batch, pos]`` 0/1 mask."""
        ...

    def active_hooks(self) -> list[str]:
        """The hook point of every hook that fires for a forward pass started in this execution
        context (active ``with model.hooks(...)`` blocks, and hooks added without a scope)."""
        ...

    def run_block(
        self, layer: int, resid: torch.Tensor, mask: Any, *, cls_only: bool = False
    ) -> torch.Tensor:
        """Block ``layer`` (with its hooks) on its input ``resid`` ``[batch, pos, d_model]``."""
        ...

    def score_from_resid(self, resid: torch.Tensor) -> torch.Tensor:
        """The score head on the final hidden states ``[batch, pos, d_model]`` -> ``[batch]``."""
        ...

    def impossible_direction(
        self, attending: Sequence[Part | str | int], attended: Sequence[Part | str | int]
    ) -> str | None:
        """Why attention from ``attending`` to ``attended`` parts cannot exist in this model
        (a causal model's earlier parts never read later ones), or None when it can."""
        ...


@runtime_checkable
class PromptReranker(HookedReranker, Protocol):
    """A prompt-based reranker (``abilities.prompt``: MonoT5, decoder LLM rerankers): its input
    is a template's tokens around the query's and the document's."""

    @property
    def n_special(self) -> int:
        """Tokens of a pair's input besides its query and document: the template's."""
        ...

    def field_tokens(
        self, text: str, field: Literal["query", "document"] = "document"
    ) -> list[int]:
        """``text``'s token ids as the query or the document of this model's prompt."""
        ...

    def batch_from_tokens(
        self,
        query_ids: Sequence[Sequence[int]],
        document_ids: Sequence[Sequence[int]],
        *,
        max_length: int | None = None,
    ) -> CrossEncoderBatch:
        """A batch from already-tokenized queries and documents, the template around them."""
        ...


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


__all__ = ["Abilities", "HookedReranker", "HookedTwoTower", "PromptReranker"]
