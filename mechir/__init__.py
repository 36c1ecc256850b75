"""mechir: hook-based mechanistic interpretability for BERT cross-encoders.

Load a cross-encoder, encode (query, document) pairs with their input parts, score them, and
intervene with composable TransformerLens hooks::

    import mechir
    model = mechir.load_cross_encoder("castorini/monobert-large-msmarco")
    batch = model.encode(["what is a cat"], ["A cat is a small animal."])
    model.score(batch)
"""

import warnings as _warnings

_warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"transformer_lens(\.|$)")

from mechir.loading import ModelNotFoundError, UnsupportedModelError, load_cross_encoder  # noqa: E402
from mechir.model import HookedCrossEncoder  # noqa: E402
from mechir.parts import (  # noqa: E402
    PARTS,
    CrossEncoderBatch,
    Part,
    cross_encoder_batch_from_tokens,
    encode,
    parse_part,
    parse_parts,
)

__all__ = [
    "PARTS",
    "CrossEncoderBatch",
    "HookedCrossEncoder",
    "ModelNotFoundError",
    "Part",
    "UnsupportedModelError",
    "cross_encoder_batch_from_tokens",
    "encode",
    "load_cross_encoder",
    "parse_part",
    "parse_parts",
]
