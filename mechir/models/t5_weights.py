"""MonoT5's weights: Hugging Face tensor names mapped to mechir's, streamed from a checkpoint's
files (or taken from an in-memory model).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mechir.models.registry import UnsupportedModelError

# ---------------------------------------------------------------------------- weights
_ATTENTION = {"SelfAttention": "attn", "EncDecAttention": "cross_attn"}
_LINEAR = re.compile(
    r"(encoder|decoder)\.block\.(\d+)\.layer\.(\d)\.(SelfAttention|EncDecAttention|DenseReluDense)"
    r"\.(q|k|v|o|wi|wi_0|wi_1|wo|relative_attention_bias)\.weight"
)
_NORM = re.compile(r"(encoder|decoder)\.block\.(\d+)\.layer\.(\d)\.layer_norm\.weight")
#: Hugging Face names that are the shared embedding when tied (ignored: ``shared`` is read).
_EMBEDDING_ALIASES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")


def convert_tensor(name: str, tensor: Tensor, n_heads: int) -> tuple[str, Tensor] | None:
    """One Hugging Face ``T5ForConditionalGeneration`` tensor as ``(mechir name, tensor)`` (a
    view where it can be), or None for names that mechir reads elsewhere (the embedding's
    aliases, ``lm_head``).

    Raises:
        UnsupportedModelError: a tensor mechir does not know (the checkpoint is not a plain T5).
    """
    if name == "shared.weight":
        return "embed.embed.W_E", tensor
    if name in _EMBEDDING_ALIASES or name == "lm_head.weight":
        return None
    if name == "encoder.final_layer_norm.weight":
        return "ln_final.w", tensor
    if name == "decoder.final_layer_norm.weight":
        return "decoder_ln_final.w", tensor
    match = _NORM.fullmatch(name)
    if match:
        stack, layer, sub = match.group(1), match.group(2), int(match.group(3))
        prefix = "blocks" if stack == "encoder" else "decoder"
        return f"{prefix}.{layer}.ln{sub + 1}.w", tensor
    match = _LINEAR.fullmatch(name)
    if match is None:
        raise UnsupportedModelError(
            f"unknown T5 weight {name!r}: mechir loads plain T5 checkpoints"
        )
    stack, layer, _, module, lin = match.groups()
    prefix = f"{'blocks' if stack == 'encoder' else 'decoder'}.{layer}"
    if module == "DenseReluDense":
        mlp = {"wi": "W_in", "wi_0": "W_in", "wi_1": "W_gate", "wo": "W_out"}[lin]
        return f"{prefix}.mlp.{mlp}", tensor.T
    attn = f"{prefix}.{_ATTENTION[module]}"
    if lin == "relative_attention_bias":
        return f"{attn}.rel_pos_bias.weight", tensor
    if lin == "o":  # [d_model, head * d_head] -> [head, d_head, d_model]
        return f"{attn}.W_O", tensor.T.reshape(n_heads, -1, tensor.shape[0])
    d_model = tensor.shape[1]  # [head * d_head, d_model] -> [head, d_model, d_head]
    return f"{attn}.W_{lin.upper()}", tensor.view(n_heads, -1, d_model).transpose(1, 2)


def _weight_files(directory: Path) -> list[Path]:
    """The checkpoint's weight files (safetensors preferred, sharded or not)."""
    import json

    for index, single in (
        ("model.safetensors.index.json", "model.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model.bin"),
    ):
        if (directory / index).is_file():
            names = json.loads((directory / index).read_text())["weight_map"].values()
            return [directory / n for n in dict.fromkeys(names)]
        if (directory / single).is_file():
            return [directory / single]
    raise UnsupportedModelError(
        f"{directory}: no model.safetensors or pytorch_model.bin (sharded or not) to load"
    )


def _stream_tensors(directory: Path) -> Iterator[tuple[str, Tensor]]:
    """Every tensor of a local checkpoint, one at a time (safetensors read lazily; ``.bin``
    files memory-mapped)."""
    for file in _weight_files(directory):
        if file.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    yield key, f.get_tensor(key)
        else:
            try:
                state = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
            except RuntimeError:  # a legacy (non-zip) file cannot be memory-mapped
                state = torch.load(file, map_location="cpu", weights_only=True)
            yield from state.items()
            del state


def _hf_tensors(hf: Any) -> Iterator[tuple[str, Tensor]]:
    """The tensors of an in-memory ``T5ForConditionalGeneration`` (``lm_head`` only when it is
    not the shared embedding)."""
    if hf.encoder.embed_tokens.weight.data_ptr() != hf.shared.weight.data_ptr():
        raise UnsupportedModelError(
            "the encoder's embed_tokens is not the shared embedding: mechir loads T5 models "
            "whose encoder and decoder share one input embedding"
        )
    for name, tensor in hf.state_dict().items():
        if name == "lm_head.weight" and tensor.data_ptr() == hf.shared.weight.data_ptr():
            continue
        yield name, tensor.detach()
