"""Modules imported on first use, so that ``--help``, argument errors and ``import mechir`` do not
pay for torch, pandas or matplotlib (about 2 s on a small CPU) before they are needed.

``torch = lazy_import("torch")`` binds a module object at once and runs the module's code on the
first attribute access (``torch.ones``, ``torch.Tensor``), through the standard library's
:class:`importlib.util.LazyLoader`. A module that is already imported is returned as it is; a
plain ``import torch`` elsewhere imports it eagerly, as usual. Annotations that name a lazy module
(``Float[torch.Tensor, "batch"]``) are strings under ``from __future__ import annotations`` and
resolve it only when a type checker reads them.
"""

from __future__ import annotations

import importlib.util
import sys
from types import ModuleType


def lazy_import(name: str) -> ModuleType:
    """The module ``name`` (a dotted name: its parents are imported now), executed on first use.

    Raises:
        ModuleNotFoundError: ``name`` is not installed (checked now, not at first use).
    """
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None:
        raise ModuleNotFoundError(f"No module named {name!r}", name=name)
    loader = importlib.util.LazyLoader(spec.loader)
    spec.loader = loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    loader.exec_module(module)
    return module
