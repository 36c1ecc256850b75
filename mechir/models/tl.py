"""Everything mechir takes from TransformerLens, imported in this one module.

Moving to another TransformerLens version (or off it) starts here: the families build their
models from these classes and hook points, and every use of a TransformerLens internal (a
private name, a class swap, its own attention forward) goes through a small named function
below. :data:`INTERNALS` lists those internals with the parameters mechir passes;
``tests/families/test_tl.py`` checks them against the installed TransformerLens, so an upgrade
that renames or reshapes one fails loudly there, not silently in a forward pass.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from jaxtyping import Bool, Int
from torch import Tensor

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    from transformer_lens.ActivationCache import ActivationCache
    from transformer_lens.components import (
        Attention,
        BertBlock,
        BertEmbed,
        BertPooler,
        Embed,
        GroupedQueryAttention,
        LayerNorm,
        RMSNorm,
        T5Attention,
    )
    from transformer_lens.config.hooked_transformer_config import HookedTransformerConfig
    from transformer_lens.FactoredMatrix import FactoredMatrix
    from transformer_lens.hook_points import HookPoint, LensHandle
    from transformer_lens.HookedEncoder import HookedEncoder
    from transformer_lens.HookedRootModule import HookedRootModule
    from transformer_lens.HookedTransformer import HookedTransformer
    from transformer_lens.utilities import TypedModuleList


#: TransformerLens internals mechir relies on: ``(owner, attribute, parameters mechir passes)``;
#: ``None``: an attribute, not a method (its presence is checked on a built instance).
INTERNALS: tuple[tuple[type, str, tuple[str, ...] | None], ...] = (
    (Attention, "_attention_dir_override", None),
    (Attention, "_make_causal_mask", ("query_ctx_length", "key_ctx_length", "past_kv_pos_offset",
                                      "device")),
    (Attention, "_rotary_base", ()),
    (Attention, "forward", ("query_input", "key_input", "value_input", "past_kv_cache_entry",
                            "additive_attention_mask", "attention_mask", "position_bias")),
    (Attention, "calculate_qkv_matrices", ("query_input", "key_input", "value_input")),
    (Attention, "calculate_attention_scores", ("q", "k")),
    (Attention, "calculate_z_scores", ("v", "pattern")),
    (Attention, "apply_rotary", ("x",)),
    (Attention, "calculate_sin_cos_rotary", ("rotary_dim", "n_ctx", "base", "dtype")),
    (T5Attention, "_relative_position_bucket", ("relative_position", "bidirectional",
                                                "num_buckets", "max_distance")),
    (HookedRootModule, "_enable_hook_with_name", ("name", "hook", "dir")),
    (HookPoint, "add_hook", ("hook", "dir", "is_permanent", "level", "prepend", "alias_names")),
    (HookPoint, "fwd_hooks", None),
    (HookPoint, "bwd_hooks", None),
    (HookPoint, "backward_scale", None),
)  # fmt: skip

#: TransformerLens's own attention forward (``Attention`` and ``GroupedQueryAttention`` share
#: it): what a lean forward falls back to for a configuration it does not cover.
tl_attention_forward = Attention.forward


def attention_direction(attn: Any) -> str:
    """``"causal"`` or ``"bidirectional"``: the attention module's own override (T5's decoder
    sets one) or its config's ``attention_dir``."""
    return attn._attention_dir_override or attn.cfg.attention_dir


def causal_mask(
    attn: Any, n_query: int, n_key: int, device: torch.device
) -> Bool[Tensor, "1 1 query_pos key_pos"]:
    """Which keys each query may read in a causal attention (``key <= query``; local attention
    also within its window), as TransformerLens builds it."""
    return attn._make_causal_mask(
        query_ctx_length=n_query, key_ctx_length=n_key, past_kv_pos_offset=0, device=device
    )


def rotary_base(attn: Any) -> float:
    """The rotary base of an attention module (the local base for local attention)."""
    return attn._rotary_base()


def t5_relative_position_bucket(
    relative_position: Int[Tensor, "query key"],
    *,
    bidirectional: bool,
    num_buckets: int,
    max_distance: int,
) -> Int[Tensor, "query key"]:
    """T5's bucket of ``key - query`` (TransformerLens's copy of Hugging Face's)."""
    return T5Attention._relative_position_bucket(
        relative_position,
        bidirectional=bidirectional,
        num_buckets=num_buckets,
        max_distance=max_distance,
    )


def retype_hook_point(point: HookPoint, cls: type[HookPoint]) -> None:
    """Make a built ``HookPoint`` an instance of ``cls``, a subclass adding behaviour but no
    state of its own (its name, hooks and registration in the model stay as they are)."""
    if not issubclass(cls, type(point)):
        raise TypeError(f"{cls.__name__} does not extend {type(point).__name__}")
    point.__class__ = cls


__all__ = [
    "INTERNALS",
    "ActivationCache",
    "Attention",
    "BertBlock",
    "BertEmbed",
    "BertPooler",
    "Embed",
    "FactoredMatrix",
    "GroupedQueryAttention",
    "HookPoint",
    "HookedEncoder",
    "HookedRootModule",
    "HookedTransformer",
    "HookedTransformerConfig",
    "LayerNorm",
    "LensHandle",
    "RMSNorm",
    "T5Attention",
    "TypedModuleList",
    "attention_direction",
    "causal_mask",
    "retype_hook_point",
    "rotary_base",
    "t5_relative_position_bucket",
    "tl_attention_forward",
]
