"""Defaults set once, for the ``mechir`` command and the bundled studies.

A value is taken from the first of:

1. the command line (``--model ...``);
2. an environment variable ``MECHIR_<KEY>`` (``MECHIR_MODEL``, ``MECHIR_DATASET``,
   ``MECHIR_SPLIT``, ``MECHIR_RUN``, ``MECHIR_DEPTH``, ``MECHIR_MAX_LENGTH``, ``MECHIR_DEVICE``,
   ``MECHIR_BATCH_SIZE``);
3. ``./mechir.toml`` (the project's file), then ``$XDG_CONFIG_HOME/mechir/config.toml``
   (default ``~/.config/mechir/config.toml``, the user's file); ``MECHIR_CONFIG=<file>``
   replaces both. Keys are the option names with ``_`` or ``-``::

       model = "../shared/models/minilm-l6-ce-scifact"
       dataset = "../shared/data/scifact"
       split = "quick"
       max_length = 160

   Relative paths in a file are taken relative to that file's directory;
4. the built-in default (the studies': MonoBERT-large on TREC DL 2019, judged queries).

Model-derived defaults: :func:`default_max_length` reads what the model directory records
(tokenizer ``model_max_length`` when sane, sentence-transformers' ``max_seq_length``), else
its position limit.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

#: Settable keys and their types.
KEYS: dict[str, type] = {
    "model": str,
    "dataset": str,
    "split": str,
    "run": str,
    "depth": int,
    "max_length": int,
    "device": str,
    "batch_size": int,
}
#: Keys whose values are paths when they exist relative to the config file.
_PATH_KEYS = ("model", "dataset", "run")
ENV_PREFIX = "MECHIR_"


class SettingsError(ValueError):
    """A default set in the environment or a config file is invalid."""


def config_files(environ: Mapping[str, str] | None = None, cwd: Path | None = None) -> list[Path]:
    """The config files consulted, most important first (those that exist)."""
    env = os.environ if environ is None else environ
    if env.get("MECHIR_CONFIG"):
        path = Path(env["MECHIR_CONFIG"]).expanduser()
        if not path.is_file():
            raise SettingsError(f"MECHIR_CONFIG={path}: no such file")
        return [path]
    home = Path(env.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    candidates = [(cwd or Path.cwd()) / "mechir.toml", home / "mechir" / "config.toml"]
    return [p for p in candidates if p.is_file()]


def _convert(key: str, value: Any, where: str) -> Any:
    kind = KEYS[key]
    if kind is int:
        try:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        except (TypeError, ValueError):
            raise SettingsError(f"{where}: {key} must be an integer, got {value!r}") from None
    if not isinstance(value, str):
        raise SettingsError(f"{where}: {key} must be a string, got {value!r}")
    return value


def _read_file(path: Path) -> dict[str, Any]:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib

    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise SettingsError(f"{path}: not valid TOML ({err})") from None
    out = {}
    for raw, value in data.items():
        key = raw.replace("-", "_")
        if key not in KEYS:
            raise SettingsError(f"{path}: unknown key {raw!r}; known keys: {', '.join(KEYS)}")
        value = _convert(key, value, str(path))
        if key in _PATH_KEYS and (path.parent / value).exists():
            value = os.path.normpath(path.parent / value)
        out[key] = value
    return out


def user_defaults(
    environ: Mapping[str, str] | None = None, cwd: Path | None = None
) -> dict[str, Any]:
    """The defaults set in the environment and the config files (see the module docstring).

    Raises:
        SettingsError: an unknown key, a value of the wrong type, unreadable TOML.
    """
    env = os.environ if environ is None else environ
    merged: dict[str, Any] = {}
    for path in reversed(config_files(env, cwd)):
        merged.update(_read_file(path))
    for key in KEYS:
        name = ENV_PREFIX + key.upper()
        if env.get(name):
            merged[key] = _convert(key, env[name], name)
    return merged


def apply_defaults(parser: Any, defaults: Mapping[str, Any]) -> None:
    """Set the defaults of ``parser``'s options that ``defaults`` names (others are ignored)."""
    dests = {a.dest for a in parser._actions}
    known = {k: v for k, v in defaults.items() if k in dests}
    if known:
        parser.set_defaults(**known)
        for action in parser._actions:
            if action.dest in known:
                action.required = False


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def position_limit(model: str | os.PathLike) -> int | None:
    """The longest input the model's ``config.json`` allows (local directory or cached hub
    snapshot), without loading the model: ``max_position_embeddings``, less RoBERTa's and
    XLM-R's position offset ``pad_token_id + 1``; None when unknown."""
    from mechir.model_files import local_model_directory

    directory = local_model_directory(model)
    if directory is None:
        return None
    config = _read_json(directory / "config.json")
    value = config.get("max_position_embeddings")
    if not isinstance(value, int) or value <= 0:
        return None
    if config.get("model_type") in ("roberta", "xlm-roberta"):  # positions padding_idx + 1 + i
        pad = config.get("pad_token_id")
        value -= (pad if isinstance(pad, int) else 1) + 1
    return value if value > 0 else None


def check_model_type(config_path: str | os.PathLike) -> Any:
    """The family (:class:`mechir.models.Family`) that a model's ``config.json`` names by its
    ``model_type``, read as JSON before Transformers parses it (whose error for an unknown type
    advises upgrading Transformers and names no file); None when the file names no
    ``model_type`` (the loader decides then).

    Raises:
        UnsupportedModelError: a ``model_type`` mechir does not load (the message names the
            file, the type and the families mechir loads).
        SettingsError: the file is not a JSON object.
    """
    from mechir.models.registry import SUPPORTED, UnsupportedModelError, families_of

    path = Path(config_path)
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as err:
        raise SettingsError(f"{path}: not valid JSON ({err}); re-save the model") from None
    if not isinstance(config, dict):
        raise SettingsError(f"{path}: not a JSON object; re-save the model")
    model_type = config.get("model_type")
    if model_type is None:
        return None
    families = families_of(model_type) if isinstance(model_type, str) else []
    if not families:
        raise UnsupportedModelError(
            f"{path}: model_type {model_type!r} is not supported; mechir loads {SUPPORTED}"
        )
    return families[0]


def model_family(model: str | os.PathLike) -> Any:
    """:func:`check_model_type` of the model's ``config.json`` when its files are local (a
    directory, a cached hub snapshot, ``demo``), without loading it; else None."""
    from mechir.model_files import local_model_directory

    directory = local_model_directory(model)
    if directory is None or not (directory / "config.json").is_file():
        return None
    return check_model_type(directory / "config.json")


def default_max_length(model: str | os.PathLike) -> int | None:
    """Tokens per pair the model was trained with, as its directory records it.

    The sentence-transformers ``max_seq_length`` (``sentence_bert_config.json``) if present,
    else the tokenizer's ``model_max_length`` when it is a real length (not the ~1e30
    placeholder, at most the position limit), else the position limit; None when the model's
    files are not available locally."""
    from mechir.model_files import local_model_directory

    directory = local_model_directory(model)
    if directory is None:
        return None
    limit = position_limit(model)
    for file, key in (
        ("sentence_bert_config.json", "max_seq_length"),
        ("tokenizer_config.json", "model_max_length"),
    ):
        value = _read_json(directory / file).get(key)
        real = isinstance(value, int) and 0 < value <= 1_000_000  # not the ~1e30 placeholder
        if real and (limit is None or value <= limit):
            return value
    return limit


def check_model_source(model: str | os.PathLike) -> None:
    """Reject a model path that does not exist (a hub id is ``org/name``) or a directory
    without ``config.json``, before anything is loaded.

    Raises:
        SettingsError: naming the path.
    """
    text = str(model)
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise SettingsError(
                f"--model {text}: the directory has no config.json (not a saved model; a "
                "cross-encoder directory holds config.json, weights and tokenizer files)"
            )
        return
    if path.exists() or text.startswith((".", "/", "~")) or text.count("/") > 1:
        raise SettingsError(
            f"--model {text}: no such model directory (a hub id looks like 'org/name')"
        )


def cuda_available() -> bool:
    """Whether torch sees a CUDA device (imports torch)."""
    import torch

    return torch.cuda.is_available()


def check_device(device: str | None) -> None:
    """Reject a CUDA device on a machine without CUDA, before anything is loaded.

    Raises:
        SettingsError: ``device`` names CUDA and none is available.
    """
    if device and str(device).startswith("cuda") and not cuda_available():
        raise SettingsError(
            f"--device {device}: CUDA is not available on this machine; use --device cpu "
            "(or leave --device unset: CUDA when available, else CPU)"
        )
