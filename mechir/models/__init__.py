"""The hooked rerankers mechir loads: one family per file, and their registry.

=====================  =====================================================================
module                 what it holds
=====================  =====================================================================
``registry``           :class:`Family`, :data:`FAMILIES` (one entry per family), lookup
``hooked``             what every hooked reranker shares (running batch, scoped hooks, score)
``encoder``            :class:`HookedCrossEncoder`, BERT blocks and heads, HF conversion
``spec``               ``EncoderShape``, ``EncoderSpec``: what an encoder family declares
``scores``             ``ScoreType``: the score types every family offers
``bert``, ``electra``,  one encoder family each (``roberta`` also loads XLM-RoBERTa,
``roberta``,            ``deberta`` DeBERTa-v2/v3 and DeBERTa v1)
``distilbert``,
``modernbert``,
``deberta``
``tl``                 everything taken from TransformerLens
``prompt``             prompts of prompt-based rerankers: templates and field spans, the
                       part rule, the cut of long documents, answer tokens, batch encoding
``t5``                 MonoT5 (``t5_blocks``: its architecture; ``t5_prompt``: its prompt
                       defaults; ``t5_weights``)
``decoder``            decoder LLM rerankers (``decoder_config``, ``decoder_prompt``: their
                       prompt defaults, ``decoder_weights``)
=====================  =====================================================================

A new family is one file here (defining ``load(family, source, tokenizer, options)``) plus one
entry in :data:`FAMILIES`. Names are imported on first use: ``mechir.models.registry`` stays
free of torch and TransformerLens.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_LAZY: dict[str, str] = {
    "FAMILIES": "mechir.models.registry",
    "Family": "mechir.models.registry",
    "LoadOptions": "mechir.models.registry",
    "SUPPORTED": "mechir.models.registry",
    "UnsupportedModelError": "mechir.models.registry",
    "family_for_config": "mechir.models.registry",
    "family_of": "mechir.models.registry",
    "HookedRerankerMixin": "mechir.models.hooked",
    "HooksArg": "mechir.models.hooked",
    "EncoderShape": "mechir.models.spec",
    "EncoderSpec": "mechir.models.spec",
    "HookedCrossEncoder": "mechir.models.encoder",
    "ScoreType": "mechir.models.scores",
    "hooked_config_from_hf": "mechir.models.encoder",
    "hooked_config_from_shape": "mechir.models.encoder",
    "hooked_cross_encoder_from_hf": "mechir.models.encoder",
    "state_dict_from_hf": "mechir.models.encoder",
    "Hooks": "mechir.running",
    "HookFn": "mechir.running",
    "running_batch": "mechir.running",
}

__all__ = [
    "EncoderShape",
    "EncoderSpec",
    "FAMILIES",
    "Family",
    "HookFn",
    "HookedCrossEncoder",
    "HookedRerankerMixin",
    "Hooks",
    "HooksArg",
    "LoadOptions",
    "SUPPORTED",
    "ScoreType",
    "UnsupportedModelError",
    "family_for_config",
    "family_of",
    "hooked_config_from_hf",
    "hooked_config_from_shape",
    "hooked_cross_encoder_from_hf",
    "running_batch",
    "state_dict_from_hf",
]

if TYPE_CHECKING:  # pragma: no cover
    from mechir.models.encoder import (
        HookedCrossEncoder,
        hooked_config_from_hf,
        hooked_config_from_shape,
        hooked_cross_encoder_from_hf,
        state_dict_from_hf,
    )
    from mechir.models.hooked import HookedRerankerMixin, HooksArg
    from mechir.models.registry import (
        FAMILIES,
        SUPPORTED,
        Family,
        LoadOptions,
        UnsupportedModelError,
        family_for_config,
        family_of,
    )
    from mechir.models.scores import ScoreType
    from mechir.models.spec import EncoderShape, EncoderSpec
    from mechir.running import HookFn, Hooks, running_batch


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'mechir.models' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
