"""A decoder reranker's weights: Hugging Face tensors read one at a time from a checkpoint's files
(or an in-memory model), split into TransformerLens's per-head layout and set on a meta-device
model, so two copies never exist.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from mechir.models.tl import rotary_base

# ====================================================================== weights
_LAYER = re.compile(r"layers\.(\d+)\.(.+)$")
#: Hugging Face tensors that hold no weight of the model (buffers of old checkpoints).
_IGNORED = ("rotary_emb.inv_freq",)


def _checkpoint_files(directory: Path) -> list[Path]:
    """The weight files of a model directory (safetensors preferred, sharded or not)."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [directory / n for n in names]
    if (directory / "model.safetensors").is_file():
        return [directory / "model.safetensors"]
    index = directory / "pytorch_model.bin.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [directory / n for n in names]
    if (directory / "pytorch_model.bin").is_file():
        return [directory / "pytorch_model.bin"]
    raise ValueError(f"{directory}: no weights (model.safetensors or pytorch_model.bin)")


class _Checkpoint:
    """The tensors of a checkpoint, read one at a time (safetensors: the file is opened for each
    tensor, so at most one tensor's pages are mapped at once; ``.bin``: memory-mapped)."""

    def __init__(self, files: list[Path]):
        self.where: dict[str, Path] = {}
        self._bins: dict[Path, dict[str, Tensor]] = {}
        for file in files:
            for name in self._keys(file):
                self.where[name] = file

    def _keys(self, file: Path) -> list[str]:
        if file.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(file), framework="pt") as f:
                return list(f.keys())
        self._bins[file] = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
        return list(self._bins[file])

    def get(self, name: str, rows: Sequence[int] | None = None) -> Tensor:
        """Tensor ``name`` (only ``rows`` of it, when given)."""
        file = self.where[name]
        if file in self._bins:
            t = self._bins[file][name]
            return t[list(rows)].clone() if rows is not None else t
        from safetensors import safe_open

        with safe_open(str(file), framework="pt") as f:
            if rows is None:
                return f.get_tensor(name)
            sl = f.get_slice(name)
            return torch.cat([sl[r : r + 1] for r in rows])


def _hf_tensors(hf_model: nn.Module) -> Any:
    """An in-memory Hugging Face model's tensors, with the :class:`_Checkpoint` interface."""

    class _InMemory:
        def __init__(self) -> None:
            self.tensors = {k: v.detach() for k, v in hf_model.state_dict().items()}
            self.where = dict.fromkeys(self.tensors)

        def get(self, name: str, rows: Sequence[int] | None = None) -> Tensor:
            t = self.tensors[name]
            return t[list(rows)] if rows is not None else t

    return _InMemory()


def _split_heads_in(w: Tensor, n: int) -> Tensor:
    """``[(n d), m]`` -> ``[n, m, d]``, a view (TransformerLens's W_Q/W_K/W_V)."""
    return w.view(n, -1, w.shape[-1]).permute(0, 2, 1)


def _layer_tensor(model: nn.Module, layer: int, rest: str, t: Tensor) -> tuple[str, Tensor] | None:
    """The mechir name and view of one Hugging Face per-layer tensor (None: not a weight)."""
    cfg = model.cfg
    n_kv = cfg.n_key_value_heads or cfg.n_heads
    gqa = "_" if cfg.n_key_value_heads is not None else ""
    p = f"blocks.{layer}"
    simple = {
        "input_layernorm.weight": f"{p}.ln1.w",
        "post_attention_layernorm.weight": f"{p}.ln2.w",
        "self_attn.q_norm.weight": f"{p}.attn.q_norm.w",
        "self_attn.k_norm.weight": f"{p}.attn.k_norm.w",
        "self_attn.o_proj.bias": f"{p}.attn.b_O",
    }
    if rest in simple:
        return simple[rest], t
    heads = {"q": ("Q", cfg.n_heads, ""), "k": ("K", n_kv, gqa), "v": ("V", n_kv, gqa)}
    match = re.fullmatch(r"self_attn\.([qkv])_proj\.(weight|bias)", rest)
    if match:
        name, n, prefix = heads[match.group(1)]
        if match.group(2) == "weight":
            return f"{p}.attn.{prefix}W_{name}", _split_heads_in(t, n)
        return f"{p}.attn.{prefix}b_{name}", t.view(n, -1)
    if rest == "self_attn.o_proj.weight":  # [m, (n d)] -> [n, d, m]
        return f"{p}.attn.W_O", t.view(t.shape[0], cfg.n_heads, -1).permute(1, 2, 0)
    mlp = {"gate_proj": "W_gate", "up_proj": "W_in", "down_proj": "W_out"}
    match = re.fullmatch(r"mlp\.(gate_proj|up_proj|down_proj)\.weight", rest)
    if match:
        return f"{p}.mlp.{mlp[match.group(1)]}", t.T
    return None


def _set(model: nn.Module, name: str, value: Tensor) -> None:
    """Put ``value`` as the parameter ``name`` (replacing the meta placeholder)."""
    *path, leaf = name.split(".")
    module = model
    for step in path:
        module = getattr(module, step)
    old = getattr(module, leaf, None)
    if not isinstance(old, nn.Parameter) or tuple(old.shape) != tuple(value.shape):
        shape = None if old is None else tuple(old.shape)
        raise ValueError(
            f"weight {name}: shape {tuple(value.shape)} does not fit the model's {shape}: the "
            "checkpoint does not match its config.json"
        )
    setattr(module, leaf, nn.Parameter(value, requires_grad=old.requires_grad))


def _load_weights(
    model: nn.Module,
    tensors: Any,
    *,
    label_ids: tuple[int, int] | None,
    tied: bool,
    device: torch.device,
    dtype: torch.dtype,
    source: str,
) -> None:
    """Stream the checkpoint's tensors into ``model`` (see the module docstring); a yes/no
    reranker's ``lm_head`` rows ``label_ids`` (non-relevant, relevant: the labels 0 and 1)
    become its classifier."""
    names = list(tensors.where)
    prefix = "model." if any(n.startswith("model.") for n in names) else ""
    done: set[str] = set()
    head_rows = None

    def put(name: str, t: Tensor, hf_name: str) -> None:
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise ValueError(
                f"{source}: weight {hf_name!r} has {bad} non-finite values (NaN/inf) out of "
                f"{t.numel()}: the checkpoint is corrupted; re-download or re-save it"
            )
        _set(model, name, t)
        done.add(name)

    def convert(t: Tensor) -> Tensor:
        return t.to(device=device, dtype=dtype)

    for hf_name in names:
        short = hf_name[len(prefix) :] if hf_name.startswith(prefix) else hf_name
        if short.endswith(_IGNORED):
            continue
        if hf_name == "lm_head.weight":
            if label_ids is not None:
                head_rows = convert(tensors.get(hf_name, rows=label_ids))
            continue
        if hf_name in ("score.weight", "score.bias"):
            if label_ids is None:
                t = convert(tensors.get(hf_name))
                put("classifier.W" if hf_name.endswith("weight") else "classifier.b",
                    t.T if hf_name.endswith("weight") else t, hf_name)  # fmt: skip
            continue
        if short == "embed_tokens.weight":
            put("embed.W_E", convert(tensors.get(hf_name)), hf_name)
            continue
        if short == "norm.weight":
            put("ln_final.w", convert(tensors.get(hf_name)), hf_name)
            continue
        match = _LAYER.match(short)
        mapped = None
        if match and int(match.group(1)) < model.cfg.n_layers:
            t = convert(tensors.get(hf_name))
            mapped = _layer_tensor(model, int(match.group(1)), match.group(2), t)
        if mapped is None:
            raise ValueError(
                f"{source}: unexpected weight {hf_name!r} for a {model.cfg.original_architecture} "
                f"of {model.cfg.n_layers} layers: the checkpoint does not match its config.json"
            )
        put(*mapped, hf_name)
    if label_ids is not None:
        if head_rows is None:
            if not tied:
                raise ValueError(
                    f"{source}: no lm_head.weight and the embeddings are not tied: the "
                    "checkpoint has no language-model head"
                )
            head_rows = model.embed.W_E.detach()[list(label_ids)].clone()
        put("classifier.W", head_rows.T.contiguous(), "lm_head.weight")
        put("classifier.b", torch.zeros(2, device=device, dtype=dtype), "lm_head.weight")
    _materialize(model, done, device, dtype, source)


def _materialize(
    model: nn.Module, loaded: set[str], device: torch.device, dtype: torch.dtype,
    source: str,
) -> None:  # fmt: skip
    """Biases the checkpoint has none of become zeros; buffers are built on ``device``; a weight
    still missing is an error."""
    for name, p in list(model.named_parameters()):
        if name in loaded or not p.is_meta:
            continue
        leaf = name.rsplit(".", 1)[-1]
        if leaf.startswith(("b_", "_b_")) or leaf == "b":
            _set(model, name, torch.zeros(p.shape, device=device, dtype=dtype))
        else:
            raise ValueError(
                f"{source}: weight {name!r} is missing from the checkpoint: it does not match "
                "its config.json"
            )
    cfg = model.cfg
    for block in model.blocks:
        attn = block.attn
        attn.mask = torch.empty((0, 0), dtype=torch.bool, device=device)
        attn.IGNORE = torch.tensor(-torch.inf, device=device)
        size = min(cfg.n_ctx, attn.ROTARY_INITIAL_CACHE_SIZE)
        sin, cos = attn.calculate_sin_cos_rotary(
            cfg.rotary_dim, size, base=rotary_base(attn), dtype=dtype
        )
        attn.rotary_sin, attn.rotary_cos = sin.to(device), cos.to(device)
    meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if meta:
        raise RuntimeError(f"weight conversion left {meta[:3]} unset")
