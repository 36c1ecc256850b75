from __future__ import annotations

import pytest

from mechir import load_cross_encoder
from tests.families.builders import (
    FAMILY_NAMES,
    load_hf,
    load_hf_t5,
    save_tiny_family,
    save_tiny_t5,
)
from tests.helpers import DOCUMENTS, QUERIES, one_thread

_one_thread = pytest.fixture(autouse=True)(one_thread)


@pytest.fixture(scope="session")
def family_dirs(tmp_path_factory):
    """One saved tiny checkpoint directory per family (built lazily, once per session)."""
    cache: dict[str, object] = {}

    def get(name: str):
        if name not in cache:
            cache[name] = save_tiny_family(name, tmp_path_factory.mktemp(name))
        return cache[name]

    return get


@pytest.fixture(scope="session", params=FAMILY_NAMES)
def family(request, family_dirs):
    """``(name, hooked_model, hf_model, batch)`` for each family, loaded from its directory."""
    name = request.param
    directory = family_dirs(name)
    model = load_cross_encoder(directory, device="cpu")
    batch = model.encode(QUERIES, DOCUMENTS)
    return name, model, load_hf(name, directory), batch


# ------------------------------------------------------------------ MonoT5
@pytest.fixture(scope="session")
def t5_dirs(tmp_path_factory):
    """One saved tiny MonoT5 per variant (built lazily, once per session)."""
    cache = {}

    def get(variant: str):
        if variant not in cache:
            directory = tmp_path_factory.mktemp(f"t5-{variant}")
            cache[variant] = save_tiny_t5(directory, gated=variant == "v1.1")
        return cache[variant]

    return get


@pytest.fixture(scope="session", params=("v1.0", "v1.1"))
def t5(request, t5_dirs):
    """``(variant, hooked model, HF model, padded batch)`` loaded from the saved directory."""
    directory = t5_dirs(request.param)
    model = load_cross_encoder(directory, device="cpu")
    return request.param, model, load_hf_t5(directory), model.encode(QUERIES, DOCUMENTS)
