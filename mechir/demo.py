"""The embedded demo: a small real cross-encoder and a small real test collection, offline.

``"demo"`` is accepted as a model name (:func:`mechir.load_cross_encoder`) and as a dataset name
(:func:`mechir.data.load_collection`) and so by the CLI and the studies (``--model demo
--dataset demo``). It is only ever an explicit choice: nothing falls back to it silently.

- model: MiniLM-L6 (all-MiniLM-L6-v2, Apache-2.0) fine-tuned MonoBERT-style on SciFact train,
  1 label (score = the logit), stored as float16 safetensors and upcast to float32 at load;
  trained with ``max_length=160``.
- collection: the SciFact quick set -- the first 50 test claims, their BM25 top-20 (1,000 pairs),
  their qrels and the 947 abstracts those pairs use; licence CC BY-NC 2.0 (see its README).

The assets live in the data-only package ``mechir_demo`` (``model/``, ``scifact-quick/``), apart
from the code and its licence; ``scripts/make_demo.py`` rebuilds them from ``../shared``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mechir.data import Collection

#: The name that selects the demo model or collection.
DEMO = "demo"
#: Tokens per (query, document) pair the demo model was trained with.
DEMO_MAX_LENGTH = 160
#: Candidates per query in the demo's first-stage run (BM25 top-20).
DEMO_DEPTH = 20
DEMO_MODEL_NAME = "MiniLM-L6 cross-encoder fine-tuned on SciFact (float16 demo copy)"
DEMO_COLLECTION_NAME = "SciFact quick set (50 test claims x BM25 top-20 = 1,000 pairs)"


def is_demo(name: object) -> bool:
    """Whether ``name`` is the demo name ``"demo"`` (a path such as ``"./demo"`` is not)."""
    return isinstance(name, str) and name == DEMO


def demo_root() -> Path:
    """The directory of the installed demo assets (the ``mechir_demo`` package).

    Raises:
        FileNotFoundError: the assets are not installed.
    """
    try:
        import mechir_demo
    except ImportError:
        raise FileNotFoundError(
            "the demo assets (package mechir_demo) are not installed; reinstall mechir with "
            "'pip install .' from the project root, or pass a model directory / collection"
        ) from None
    return Path(mechir_demo.__file__).resolve().parent


def demo_model_dir() -> Path:
    """The demo model's directory (``config.json``, float16 ``model.safetensors``, tokenizer)."""
    return _existing(demo_root() / "model", "model.safetensors")


def demo_collection_dir() -> Path:
    """The demo collection's directory (``docs.tsv``, ``queries.tsv``, ``qrels.txt``,
    ``run.bm25.trec``), in the layout :func:`mechir.data.load_local_collection` reads."""
    return _existing(demo_root() / "scifact-quick", "docs.tsv")


def _existing(directory: Path, marker: str) -> Path:
    if not (directory / marker).exists():
        raise FileNotFoundError(
            f"{directory}: the demo asset {marker} is missing; rebuild it with "
            "'python scripts/make_demo.py' (needs ../shared) or reinstall mechir"
        )
    return directory


def resolve_model(model: str | os.PathLike) -> str | os.PathLike:
    """``"demo"`` -> the demo model directory; anything else unchanged."""
    return str(demo_model_dir()) if is_demo(model) else model


def demo_split(split: str | None) -> None:
    """Check a ``--split`` given with the demo collection: it has one split, ``quick``.

    Raises:
        ValueError: another split was asked for.
    """
    if split not in (None, "quick"):
        raise ValueError(
            f"the demo collection has only the 'quick' split (50 SciFact test claims), not "
            f"{split!r}; drop --split or pass a full collection directory"
        )


def load_demo_collection(
    *, split: str | None = None, run: str | os.PathLike | None = None
) -> Collection:
    """The demo collection (``load_collection("demo")``): 50 SciFact test claims, their qrels,
    their BM25 top-20 run and the documents it ranks; ``run`` replaces the BM25 run.

    Raises:
        ValueError: ``split`` is not ``None`` or ``"quick"`` (the only split).
    """
    from mechir.data import load_local_collection, read_run

    demo_split(split)
    col = load_local_collection(demo_collection_dir())
    col.name = f"demo ({DEMO_COLLECTION_NAME})"
    if run is not None:
        col.run = read_run(run)
    return col
