"""The embedded demo: a small real cross-encoder and a small real test collection, offline.

``"demo"`` is accepted as a model name (:func:`mechir.load_cross_encoder`) and as a dataset name
(:func:`mechir.data.load_collection`, which reads :func:`demo_collection_dir`) and so by the CLI
and the studies (``--model demo --dataset demo``). It is only ever an explicit choice: nothing
falls back to it silently.

- model: MiniLM-L6 (all-MiniLM-L6-v2, Apache-2.0) fine-tuned MonoBERT-style on SciFact train,
  1 label (score = the logit); trained with ``max_length=160``. Its weights are stored in
  :mod:`mechir.compact`'s block format (``model.blockint16.safetensors``, about half the size of
  float32; every score within 1e-3 of the float32 model's, see the model card). On first use
  they are dequantized once into a plain float32 Hugging Face directory in the cache
  (:func:`demo_model_dir`), which every loader reads unchanged.
- collection: the SciFact quick set -- the first 50 test claims, their BM25 top-20 (1,000 pairs),
  their qrels and the 947 abstracts those pairs use; licence CC BY-NC 2.0 (see its README).

The assets live in the data-only package ``mechir_demo`` (``model/``, ``scifact-quick/``), apart
from the code and its licence; ``scripts/make_demo.py`` rebuilds them from ``../shared``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

#: The name that selects the demo model or collection.
DEMO = "demo"
#: Tokens per (query, document) pair the demo model was trained with.
DEMO_MAX_LENGTH = 160
#: Candidates per query in the demo's first-stage run (BM25 top-20).
DEMO_DEPTH = 20
DEMO_MODEL_NAME = "MiniLM-L6 cross-encoder fine-tuned on SciFact (compact demo copy)"
#: The demo model's stored weights (block int16 codes, :mod:`mechir.compact`).
DEMO_WEIGHTS = "model.blockint16.safetensors"
#: Files of the stored demo model copied beside the dequantized weights.
DEMO_MODEL_FILES = (
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "training_config.json",
    "README.md",
    "measured.json",
)
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


def demo_stored_model_dir() -> Path:
    """The demo model as installed: config, tokenizer, model card and the compact weights
    ``model.blockint16.safetensors`` (not loadable by Hugging Face as is: use
    :func:`demo_model_dir`)."""
    return _existing(demo_root() / "model", DEMO_WEIGHTS)


def demo_cache_root() -> Path:
    """Where mechir caches files it derives: ``$MECHIR_CACHE``, else
    ``$XDG_CACHE_HOME/mechir``, else ``~/.cache/mechir``."""
    if os.environ.get("MECHIR_CACHE"):
        return Path(os.environ["MECHIR_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "mechir"


_ready: dict[tuple[str, int, int], Path] = {}


def demo_model_dir() -> Path:
    """The demo model as a float32 Hugging Face directory (``config.json``,
    ``model.safetensors``, tokenizer files, model card), made on first use.

    The compact weights are dequantized into ``demo-model-<digest>/`` under
    :func:`demo_cache_root` (a per-user temporary directory when that is not writable), written
    to a temporary directory and renamed into place, so concurrent processes never see a partial
    copy. An existing copy is used when its weights hash to the digest recorded in the compact
    file and its other files equal the installed ones; otherwise it is made again.

    Raises:
        FileNotFoundError: the demo assets are not installed.
        RuntimeError: the installed compact weights do not match their recorded digest, or no
            cache directory is writable.
    """
    from safetensors import safe_open

    stored = demo_stored_model_dir()
    st = (stored / DEMO_WEIGHTS).stat()
    key = (str(stored), st.st_size, st.st_mtime_ns)
    if key in _ready and (_ready[key] / "model.safetensors").is_file():
        return _ready[key]
    with safe_open(str(stored / DEMO_WEIGHTS), framework="pt") as f:
        digest = (f.metadata() or {}).get("state_sha256", "")
    if not digest.startswith("sha256:"):
        raise RuntimeError(
            f"{stored / DEMO_WEIGHTS}: no state_sha256 in its metadata; rebuild it with "
            "'python scripts/make_demo.py' or reinstall mechir"
        )
    name = f"demo-model-{digest.removeprefix('sha256:')[:12]}"
    roots = []
    try:
        roots.append(demo_cache_root())
    except RuntimeError:  # no home directory
        pass
    uid = getattr(os, "getuid", lambda: 0)()
    roots.append(Path(tempfile.gettempdir()) / f"mechir-{uid}")
    errors = []
    for root in roots:
        target = root / name
        try:
            if not _is_demo_copy(target, stored, digest):
                _materialize(stored, root, target, digest)
        except OSError as e:
            errors.append(f"{root}: {e}")
            continue
        _ready[key] = target
        return target
    raise RuntimeError(
        "cannot write the demo model's float32 copy: "
        + "; ".join(errors)
        + "; set MECHIR_CACHE to a writable directory"
    )


def _is_demo_copy(target: Path, stored: Path, digest: str) -> bool:
    """Whether ``target`` holds the dequantized demo weights (by digest) and the installed
    config, tokenizer and card files (byte for byte)."""
    from safetensors.torch import load_file

    from mechir.fingerprint import tensors_fingerprint

    weights = target / "model.safetensors"
    if not weights.is_file():
        return False
    for file in DEMO_MODEL_FILES:
        copy = target / file
        if not copy.is_file() or copy.read_bytes() != (stored / file).read_bytes():
            return False
    try:
        return tensors_fingerprint(load_file(weights)) == digest
    except Exception:  # a truncated or corrupt file
        return False


def _materialize(stored: Path, root: Path, target: Path, digest: str) -> None:
    """Dequantize the compact weights into ``target`` (via a temporary directory + rename)."""
    from safetensors.torch import save_file

    from mechir.compact import load_compact
    from mechir.fingerprint import tensors_fingerprint

    state, _ = load_compact(stored / DEMO_WEIGHTS)
    if tensors_fingerprint(state) != digest:
        raise RuntimeError(
            f"{stored / DEMO_WEIGHTS}: the dequantized weights do not match their recorded "
            f"digest {digest}; the file is damaged: reinstall mechir"
        )
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=root))
    try:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        for file in DEMO_MODEL_FILES:
            shutil.copyfile(stored / file, tmp / file)
        os.chmod(tmp / "model.safetensors", 0o644)  # readable like the copied files
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; a shared MECHIR_CACHE needs more
        if target.exists() and _is_demo_copy(target, stored, digest):
            return  # another process made it meanwhile: keep theirs (it may be in use)
        if target.exists():  # a stale or damaged copy: move it aside, then replace it
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=root))
            try:
                os.replace(target, old / "copy")
            except OSError:
                pass  # another process moved it first
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.rename(tmp, target)
        except OSError:
            if not _is_demo_copy(target, stored, digest):  # another process did not win
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


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
