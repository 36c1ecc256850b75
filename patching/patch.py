"""Deprecated module path: activation patching now lives in :mod:`patching.targets` (what is
patched), :mod:`patching.sweep` (the batched engine) and :mod:`patching.reference` (the per-cell
oracle). Import from ``patching`` directly; the old names still resolve here."""

from __future__ import annotations

from typing import Any

from patching import reference, sweep, targets

_MODULES = (targets, sweep, reference)


def __getattr__(name: str) -> Any:
    for module in _MODULES:
        if name in module.__all__:
            return getattr(module, name)
    raise AttributeError(f"module 'patching.patch' has no attribute {name!r}")
