"""Decoder LLM rerankers on TransformerLens's ``HookedTransformer``: pointwise yes/no
``*ForCausalLM`` rerankers (``Qwen/Qwen3-Reranker-*``) and ``*ForSequenceClassification``
decoders (RankLLaMA), for the Qwen2/2.5, Qwen3, Llama and Mistral architectures.

The input is a prompt: a template with ``{query}``, ``{document}`` and optionally
``{instruction}`` (and ``{bos}``/``{eos}``, the tokenizer's own tokens), rendered and tokenized as
one string. Every token gets a :class:`~mechir.parts.Part` from the character span it covers
(:func:`mechir.models.prompt.token_parts`, the rule of every prompt-based reranker):
``QUERY``, ``DOCUMENT``, ``INSTRUCTION``, and for the template's own text, by position,
``CLS`` ("prefix", before the query), ``SEP1`` ("middle", between query and document) and
``SEP2`` ("suffix", after the document). A document too long for ``max_length`` is cut at a token
boundary and the prompt re-tokenized. Batches are right-padded by default; left-padded batches
(``padding_side="left"``, as Qwen3-Reranker's own code pads) score identically.

The computation, with the hook point of every step (TransformerLens's names)::

    hook_embed (W_E[t]) -> hook_full_embed                          no position embedding
    blocks.{l}: hook_resid_pre -> ln1 (RMSNorm) -> attn -> hook_attn_out
                attn: hook_q, hook_k, hook_v (GQA: n_key_value_heads heads for k and v),
                      Qwen3: q_norm/k_norm (RMSNorm per head) after hook_q/hook_k,
                      hook_rot_q, hook_rot_k (rotary), hook_attn_scores (causal and padding
                      masks: -inf), hook_pattern, hook_z
                hook_resid_mid -> ln2 -> mlp (hook_pre = x W_gate, hook_pre_linear = x W_in,
                hook_post = act(hook_pre) * hook_pre_linear) -> hook_mlp_out -> hook_resid_post
    ln_final -> hook_final_hidden                                   the final hidden states
    -> pooler.hook_pooler_out      final hidden state of each example's last real token (a
                                   classifier with a pad token: its last real token that is not
                                   the pad token, as Hugging Face pools)
    -> classifier.hook_logits      [batch, 2] = (logit(no), logit(yes)) of the language-model
                                   head; or the ``score`` head's logits (``*ForSequence-
                                   Classification``)
    -> hook_score                  logit(yes) - logit(no); the classifier's logit

* The yes/no score ``logit(yes) - logit(no)`` ranks exactly like Qwen3-Reranker's own
  ``softmax([logit(no), logit(yes)])[1]`` (``score_type="prob"`` returns that probability);
  only the two answer rows of the language-model head are kept (no vocabulary-sized matrix).
* Rotary positions count real tokens (``0..n-1`` whatever the padding); Hugging Face counts
  padding on the left too: the two agree because rotary attention depends on relative
  positions only.
* Weights are streamed from the safetensors files one tensor at a time into a model built on the
  meta device, each converted to TransformerLens's layout as a view of Hugging Face's (no copy
  in the forward pass): loading never holds two copies of the weights.
"""

from __future__ import annotations

import functools
import json
import os
import re
import string
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn as nn
from jaxtyping import Float, Int
from torch import Tensor

from mechir.interface import Abilities
from mechir.models.encoder import CrossEncoderClassifier, HookedCrossEncoder, attend
from mechir.models.hooked import HookedRerankerMixin
from mechir.models.prompt import pad_token_id, pair_lists, token_parts
from mechir.models.registry import Family, LoadOptions, UnsupportedModelError
from mechir.models.scores import DEFAULT_SCORE_TYPE, ScoreType, check_score_type
from mechir.models.tl import (
    Attention,
    Embed,
    GroupedQueryAttention,
    HookedTransformer,
    HookedTransformerConfig,
    HookPoint,
    attention_direction,
    causal_mask,
    rotary_base,
    tl_attention_forward,
)
from mechir.parts import (
    CrossEncoderBatch,
    Part,
    check_max_length,
    padded_batch,
    parse_parts,
    prompt_batch_from_tokens,
)
from mechir.running import RunningKey, current_frame

__all__ = [
    "DEFAULT_INSTRUCTION",
    "QWEN3_RERANKER_TEMPLATE",
    "RANKLLAMA_TEMPLATE",
    "DecoderPrompt",
    "HookedDecoderReranker",
    "dimensions",
    "encode_prompts",
    "hooked_config_from_hf",
    "load",
]

#: Qwen3-Reranker's prompt (system prompt, instruction, query, document, and the assistant turn
#: with the empty think block), as its model card builds it.
QWEN3_RERANKER_TEMPLATE = (
    "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query "
    'and the Instruct provided. Note that the answer can only be "yes" or "no".<|im_end|>\n'
    "<|im_start|>user\n<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {document}"
    "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
)
#: Qwen3-Reranker's default instruction.
DEFAULT_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"
#: The default prompt of ``*ForSequenceClassification`` decoders (RankLLaMA's input format).
RANKLLAMA_TEMPLATE = "{bos}query: {query} document: {document}{eos}"
#: The default answers of yes/no rerankers: (relevant, non-relevant).
DEFAULT_ANSWERS = ("yes", "no")

#: Hugging Face ``model_type`` -> what the family's config needs (checked in the config).
_MODEL_TYPES = ("qwen2", "qwen3", "llama", "mistral")
_ACTIVATIONS = ("silu", "gelu", "gelu_new", "gelu_pytorch_tanh", "relu")
_FIELDS = ("query", "document", "instruction", "bos", "eos")
Kind = Literal["yes_no", "classifier"]


# ====================================================================== prompts
@dataclass(frozen=True)
class DecoderPrompt:
    """A decoder reranker's prompt: the template and what fills it.

    Attributes:
        template: text with ``{query}`` and ``{document}`` (once each, the query first) and
            optionally ``{instruction}``, ``{bos}`` and ``{eos}`` (the tokenizer's BOS/EOS
            tokens; ``{{``/``}}`` are literal braces). Special tokens written in the text
            (``<|im_start|>``) are read as the tokenizer's special tokens.
        instruction: what fills ``{instruction}`` (None: the template has none).
        answer_tokens: ``(relevant, non-relevant)`` answers of a yes/no reranker (None for a
            classifier).
    """

    template: str
    instruction: str | None = None
    answer_tokens: tuple[str, str] | None = None

    def __post_init__(self) -> None:
        fields = [f for _, f, _, _ in string.Formatter().parse(self.template) if f is not None]
        unknown = [f for f in fields if f not in _FIELDS]
        if unknown:
            raise ValueError(
                f"template field {{{unknown[0]}}} is unknown: a template may hold {{query}}, "
                "{document}, {instruction}, {bos} and {eos} (write {{ and }} for braces)"
            )
        for name in ("query", "document"):
            if fields.count(name) != 1:
                raise ValueError(
                    f"the template must hold {{{name}}} exactly once, it holds it "
                    f"{fields.count(name)} times"
                )
        if fields.index("query") > fields.index("document"):
            raise ValueError("the template must put {query} before {document}")
        if fields.count("instruction") > 1:
            raise ValueError("the template may hold {instruction} at most once")
        if "instruction" in fields and self.instruction is None:
            raise ValueError("the template holds {instruction}: give the instruction")
        if "instruction" not in fields and self.instruction:
            raise ValueError(
                "an instruction was given but the template has no {instruction} field: add it "
                "to the template or drop the instruction"
            )

    def segments(self) -> list[Part]:
        """The parts of the prompt in reading order, one per literal text or field
        (``[CLS, INSTRUCTION, CLS, QUERY, SEP1, DOCUMENT, SEP2]`` for Qwen3-Reranker)."""
        out: list[Part] = []
        seen = Part.CLS
        for literal, name, _, _ in string.Formatter().parse(self.template):
            if literal:
                out.append(seen)
            if name == "query":
                out.append(Part.QUERY)
                seen = Part.SEP1
            elif name == "document":
                out.append(Part.DOCUMENT)
                seen = Part.SEP2
            elif name == "instruction" and self.instruction:
                out.append(Part.INSTRUCTION)
            elif name in ("bos", "eos"):
                out.append(seen)
        return out

    def pieces(self, tokenizer: Any) -> tuple[list[tuple[str, Part]], dict[str, str]]:
        """The prompt's text without the query and the document, in reading order, as
        ``(text, part)`` pieces with a ``("", QUERY)`` / ``("", DOCUMENT)`` marker where each
        goes, and the whitespace that joins each to the text before it (``" "`` when that text
        ends with a space, which then belongs to the field: byte-level BPE tokenizers read
        ``": what"`` as ``":"``, ``" what"``)."""
        values = {
            "instruction": self.instruction or "",
            "bos": getattr(tokenizer, "bos_token", None) or "",
            "eos": getattr(tokenizer, "eos_token", None) or "",
        }
        out: list[tuple[str, Part]] = []
        space = {"query": "", "document": ""}
        seen = Part.CLS
        for literal, name, _, _ in string.Formatter().parse(self.template):
            if name in space and literal.endswith(" "):
                literal, space[name] = literal[:-1], " "
            if literal:
                out.append((literal, seen))
            if name == "query":
                out.append(("", Part.QUERY))
                seen = Part.SEP1
            elif name == "document":
                out.append(("", Part.DOCUMENT))
                seen = Part.SEP2
            elif name == "instruction" and self.instruction:
                out.append((values[name], Part.INSTRUCTION))
            elif name in ("bos", "eos") and values[name]:
                out.append((values[name], seen))
        return out, space

    def render(
        self, query: str, document: str, tokenizer: Any
    ) -> tuple[str, dict[str, tuple[int, int]]]:
        """The prompt text and the character span of each field in it."""
        text, spans = [], {}
        at = 0
        values = {
            "query": query,
            "document": document,
            "instruction": self.instruction or "",
            "bos": getattr(tokenizer, "bos_token", None) or "",
            "eos": getattr(tokenizer, "eos_token", None) or "",
        }
        for literal, name, _, _ in string.Formatter().parse(self.template):
            text.append(literal)
            at += len(literal)
            if name is not None:
                value = values[name]
                spans[name] = (at, at + len(value))
                text.append(value)
                at += len(value)
        return "".join(text), spans


def encode_prompts(
    tokenizer: Any,
    prompt: DecoderPrompt,
    queries: str | Sequence[str],
    documents: str | Sequence[str],
    *,
    max_length: int,
    padding_side: Literal["right", "left"] = "right",
) -> CrossEncoderBatch:
    """Render and tokenize (query, document) pairs into a :class:`CrossEncoderBatch`.

    Each prompt is tokenized as one string (without added special tokens: the template writes
    them), so the tokens are exactly those of ``tokenizer(prompt_text)``; the part of each token
    is read from its character offsets (:func:`mechir.models.prompt.token_parts`). A prompt
    longer than ``max_length`` has its document cut after the last token that fits, and is
    re-tokenized.

    Raises:
        ValueError: no pairs, lists of different lengths, an empty query/document, a tokenizer
            without offsets (not a fast tokenizer), or a prompt that leaves no room for one
            document token (the message names the pair).
    """
    queries, documents = pair_lists(queries, documents)
    check_max_length(max_length)
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            f"{type(tokenizer).__name__} gives no character offsets: decoder rerankers need a "
            "fast tokenizer (tokenizer.json)"
        )
    rows = []
    for i, (q, d) in enumerate(zip(queries, documents)):
        rows.append(_encode_one(tokenizer, prompt, q, d, max_length, i))
    return padded_batch(rows, pad_token_id=pad_token_id(tokenizer), padding_side=padding_side)


def _encode_one(
    tokenizer: Any, prompt: DecoderPrompt, query: str, document: str, max_length: int, i: int
) -> tuple[list[int], list[int]]:
    while True:
        text, spans = prompt.render(query, document, tokenizer)
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        parts = token_parts(offsets, spans)
        if len(ids) <= max_length:
            return ids, parts
        doc = [k for k, p in enumerate(parts) if p == int(Part.DOCUMENT)]
        keep = len(doc) - (len(ids) - max_length)
        if keep < 1:
            raise ValueError(
                f"pair {i}: the prompt without its document has {len(ids) - len(doc)} tokens, "
                f"which leaves no room for the document within max_length={max_length}: raise "
                "max_length or shorten the query (or the template)"
            )
        cut = offsets[doc[keep - 1]][1] - spans["document"][0]
        if cut >= len(document):  # a token reaching past the document: drop one more
            cut = offsets[doc[max(keep - 2, 0)]][1] - spans["document"][0]
        if cut <= 0 or cut >= len(document):
            raise ValueError(
                f"pair {i}: cannot cut the document to fit max_length={max_length}: raise "
                "max_length"
            )
        document = document[:cut]


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


# ====================================================================== the model
class DecoderEmbed(Embed):
    """TransformerLens's ``Embed`` (``W_E[t]``), plus what :mod:`mechir.circuits` reads."""

    position_offset = 0

    def token_states(
        self, token_ids: Int[Tensor, " n"], *, token_type: int = 0, position: int | None = None
    ) -> Float[Tensor, "n d_model"]:
        """What ``hook_full_embed`` holds for these tokens: ``W_E[t]`` at every position (rotary
        positions enter the attention, not the embedding; there are no token types)."""
        return self.W_E[token_ids]


class LastTokenPooler(nn.Module):
    """The final hidden state of each example's last real token (the one whose next-token
    logits the reranker reads), hooked at ``hook_pooler_out`` ``[batch, d_model]``.

    The last real token is read from the running input's attention mask (any padding side);
    without a mask it is the last position. With ``pad_token_id`` (a
    ``*ForSequenceClassification`` whose config has one) it is the last real token whose id is
    not ``pad_token_id``, as Hugging Face's ``GenericForSequenceClassification`` pools ("the
    rightmost token that is not equal to pad_token_id"): with pad = EOS and a prompt ending in
    EOS (RankLLaMA's), the token before the EOS. Hugging Face reads the ids alone, so the two
    agree on every batch padded with ``pad_token_id`` (either side) and on every example alone;
    without a pad token Hugging Face pools the last position of single examples (and refuses
    batches), which is the last real token here."""

    def __init__(self, key: RunningKey, pad_token_id: int | None = None):
        super().__init__()
        self._running_key = key
        self.pad_token_id = pad_token_id
        self.hook_pooler_out = HookPoint()

    def last_positions(self, resid: Float[Tensor, "batch pos d_model"]) -> Int[Tensor, " batch"]:
        """Index of the last real token of every row of ``resid`` (not a pad id, with
        :attr:`pad_token_id`)."""
        n, width = resid.shape[:2]
        running = current_frame(self._running_key).input
        mask = running.attention_mask
        if mask is None and self.pad_token_id is None:
            return torch.full((n,), width - 1, dtype=torch.long, device=resid.device)
        real = (
            torch.ones(running.tokens.shape, dtype=torch.bool, device=resid.device)
            if mask is None
            else mask.to(resid.device).bool()
        )
        if self.pad_token_id is not None:
            real = real & (running.tokens.to(resid.device) != self.pad_token_id)
        if len(real) == 1 and n > 1:  # rows grown from one example (as the attention mask)
            real = real.expand(n, -1)
        if real.shape != (n, width):
            raise ValueError(
                f"the running batch's attention mask {tuple(real.shape)} does not match the "
                f"hidden states {(n, width)}: run the head inside model.running_on(batch) of "
                "these rows"
            )
        empty = [] if self.pad_token_id is None else (~real.any(1)).nonzero().flatten().tolist()
        if empty:
            raise ValueError(
                f"row {empty[0]} holds nothing but pad tokens (id {self.pad_token_id}), so the "
                "classifier has no token to pool: give each pair a query and a document that "
                "are not the pad token"
            )
        return width - 1 - real.flip(1).int().argmax(1)

    def forward(self, resid: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch d_model"]:
        last = self.last_positions(resid)
        return self.hook_pooler_out(resid[torch.arange(len(resid), device=resid.device), last])


#: OLMo's QK norm runs inside TransformerLens's own forward only.
_TL_ONLY_ARCHITECTURES = ("OlmoeForCausalLM", "Olmo2ForCausalLM", "Olmo3ForCausalLM")


def _lean(self: Any) -> bool:
    """Whether :func:`_lean_forward` covers this attention's configuration."""
    c = self.cfg
    return (
        c.positional_embedding_type == "rotary"
        and attention_direction(self) == "causal"
        and not (c.use_attn_result or c.load_in_4bit or c.use_logn_attn)
        and not c.use_attention_sinks
        and c.clip_qkv is None
        and not c.attn_scores_soft_cap > 0
        and c.original_architecture not in _TL_ONLY_ARCHITECTURES
    )


def _lean_forward(
    self: Any,
    query_input: Float[Tensor, "batch pos *head d_model"],
    key_input: Float[Tensor, "batch kv_pos *kv_head d_model"],
    value_input: Float[Tensor, "batch kv_pos *kv_head d_model"],
    past_kv_cache_entry: Any = None,
    additive_attention_mask: Float[Tensor, "batch 1 1 kv_pos"] | None = None,
    attention_mask: Int[Tensor, "batch pos"] | None = None,
    position_bias: Tensor | None = None,
) -> Float[Tensor, "batch pos d_model"]:
    """``softmax(rot(q) rot(k)^T / sqrt(d_head) + causal and padding mask) v W_O + b_O``, hooks
    as in TransformerLens, in fewer passes over the ``[batch, head, query, key]`` scores: the
    causal (and padding) mask is filled in with one ``masked_fill`` and fully masked rows
    (softmax NaN, the queries of left padding) become zeros in one op, where TransformerLens
    runs a ``where`` and an ``isnan`` / ``zeros_like`` / ``where`` per layer. A configuration
    this path does not cover (a cache, attention results, an additive mask, logn scaling, sinks,
    clipping, soft caps, OLMo's QK norm) runs TransformerLens's own forward."""
    if (
        past_kv_cache_entry is not None
        or additive_attention_mask is not None
        or position_bias is not None
        or not _lean(self)
    ):
        return tl_attention_forward(
            self, query_input, key_input, value_input, past_kv_cache_entry,
            additive_attention_mask, attention_mask, position_bias,
        )  # fmt: skip
    q, k, v = self.calculate_qkv_matrices(query_input, key_input, value_input)
    q = self.hook_rot_q(self.apply_rotary(q, 0, attention_mask))
    k = self.hook_rot_k(self.apply_rotary(k, 0, attention_mask))
    scores = self.calculate_attention_scores(q, k)  # [batch, head, query_pos, key_pos]
    n_query, n_key = scores.shape[-2:]
    keep = causal_mask(self, n_query, n_key, scores.device)
    if attention_mask is not None:
        keep = keep & attention_mask[:, None, None, :].bool()
    return attend(self, scores.masked_fill(~keep, float("-inf")), v)


class DecoderAttention(Attention):
    """TransformerLens's ``Attention`` (same parameters, hook points and hook values) with the
    lean causal forward (:func:`_lean_forward`); :class:`HookedDecoderReranker` builds its
    blocks' attention from it, with TransformerLens's constructor arguments."""

    forward = _lean_forward  # type: ignore[assignment]


class DecoderGroupedQueryAttention(GroupedQueryAttention):
    """TransformerLens's ``GroupedQueryAttention`` with the lean causal forward
    (:func:`_lean_forward`)."""

    forward = _lean_forward  # type: ignore[assignment]


def _lean_attention_class(attn: nn.Module) -> type:
    return (
        DecoderGroupedQueryAttention
        if isinstance(attn, GroupedQueryAttention)
        else DecoderAttention
    )


def _rotate_positions(
    attn: nn.Module, x: Float[Tensor, "batch pos head d_head"]
) -> Float[Tensor, "batch pos head d_head"]:
    """``hook_q``/``hook_k``-shaped ``x`` rotated as at positions ``0..pos-1`` (those of a
    right-padded batch), with the attention's own rotary tables: linear in ``x``."""
    return attn.apply_rotary(x)


class HookedDecoderReranker(HookedRerankerMixin, HookedTransformer):
    """A decoder LLM reranker on TransformerLens's ``HookedTransformer`` (see the module
    docstring for the computation and its hook points).

    Args:
        cfg: the TransformerLens config (:func:`hooked_config_from_hf`).
        tokenizer: the Hugging Face tokenizer (fast: prompts are split into parts by offsets).
        family: the registry entry (:class:`mechir.models.Family`).
        prompt: the template, instruction and answers (:class:`DecoderPrompt`).
        kind: ``"yes_no"`` (a ``*ForCausalLM``: ``logits = (logit(no), logit(yes))``) or
            ``"classifier"`` (a ``*ForSequenceClassification``: its ``score`` head).
        num_labels: the classifier's labels (2 for yes/no: no = 0, yes = 1).
        relevant_label, score_type: as for :class:`~mechir.models.HookedCrossEncoder` (for
            yes/no: ``"binary_logit"`` = ``logit(yes) - logit(no)``, ``"prob"`` = Qwen3-Reranker's
            ``softmax([logit(no), logit(yes)])[1]``).
        pad_token_id: a classifier's ``config.pad_token_id``: it pools at the last token whose
            id is not this one, as Hugging Face does (:class:`LastTokenPooler`).

    Build it with :func:`load` (or :func:`mechir.load_cross_encoder`): the constructor makes
    the modules on the current default device (``torch.device("meta")`` when loading). A loaded
    yes/no reranker's ``answer_ids`` are the token ids of its (relevant, non-relevant) answers,
    as MonoT5's (None for a classifier).
    """

    is_causal = True
    scores_from_logits = HookedCrossEncoder.scores_from_logits

    def __init__(
        self,
        cfg: HookedTransformerConfig,
        tokenizer: Any,
        family: Family,
        prompt: DecoderPrompt,
        *,
        kind: Kind = "yes_no",
        num_labels: int = 2,
        relevant_label: int = 1,
        score_type: ScoreType | None = None,
        pad_token_id: int | None = None,
    ):
        nn.Module.__init__(self)
        self.init_reranker(tokenizer, family)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            HookedTransformer.__init__(self, cfg, tokenizer=None, move_to_device=False)
        self.tokenizer = tokenizer
        del self.unembed  # only the answer rows are kept, in the classifier
        self.embed = DecoderEmbed(cfg)
        self.prompt, self.kind = prompt, kind
        if num_labels < 1:
            raise ValueError(f"num_labels must be >= 1, got {num_labels}")
        if num_labels > 1 and not 0 <= relevant_label < num_labels:
            raise ValueError(
                f"relevant_label {relevant_label} out of range for {num_labels} labels"
            )
        self.num_labels = num_labels
        self.relevant_label = relevant_label if num_labels > 1 else 0
        self.score_type = DEFAULT_SCORE_TYPE if score_type is None else score_type
        self.padding_side: Literal["right", "left"] = "right"
        self.hook_full_embed = HookPoint()
        self.hook_final_hidden = HookPoint()
        self.pooler = LastTokenPooler(self._running_key, pad_token_id)
        self.classifier = CrossEncoderClassifier(cfg, num_labels)
        self.hook_score = HookPoint()
        for layer, block in enumerate(self.blocks):
            if type(block.attn) in (Attention, GroupedQueryAttention):
                block.attn = _lean_attention_class(block.attn)(cfg, block.attn.attn_type, layer)
        for block in self.blocks:  # AtP* and the QK references rotate q and k themselves
            block.attn.rotate_positions = functools.partial(_rotate_positions, block.attn)
        self.setup()

    @property
    def score_type(self) -> ScoreType:
        return self._score_type

    @score_type.setter
    def score_type(self, value: ScoreType) -> None:
        self._score_type = check_score_type(value)

    # ------------------------------------------------------------------ forward
    def forward(  # type: ignore[override]
        self,
        input: CrossEncoderBatch | Int[Tensor, "batch pos"],
        token_type_ids: Int[Tensor, "batch pos"] | None = None,
        attention_mask: Int[Tensor, "batch pos"] | None = None,
        *,
        return_type: Literal["score", "logits", "pooled", "resid"] | None = "score",
        start_at_layer: int | None = None,
        stop_at_layer: int | None = None,
        resid: Float[Tensor, "batch pos d_model"] | None = None,
    ) -> Tensor | None:
        """Run the reranker.

        Args:
            input: a :class:`CrossEncoderBatch`, or token ids (with ``attention_mask`` for a
                padded batch; ``token_type_ids`` are ignored).
            return_type: ``"score"`` ``[batch]`` (default), ``"logits"`` ``[batch, num_labels]``,
                ``"pooled"`` (the last real token's final hidden state ``[batch, d_model]``),
                ``"resid"`` (final hidden states ``[batch, pos, d_model]``) or None.
            start_at_layer: run blocks from this layer on, starting from ``resid`` (the input
                of that block); the embedding is not run.
            stop_at_layer: run blocks before this layer only and return the input of block
                ``stop_at_layer`` ``[batch, pos, d_model]``.
        """
        n = self.cfg.n_layers
        start = 0 if start_at_layer is None else self._layer_arg("start_at_layer", start_at_layer)
        stop = n if stop_at_layer is None else self._layer_arg("stop_at_layer", stop_at_layer)
        if start > stop:
            raise ValueError(f"start_at_layer {start} is after stop_at_layer {stop}")
        if (start_at_layer is None) != (resid is None):
            raise ValueError("pass resid= (the input of block start_at_layer) with start_at_layer")
        with self.forward_frame(input, token_type_ids, attention_mask) as input_now:
            if resid is None:
                resid = self.hook_full_embed(self.hook_embed(self.embed(input_now.tokens)))
            else:
                resid = resid.to(self.cfg.device)
            mask = input_now.attention_mask
            if mask is not None and bool(mask.bool().all()):
                mask = None  # no padding: the causal mask alone (the same result, faster)
            for layer in range(start, stop):
                resid = self.run_block(layer, resid, mask)
            if stop_at_layer is not None or return_type == "resid":
                return resid
            pooled = self.pooler(resid)
            if return_type == "pooled":
                return pooled
            logits = self.classifier(pooled)
            if return_type == "logits":
                return logits
            score = self.hook_score(self.scores_from_logits(logits))
            return score if return_type == "score" else None

    def _layer_arg(self, what: str, layer: int) -> int:
        n = self.cfg.n_layers
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer <= n:
            raise ValueError(f"{what}={layer!r} out of range: the model has {n} layers (0-{n})")
        return layer

    # ------------------------------------------------------------------ block-level API
    @staticmethod
    def additive_attention_mask(
        attention_mask: Int[Tensor, "batch pos"],
    ) -> Int[Tensor, "batch pos"]:
        """What :meth:`run_block` takes as its mask (the patching engine's name for it): a
        decoder's blocks take the 0/1 attention mask itself, from which TransformerLens builds
        the causal and padding masks and the rotary positions."""
        return attention_mask

    def run_block(
        self,
        layer: int,
        resid: Float[Tensor, "batch pos d_model"],
        mask: Int[Tensor, "batch pos"] | None,
        *,
        cls_only: bool = False,
    ) -> Float[Tensor, "rows pos d_model"]:
        """Run block ``layer`` (with its hooks) on its input ``resid``; after the last block,
        the final norm (``hook_final_hidden``). ``cls_only`` is accepted for the patching engine
        and ignored: every position is computed. (``rows`` may exceed ``batch``: hooks may add
        rows inside the block, as NIG does; the mask then broadcasts from one example.)"""
        block = self.blocks[layer]
        out = block(resid, attention_mask=None if mask is None else mask[: len(resid)])
        if layer == self.cfg.n_layers - 1:
            out = self.hook_final_hidden(self.ln_final(out))
        return out

    @property
    def final_hidden_name(self) -> str:
        """Hook of the final hidden states (after ``ln_final``), the input of the score head."""
        return "hook_final_hidden"

    def block_output_name(self, layer: int) -> str:
        """Hook of block ``layer``'s output (pre-norm blocks: ``hook_resid_post``)."""
        return f"blocks.{layer}.hook_resid_post"

    def score_from_resid(
        self, resid: Float[Tensor, "batch pos d_model"]
    ) -> Float[Tensor, " batch"]:
        """The score head on final hidden states: last real token, classifier, ``hook_score``."""
        return self.hook_score(self.scores_from_logits(self.classifier(self.pooler(resid))))

    # ------------------------------------------------------------------ circuits
    @property
    def QK(self) -> Any:  # noqa: N802 - TransformerLens's name
        """The QK circuit of every head, ``W_Q W_K^T`` (TransformerLens's ``FactoredMatrix``).

        With QK-norm (Qwen3) queries and keys are RMS-normalized per head, ``q' = q / rms(q) *
        w_q``, so ``q'.k' = (x W_Q D W_K^T y) / (rms(q) rms(k))`` with ``D = diag(w_q * w_k)``:
        the circuit is ``W_Q D W_K^T``, the score's bilinear form up to the positive per-token
        factor ``1 / (rms(q) rms(k))``. Rotary positions: relative distance 0."""
        from mechir.models.tl import FactoredMatrix

        W_Q, W_K = self.W_Q, self.W_K  # noqa: N806
        if self.cfg.use_qk_norm:
            w_q = torch.stack([b.attn.q_norm.w for b in self.blocks])[:, None, None, :]
            w_k = torch.stack([b.attn.k_norm.w for b in self.blocks])[:, None, None, :]
            W_Q, W_K = W_Q * w_q, W_K * w_k  # noqa: N806
        return FactoredMatrix(W_Q, W_K.transpose(-2, -1))

    # ------------------------------------------------------------------ parts
    @property
    def abilities(self) -> Abilities:
        """A decoder's: causal, pre-norm, a prompt; QK-norm and grouped k/v as its config says."""
        n_kv = self.cfg.n_key_value_heads
        return Abilities(
            causal=True,
            post_ln=False,
            qk_norm=bool(self.cfg.use_qk_norm),
            grouped_kv=n_kv is not None and n_kv < self.cfg.n_heads,
            cross_attention=False,
            prompt=True,
            edges=self.family.edge_circuits,
        )

    def impossible_direction(
        self, attending: Sequence[Part | str | int], attended: Sequence[Part | str | int]
    ) -> str | None:
        """Why attention from ``attending`` to ``attended`` parts cannot exist in this causal
        model (None when it can): a token reads only tokens at or before it, so a direction
        whose attended parts all come after its attending parts in the prompt is never there
        to remove (likewise for parts the prompt does not have)."""
        from mechir.hooks.attention import direction_label

        order = self.prompt.segments()
        first = {p: order.index(p) for p in set(order)}
        last = {p: len(order) - 1 - order[::-1].index(p) for p in set(order)}
        rows, cols = parse_parts(attending), parse_parts(attended)
        if any(a in last and b in first and first[b] <= last[a] for a in rows for b in cols):
            return None
        label = direction_label(rows, cols)
        absent = [p.name for p in (*rows, *cols) if p not in first]
        if absent:
            return (
                f"direction {label} cannot exist: {self.family.name}'s prompt has no "
                f"{', '.join(dict.fromkeys(absent))} tokens"
            )
        return (
            f"direction {label} cannot exist in {self.family.name}, a causal decoder: "
            f"{'+'.join(p.name for p in rows)} tokens come before "
            f"{'+'.join(p.name for p in cols)} tokens in the prompt and never attend to them "
            f"(ablate {direction_label(cols, rows)} instead)"
        )

    # ------------------------------------------------------------------ user API
    def encode(
        self,
        queries: str | Sequence[str],
        documents: str | Sequence[str],
        *,
        max_length: int | None = None,
        pair_ids: Sequence[str] | None = None,
        padding_side: Literal["right", "left"] | None = None,
    ) -> CrossEncoderBatch:
        """Render, tokenize and pad pairs (see :func:`encode_prompts`).

        ``max_length`` defaults to and may not exceed :attr:`max_length`; ``padding_side``
        defaults to :attr:`padding_side` (``"right"``; ``"left"`` scores the same)."""
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer: pass one to load_cross_encoder")
        length = self.max_length if max_length is None else max_length
        check_max_length(length, self.max_length)
        batch = encode_prompts(
            self.tokenizer,
            self.prompt,
            queries,
            documents,
            max_length=length,
            padding_side=padding_side or self.padding_side,
        )
        return batch if pair_ids is None else batch.with_pair_ids(pair_ids)

    def template_tokens(self) -> list[tuple[list[int], Part]]:
        """The prompt's tokens around the query and the document: ``(ids, part)`` pieces in
        reading order, with an empty marker piece of part QUERY / DOCUMENT where each goes
        (:meth:`DecoderPrompt.pieces`, each piece tokenized alone)."""
        pieces, _ = self.prompt.pieces(self.tokenizer)
        tok = self.tokenizer
        return [
            (list(tok(text, add_special_tokens=False)["input_ids"]) if text else [], part)
            for text, part in pieces
        ]

    def field_tokens(
        self, text: str, field: Literal["query", "document"] = "document"
    ) -> list[int]:
        """``text``'s token ids as the query or the document of this model's prompt (with the
        space that joins it to the template, see :meth:`DecoderPrompt.pieces`): what
        :class:`patching.PairBuilder` tokenizes with for token-level perturbations."""
        if field not in ("query", "document"):
            raise ValueError(f"field must be 'query' or 'document', got {field!r}")
        space = self.prompt.pieces(self.tokenizer)[1][field]
        return list(self.tokenizer(space + text, add_special_tokens=False)["input_ids"])

    @property
    def n_special(self) -> int:
        """Tokens of a pair's input besides its query and document: the prompt's."""
        return sum(len(ids) for ids, _ in self.template_tokens())

    def batch_from_tokens(
        self,
        query_ids: Sequence[Sequence[int]],
        document_ids: Sequence[Sequence[int]],
        *,
        max_length: int | None = None,
    ) -> CrossEncoderBatch:
        """A batch from already-tokenized queries and documents (:meth:`field_tokens`), the
        prompt's tokens (:meth:`template_tokens`) around them, documents cut to ``max_length``
        (default :attr:`max_length`), padded on :attr:`padding_side`: what
        :func:`mechir.parts.cross_encoder_batch_from_tokens` is for the encoder families. Where
        the tokenizer splits the prompt at the fields' edges (byte-level BPE, as Qwen's and
        Llama-3's), this equals :meth:`encode` of the same texts.

        Raises:
            ValueError: lists of different lengths, an empty query or document, or a query
                leaving no room for a document token; the message names the pair.
        """
        return prompt_batch_from_tokens(
            self.template_tokens(), query_ids, document_ids,
            max_length=self.max_length if max_length is None else max_length,
            pad_token_id=pad_token_id(self.tokenizer), padding_side=self.padding_side,
        )  # fmt: skip

    @property
    def max_length(self) -> int:
        """Longest input the model takes (``max_position_embeddings``)."""
        return self.cfg.n_ctx

    @property
    def d_mlp(self) -> int:
        return self.cfg.d_mlp

    def to(self, device_or_dtype: torch.device | str | torch.dtype, print_details: bool = False):  # type: ignore[override]
        return super().to(device_or_dtype, print_details=print_details)


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


def _layer_tensor(
    model: HookedDecoderReranker, layer: int, rest: str, t: Tensor
) -> tuple[str, Tensor] | None:
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
    model: HookedDecoderReranker,
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
    model: HookedDecoderReranker, loaded: set[str], device: torch.device, dtype: torch.dtype,
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


# ====================================================================== loading
def _kind(family: Family, architecture: str) -> Kind:
    if architecture.endswith("ForCausalLM"):
        return "yes_no"
    if architecture.endswith("ForSequenceClassification"):
        return "classifier"
    raise UnsupportedModelError(
        f"architecture {architecture} is not a reranker: mechir loads {family.name} as "
        f"{', '.join(family.architectures)}"
    )


def _answer_ids(tokenizer: Any, answers: tuple[str, str]) -> tuple[int, int]:
    """Token ids of the (relevant, non-relevant) answers (as MonoT5's ``answer_ids``); each must
    be one token."""
    if len(answers) != 2 or answers[0] == answers[1]:
        raise ValueError(
            f"answer_tokens must be two different answers (relevant, non-relevant), got {answers!r}"
        )
    ids = []
    for answer in answers:
        token_id = tokenizer.convert_tokens_to_ids(answer)
        if token_id is None or token_id == tokenizer.unk_token_id:
            encoded = tokenizer(answer, add_special_tokens=False)["input_ids"]
            if len(encoded) != 1:
                raise ValueError(
                    f"answer {answer!r} is {len(encoded)} tokens in this tokenizer: answer_tokens "
                    "must be single tokens"
                )
            token_id = encoded[0]
        ids.append(int(token_id))
    relevant, non_relevant = ids
    return relevant, non_relevant


def _prompt(kind: Kind, options: LoadOptions) -> DecoderPrompt:
    if kind == "classifier":
        if options.answer_tokens:
            raise ValueError(
                "answer_tokens: a *ForSequenceClassification decoder scores with its classifier "
                "head, not with answer tokens; drop the option"
            )
        template = options.template or RANKLLAMA_TEMPLATE
        answers = None
    else:
        template = options.template or QWEN3_RERANKER_TEMPLATE
        answers = tuple(options.answer_tokens or DEFAULT_ANSWERS)
    has_field = "{instruction}" in template
    instruction = options.instruction
    if instruction is None and has_field:
        instruction = DEFAULT_INSTRUCTION
    return DecoderPrompt(template, instruction, answers)  # type: ignore[arg-type]


def _resolve_directory(source: str | os.PathLike) -> Path:
    path = Path(source)
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(str(source)))


def load(
    family: Family, source: str | os.PathLike | Any, tokenizer: Any, options: LoadOptions
) -> HookedDecoderReranker:
    """Load a decoder reranker (a local directory or hub id, or an in-memory model).

    Raises:
        UnsupportedModelError: an architecture or setting mechir cannot reproduce exactly.
        ValueError: a bad prompt option, answers that are not single tokens, weights that do
            not match the config, non-finite weights.
    """
    from transformers import AutoConfig, PreTrainedModel

    if isinstance(source, PreTrainedModel):
        name = type(source).__name__
        hf_config, architecture = source.config, name
        tensors = _hf_tensors(source)
    else:
        name = str(source)
        directory = _resolve_directory(source)
        hf_config = AutoConfig.from_pretrained(directory)
        archs = [a for a in (hf_config.architectures or []) if a in family.architectures]
        architecture = archs[0] if archs else family.hf_class
        tensors = _Checkpoint(_checkpoint_files(directory))
    kind = _kind(family, architecture)
    prompt = _prompt(kind, options)
    dtype = options.dtype or torch.float32
    cfg = hooked_config_from_hf(hf_config, architecture=architecture, device=options.device,
                                dtype=dtype)  # fmt: skip
    answer_ids = _answer_ids(tokenizer, prompt.answer_tokens) if kind == "yes_no" else None
    num_labels = 2 if kind == "yes_no" else hf_config.num_labels
    with torch.device("meta"):
        model = HookedDecoderReranker(
            cfg,
            tokenizer,
            family,
            prompt,
            kind=kind,
            num_labels=num_labels,
            relevant_label=1 if kind == "yes_no" else options.relevant_label,
            score_type=options.score_type,  # type: ignore[arg-type]
            pad_token_id=hf_config.get_text_config().pad_token_id if kind == "classifier" else None,
        )
    model.answer_ids = answer_ids
    _load_weights(
        model,
        tensors,
        label_ids=None if answer_ids is None else answer_ids[::-1],
        tied=bool(getattr(hf_config, "tie_word_embeddings", False)),
        device=torch.device(cfg.device),
        dtype=dtype,
        source=name,
    )
    return model.eval()
