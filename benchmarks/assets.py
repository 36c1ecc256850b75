"""The real model and collection the benchmarks run on: ``../shared``'s SciFact cross-encoder and
quick set where present (the project's machines), else their embedded demo copies (a user's machine
or the GPU machine, which get no ``../shared``): the same model stored in compact block codes
(every score within 1e-3 of the float32 model's) and the same 1,000 pairs. A result JSON records
which one ran."""

from __future__ import annotations

from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SHARED_MODEL = ROOT.parent / "shared" / "models" / "minilm-l6-ce-scifact"
SCIFACT = ROOT.parent / "shared" / "data" / "scifact"


def default_model() -> str:
    """The shared model's directory, or ``"demo"`` without ``../shared``."""
    return str(SHARED_MODEL) if SHARED_MODEL.exists() else "demo"


def quick_set() -> Any:
    """The SciFact quick set (50 claims x BM25 top-20) from ``../shared``, or the demo's copy."""
    from mechir.data import load_collection

    return load_collection(SCIFACT, split="quick") if SCIFACT.exists() else load_collection("demo")


def hf_model(name: str) -> Any:
    """The same checkpoint as a Hugging Face model in float32 with eager attention (the oracle)."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from mechir.demo import resolve_model

    return AutoModelForSequenceClassification.from_pretrained(
        resolve_model(name), attn_implementation="eager", dtype=torch.float32
    )
