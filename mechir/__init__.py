"""mechir: hook-based mechanistic interpretability for cross-encoders (BERT, ELECTRA, RoBERTa,
XLM-RoBERTa, DistilBERT).

Load a cross-encoder, encode (query, document) pairs with their input parts, score them, and
intervene with composable TransformerLens hooks::

    import mechir
    model = mechir.load_cross_encoder("castorini/monobert-large-msmarco")
    batch = model.encode(["what is a cat"], ["A cat is a small animal."])
    model.score(batch)

``import mechir`` is instant: the names below (and submodules such as ``mechir.hooks``) are
imported on first use, so torch, transformers and TransformerLens load only when needed.
"""

from __future__ import annotations

import importlib
import warnings as _warnings
from typing import TYPE_CHECKING, Any

_warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"transformer_lens(\.|$)")

#: Public name -> the module that defines it (imported on first access).
_LAZY: dict[str, str] = {
    "FAMILIES": "mechir.models.registry",
    "Family": "mechir.models.registry",
    "ModelNotFoundError": "mechir.loading",
    "UnsupportedModelError": "mechir.loading",
    "load_cross_encoder": "mechir.loading",
    "load_bi_encoder": "mechir.models.biencoder",
    "load_late_interaction": "mechir.models.late_interaction",
    "HookedBiEncoder": "mechir.models.biencoder",
    "HookedLateInteraction": "mechir.models.late_interaction",
    "HookedCrossEncoder": "mechir.models.encoder",
    "PARTS": "mechir.parts",
    "CrossEncoderBatch": "mechir.parts",
    "PairLayout": "mechir.parts",
    "Part": "mechir.parts",
    "cross_encoder_batch_from_tokens": "mechir.parts",
    "encode": "mechir.parts",
    "pair_layout_of": "mechir.parts",
    "parse_part": "mechir.parts",
    "parse_parts": "mechir.parts",
}

__all__ = [
    "PARTS",
    "CrossEncoderBatch",
    "FAMILIES",
    "Family",
    "HookedCrossEncoder",
    "ModelNotFoundError",
    "PairLayout",
    "Part",
    "UnsupportedModelError",
    "cross_encoder_batch_from_tokens",
    "encode",
    "load_cross_encoder",
    "load_bi_encoder",
    "load_late_interaction",
    "HookedBiEncoder",
    "HookedLateInteraction",
    "pair_layout_of",
    "parse_part",
    "parse_parts",
]

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs
    from mechir.loading import UnsupportedModelError, load_cross_encoder
    from mechir.models.encoder import HookedCrossEncoder
    from mechir.models.registry import FAMILIES, Family
    from mechir.parts import (
        PARTS,
        CrossEncoderBatch,
        PairLayout,
        Part,
        cross_encoder_batch_from_tokens,
        encode,
        pair_layout_of,
        parse_part,
        parse_parts,
    )


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later lookups skip __getattr__
        return value
    try:  # a submodule: mechir.hooks, mechir.evaluation, ...
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as err:
        if err.name != f"{__name__}.{name}":
            raise
    raise AttributeError(f"module 'mechir' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
