from __future__ import annotations

import pytest

from mechir import load_cross_encoder
from tests.families.builders import FAMILY_NAMES, load_hf, save_tiny_family
from tests.helpers import DOCUMENTS, QUERIES


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
