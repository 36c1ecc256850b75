"""Short, informative reprs for result and data classes (sizes, names, a few examples).

A REPL or notebook cell that shows a result must not print megabytes of tensors or documents:
:func:`describe` summarises one value in a few dozen characters, :func:`short_list` the first
elements of a long list.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

#: How many elements of a list or mapping a repr shows before "...".
EXAMPLES = 3
#: Longest text shown from a string value.
TEXT_WIDTH = 40


def _clip(text: str, width: int = TEXT_WIDTH) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def describe(value: Any) -> str:
    """A one-line summary: ``float32[4, 2, 12]`` for a tensor or array, ``DataFrame[120 x 5:
    qid, ...]`` for a table, ``dict[300]: {'a': ..., ...}`` for a large mapping, a clipped repr
    otherwise."""
    import numpy as np
    import pandas as pd
    import torch

    if isinstance(value, torch.Tensor):
        dtype = str(value.dtype).removeprefix("torch.")
        device = "" if value.device.type == "cpu" else f" on {value.device}"
        return f"{dtype}[{', '.join(map(str, value.shape))}]{device}"
    if isinstance(value, np.ndarray):
        return f"{value.dtype}[{', '.join(map(str, value.shape))}]"
    if isinstance(value, pd.DataFrame):
        cols = ", ".join(map(str, value.columns[:6])) + (", ..." if value.shape[1] > 6 else "")
        return f"DataFrame[{value.shape[0]} x {value.shape[1]}: {cols}]"
    if isinstance(value, str):
        return repr(_clip(value))
    if isinstance(value, Mapping):
        items = [f"{k!r}: {describe(v)}" for k, v in list(value.items())[:EXAMPLES]]
        more = ", ..." if len(value) > EXAMPLES else ""
        return f"dict[{len(value)}]: {{{', '.join(items)}{more}}}"
    if isinstance(value, Sequence) and not isinstance(value, bytes) and len(value) > EXAMPLES:
        shown = ", ".join(describe(v) for v in value[:EXAMPLES])
        return f"{type(value).__name__}[{len(value)}]: [{shown}, ...]"
    return _clip(repr(value), 2 * TEXT_WIDTH)


def short_list(values: Sequence[Any], n: int = 5) -> str:
    """``[a, b, c, d, e, ...]`` with at most ``n`` elements shown."""
    shown = ", ".join(map(str, values[:n]))
    return f"[{shown}{', ...' if len(values) > n else ''}]"


def fields_repr(obj: Any) -> str:
    """``Name(field=<summary>, ...)`` for a dataclass, every field through :func:`describe`:
    the default repr of a result holding tensors or tables, kept to a few lines."""
    from dataclasses import fields

    parts = [f"{f.name}={describe(getattr(obj, f.name))}" for f in fields(obj) if f.repr]
    return f"{type(obj).__name__}({', '.join(parts)})"
