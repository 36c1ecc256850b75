from __future__ import annotations

import os

from jaxtyping import install_import_hook

# Shapes are checked in the test suite: every function and dataclass of mechir and patching is
# wrapped in jaxtyping's @jaxtyped with beartype, so an annotation that drifts from the code fails
# a test. Installed before anything imports the packages (MECHIR_TYPECHECK=0 turns it off).
if os.environ.get("MECHIR_TYPECHECK", "1") != "0":
    # is_pep484_tower: an int is a valid float, as PEP 484 says
    install_import_hook(
        ["mechir", "patching"],
        "beartype.beartype(conf=beartype.BeartypeConf(is_pep484_tower=True))",
    )

import pytest  # noqa: E402

from tests.helpers import DOCUMENTS, QUERIES, tiny_cross_encoder  # noqa: E402


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """A tiny random 1-label cross-encoder: ``(model, hf_model, tokenizer)``."""
    return tiny_cross_encoder(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def tiny_batch(tiny):
    model, _, _ = tiny
    return model.encode(QUERIES, DOCUMENTS, max_length=64)


@pytest.fixture()
def unchecked_shapes(monkeypatch):
    """Turn the test suite's type and shape checks off for one test: for tests of the library's
    own error messages on wrong input, which the checks would otherwise pre-empt."""
    import jaxtyping

    monkeypatch.setattr(jaxtyping.config, "jaxtyping_disable", True)
