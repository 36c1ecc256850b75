"""Fixtures for the patching tests: a tiny model, its tokenizer, aligned TFC1 pairs."""

from __future__ import annotations

import pytest
import torch.nn as nn
from transformers import BertTokenizerFast

from mechir import load_cross_encoder
from patching import AlignedPairs, PairBuilder
from tests.helpers import DOCUMENTS, QUERIES, one_thread, tiny_hf_model, tiny_tokenizer

# one thread per module (restored after it)
_one_thread = pytest.fixture(autouse=True, scope="module")(one_thread)


@pytest.fixture(scope="session")
def tok(tmp_path_factory) -> BertTokenizerFast:
    return tiny_tokenizer(tmp_path_factory.mktemp("patching_tok"))


def make_model(tok: BertTokenizerFast, seed: int = 0, **config):
    return load_cross_encoder(tiny_hf_model(seed, **config), tokenizer=tok, device="cpu")


@pytest.fixture(scope="session")
def model(tok):
    """2 layers, 4 heads, d_model 32, one label."""
    return make_model(tok)


@pytest.fixture(scope="session")
def model3(tok):
    """3 layers (path patching needs a layer between sender and receiver)."""
    return make_model(tok, seed=1, n_layers=3)


@pytest.fixture(scope="session")
def pairs(tok) -> AlignedPairs:
    """TFC1 pairs of the four helper queries/documents (different lengths), grades 0, 1, 0, 2."""
    builder = PairBuilder(tok, max_length=64, choose="first")
    built = [
        builder.tfc1(q, d, pair_id=f"p{i}", grade=g)
        for i, (q, d, g) in enumerate(zip(QUERIES, DOCUMENTS, [0, 1, 0, 2]))
    ]
    return AlignedPairs.from_pairs(built, tok)


@pytest.fixture(scope="session")
def two_pairs(pairs) -> AlignedPairs:
    """The two shortest pairs (13 and 15 tokens): for the slow one-forward-per-cell oracles."""
    return pairs[[3, 1]]


def _affine_ln(ln: nn.Module):
    return lambda x: (x - x.mean(-1, keepdim=True)) * ln.w + ln.b


@pytest.fixture(scope="session")
def linear_tail(tok):
    """A tiny model whose score is affine in every activation of its last layer from the head
    outputs on: the last block's LayerNorms keep their centring but not their (nonlinear) scaling,
    its MLP activation is the identity, and so is the pooler's tanh. Attention patterns stay
    softmax, but the last layer's patterns feed only ``z = pattern @ v`` (linear) downstream."""
    model = make_model(tok, seed=3)
    last = model.blocks[-1]
    for ln in (last.ln1, last.ln2):
        ln.forward = _affine_ln(ln)
    last.mlp.act_fn = lambda x: x
    model.pooler.activation = nn.Identity()
    return model
