"""What an encoder family's file declares: :class:`EncoderShape` (the family-independent
description a hooked cross-encoder is built from) and :class:`EncoderSpec` (how the family's
config and state dict map onto mechir's, its embedding rule, head activation, pair layout, block
kind and, for a body TransformerLens's blocks cannot express, its own builder).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from torch import Tensor

from mechir.models.tl import HookedTransformerConfig
from mechir.parts import PairLayout

PositionRule = Literal["absolute", "padding_offset", "rotary", "relative"]
BlockKind = Literal["post_ln", "pre_ln"]


@dataclass(frozen=True)
class EncoderShape:
    """The family-independent description of an encoder (what the hooked model is built from)."""

    d_model: int
    n_heads: int
    d_mlp: int
    n_layers: int
    n_positions: int  #: rows of the position-embedding table
    d_vocab: int
    eps: float
    act_fn: str
    n_token_types: int  #: 0 when the family has no token-type embedding
    d_embed: int  #: embedding width (== d_model unless projected, ELECTRA-small)
    pad_token_id: int
    extra: Any = None  #: what a family with its own body adds (ModernBERT: ``ModernShape``)


@dataclass(frozen=True)
class EncoderSpec:
    """What an encoder family's file declares (see the module docstring).

    Attributes:
        layout: how pairs are joined (``[CLS] q [SEP] d [SEP]`` or RoBERTa's ``</s></s>``).
        encoder_config: Hugging Face config -> :class:`EncoderShape` (ValueError when a setting
            is not supported).
        state_dict: ``(hf_model, n_heads) -> {mechir name: tensor}``.
        head_keys: Hugging Face state-dict prefixes of the trained head (a checkpoint missing
            them has no trained head).
        positions: ``"absolute"``, RoBERTa's ``"padding_offset"``, ``"rotary"`` or DeBERTa's
            ``"relative"`` (positions enter the attention scores).
        head_activation: the pooler's activation (``"tanh"``, ``"gelu"``, ``"relu"``).
        blocks: ``"post_ln"`` (BERT blocks) or ``"pre_ln"``.
        body: for a body TransformerLens's BERT blocks cannot express, ``body(model, cfg,
            shape)`` sets ``model.embed``, ``model.blocks``, ``model.ln_final`` and
            ``model.pooler`` (ModernBERT); None: BERT blocks.
    """

    layout: PairLayout
    encoder_config: Callable[[Any], EncoderShape]
    state_dict: Callable[[Any, int], dict[str, Tensor]]
    head_keys: tuple[str, ...]
    positions: PositionRule = "absolute"
    head_activation: str = "tanh"
    blocks: BlockKind = "post_ln"
    body: Callable[[Any, HookedTransformerConfig, EncoderShape], None] | None = None

    def position_offset(self, shape: EncoderShape) -> int:
        """Row of the position table used by the first token (RoBERTa: ``padding_idx + 1``)."""
        return shape.pad_token_id + 1 if self.positions == "padding_offset" else 0


__all__ = ["BlockKind", "EncoderShape", "EncoderSpec", "PositionRule"]
