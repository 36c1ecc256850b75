"""A decoder reranker's TransformerLens config, translated from its Hugging Face config (rotary
settings, sliding windows, grouped key/value heads, QK-norm), and its dimensions.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from mechir.models.registry import UnsupportedModelError
from mechir.models.tl import HookedTransformerConfig

#: Hugging Face ``model_type`` -> what the family's config needs (checked in the config).
_MODEL_TYPES = ("qwen2", "qwen3", "llama", "mistral")
_ACTIVATIONS = ("silu", "gelu", "gelu_new", "gelu_pytorch_tanh", "relu")


# ====================================================================== configs
def _rope(hf: Any) -> dict[str, Any]:
    """TransformerLens's rotary settings of a Hugging Face config (default and Llama-3 scaling;
    others are refused)."""
    params = getattr(hf, "rope_parameters", None) or getattr(hf, "rope_scaling", None) or {}
    theta = params.get("rope_theta", getattr(hf, "rope_theta", None)) or 10000.0
    rope_type = params.get("rope_type", params.get("type", "default")) or "default"
    out: dict[str, Any] = {"rotary_base": float(theta)}
    if rope_type == "llama3":
        out |= {
            "use_NTK_by_parts_rope": True,
            "NTK_original_ctx_len": params["original_max_position_embeddings"],
            "NTK_by_parts_low_freq_factor": params.get("low_freq_factor", 1.0),
            "NTK_by_parts_high_freq_factor": params.get("high_freq_factor", 4.0),
            "NTK_by_parts_factor": params.get("factor", 8.0),
        }
    elif rope_type != "default":
        raise UnsupportedModelError(
            f"rope_type {rope_type!r} is not supported for decoder rerankers (default and "
            "llama3 only)"
        )
    return out


def _sliding_window(hf: Any) -> int | None:
    """The attention window, when the config really uses one (Mistral v0.1; Qwen with
    ``use_sliding_window``); None: full causal attention."""
    window = getattr(hf, "sliding_window", None)
    if hf.model_type in ("qwen2", "qwen3") and not getattr(hf, "use_sliding_window", False):
        return None
    types = getattr(hf, "layer_types", None)
    if types and any(t != "full_attention" for t in types) and hf.model_type != "mistral":
        raise UnsupportedModelError(
            f"layer types {sorted(set(types))} are not supported (full attention in every layer)"
        )
    return window if window else None


def hooked_config_from_hf(
    hf: Any,
    *,
    architecture: str,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> HookedTransformerConfig:
    """TransformerLens config of a Qwen2/Qwen3/Llama/Mistral Hugging Face config, built as
    TransformerLens's ``loading_from_pretrained`` maps these architectures (no weight folding).

    Raises:
        UnsupportedModelError: a setting mechir cannot reproduce exactly (MLP biases, attention
            biases with QK-norm, rope scaling other than Llama-3's, mixed layer types).
    """
    if hf.model_type not in _MODEL_TYPES:
        raise UnsupportedModelError(
            f"model_type {hf.model_type!r} is not a decoder family mechir loads "
            f"({', '.join(_MODEL_TYPES)})"
        )
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    n_heads = hf.num_attention_heads
    d_head = getattr(hf, "head_dim", None) or hf.hidden_size // n_heads
    n_kv = getattr(hf, "num_key_value_heads", None) or n_heads
    if getattr(hf, "mlp_bias", False):
        raise UnsupportedModelError(
            "mlp_bias=True is not supported: TransformerLens's gated MLP has no gate/up biases"
        )
    qk_norm = hf.model_type == "qwen3"
    if qk_norm and getattr(hf, "attention_bias", False):
        raise UnsupportedModelError(
            "attention_bias=True with Qwen3's QK-norm is not supported (no released checkpoint "
            "has it)"
        )
    if hf.hidden_act not in _ACTIVATIONS:
        raise UnsupportedModelError(
            f"hidden_act {hf.hidden_act!r} is not supported: one of {_ACTIVATIONS}"
        )
    window = _sliding_window(hf)
    arch = re.sub(r"ForSequenceClassification$", "ForCausalLM", architecture)
    return HookedTransformerConfig(
        d_model=hf.hidden_size,
        d_head=d_head,
        n_heads=n_heads,
        n_key_value_heads=n_kv if n_kv != n_heads else None,
        d_mlp=hf.intermediate_size,
        n_layers=hf.num_hidden_layers,
        n_ctx=hf.max_position_embeddings,
        eps=hf.rms_norm_eps,
        d_vocab=hf.vocab_size,
        act_fn=hf.hidden_act,
        normalization_type="RMS",
        positional_embedding_type="rotary",
        rotary_dim=d_head,
        rotary_adjacent_pairs=False,
        final_rms=True,
        gated_mlp=True,
        use_qk_norm=qk_norm,
        attention_dir="causal",
        use_local_attn=window is not None,
        window_size=window,
        attn_types=["local"] * hf.num_hidden_layers if window is not None else None,
        original_architecture=arch,
        init_weights=False,
        default_prepend_bos=False,
        device=str(device),
        dtype=dtype,
        **_rope(hf),
    )


def dimensions(config: Any) -> dict[str, int]:
    """``n_layers``, ``n_heads`` (query heads), ``d_model``, ``d_mlp`` of a Hugging Face config."""
    return {
        "n_layers": config.num_hidden_layers,
        "n_heads": config.num_attention_heads,
        "d_model": config.hidden_size,
        "d_mlp": config.intermediate_size,
    }
