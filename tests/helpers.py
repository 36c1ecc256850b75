"""Tiny random BERT cross-encoders and shared-asset locations for the tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast  # noqa: E402

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
SHARED_MODEL = SHARED / "models" / "minilm-l6-ce-scifact"
SCIFACT = SHARED / "data" / "scifact"
DL19 = SHARED / "data" / "msmarco-dl19-subset"
SHARED_MAX_LENGTH = 160

WORDS = (
    "the a of and to in is cat dog bird fish tree house car road water fire stone light dark "
    "small big red blue green quick slow runs jumps sleeps eats reads what where who how why "
    "protein cell gene cancer drug study patients risk effect increase decrease blood brain"
).split()


def requires_shared(path: Path = SHARED_MODEL) -> None:
    """Skip the calling test when a shared asset is absent (a user's machine has none)."""
    if not path.exists():
        pytest.skip(f"shared asset {path} not found (only present on the project's machines)")


def tiny_tokenizer(tmp_dir: Path) -> BertTokenizerFast:
    """A WordPiece tokenizer over a ~60-token vocabulary (special tokens first)."""
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, "##s", "##ing", "?", ".", ","]
    path = Path(tmp_dir) / "vocab.txt"
    path.write_text("\n".join(vocab) + "\n")
    return BertTokenizerFast(vocab=str(path), do_lower_case=True)


def tiny_bert_config(
    *,
    num_labels: int = 1,
    n_layers: int = 2,
    n_heads: int = 4,
    d_model: int = 32,
    d_mlp: int | None = None,
    vocab_size: int = 64,
    max_positions: int = 64,
    initializer_range: float = 0.3,
) -> BertConfig:
    return BertConfig(
        vocab_size=vocab_size,
        hidden_size=d_model,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        intermediate_size=d_mlp or 4 * d_model,
        max_position_embeddings=max_positions,
        num_labels=num_labels,
        initializer_range=initializer_range,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        architectures=["BertForSequenceClassification"],
    )


def tiny_hf_model(seed: int = 0, **config_kwargs) -> BertForSequenceClassification:
    """A random ``BertForSequenceClassification`` (eager attention, eval mode), large weights."""
    torch.manual_seed(seed)
    model = BertForSequenceClassification(tiny_bert_config(**config_kwargs))
    with torch.no_grad():  # non-trivial LayerNorm and bias parameters, so none of them is idle
        for name, p in model.named_parameters():
            if "LayerNorm.weight" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    model.config._attn_implementation = "eager"
    return model.eval()


def tiny_cross_encoder(
    tmp_dir: Path, seed: int = 0, dtype: torch.dtype = torch.float32, **config_kwargs
):
    """``(hooked_model, hf_model, tokenizer)`` for a tiny random BERT cross-encoder on CPU."""
    from mechir import load_cross_encoder

    tok = tiny_tokenizer(tmp_dir)
    hf = tiny_hf_model(seed, **config_kwargs).to(dtype)
    return load_cross_encoder(hf, tokenizer=tok, device="cpu", dtype=dtype), hf, tok


QUERIES = ["what cat runs", "how big is the blue fish", "who eats", "red car road"]
DOCUMENTS = [
    "the cat runs in the house and the dog sleeps",
    "a small fish is blue",
    "the bird eats the red stone and reads of the water in the tree of the big house",
    "slow car on a dark road",
]


def one_thread():
    """An autouse fixture body (``_one_thread = pytest.fixture(autouse=True)(one_thread)`` in a
    conftest): every test of the directory on one torch thread (small models: threads only add
    noise), the thread count restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
