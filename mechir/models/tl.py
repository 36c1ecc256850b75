"""Everything mechir takes from TransformerLens, imported in this one module.

Moving to another TransformerLens version (or off it) starts here: the families build their
models from these classes and hook points.
"""

from __future__ import annotations

import warnings

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

__all__ = [
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
]
