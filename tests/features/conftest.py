"""Tiny SAEs trained through SAELens on the tiny random rerankers (once per session)."""

from __future__ import annotations

import pytest

pytest.importorskip("sae_lens")

from mechir.features.saes import training_config  # noqa: E402
from mechir.features.source import ActivationStream, collect_activations  # noqa: E402
from mechir.features.training import train_sae  # noqa: E402
from tests.helpers import DOCUMENTS, QUERIES, one_thread  # noqa: E402

PAIRS = list(zip(QUERIES, DOCUMENTS))
SITE = "blocks.1.hook_resid_pre"


def tiny_sae(
    model,
    site: str,
    *,
    architecture: str = "topk",
    d_sae: int = 64,
    k: int = 4,
    steps: int = 20,
    **kw,
):
    """An SAE of ``architecture`` trained through SAELens for ``steps`` steps on ``site``."""
    acts = collect_activations(model, PAIRS, site)
    stream = ActivationStream(model, PAIRS, site, batch_size=16, seed=0)
    cfg = training_config(architecture, d_in=acts.acts.shape[1], d_sae=d_sae, site=site, k=k)
    return train_sae(cfg, stream, steps=steps, batch_size=16, lr=1e-3, progress=False, **kw), acts


_one_thread = pytest.fixture(autouse=True)(one_thread)


@pytest.fixture(scope="session")
def bert_sae(tiny):
    """``(model, sae, activations)``: a TopK SAE on the tiny BERT's ``blocks.1.hook_resid_pre``."""
    model, _, _ = tiny
    sae, acts = tiny_sae(model, SITE)
    return model, sae, acts


#: Two successive residual sites of the tiny BERT, for feature circuits.
UP, DOWN = "blocks.0.hook_resid_post", "blocks.1.hook_resid_post"


@pytest.fixture(scope="session")
def two_saes(tiny):
    """``(model, up, down)``: TopK SAEs (48 latents, k = 6) at :data:`UP` and :data:`DOWN`."""
    model, _, _ = tiny
    up, _ = tiny_sae(model, UP, d_sae=48, k=6)
    down, _ = tiny_sae(model, DOWN, d_sae=48, k=6)
    return model, up, down
