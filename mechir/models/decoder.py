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

import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn as nn
from jaxtyping import Float, Int
from torch import Tensor

from mechir.interface import Abilities
from mechir.models.attention import (
    AttentionTerms,
    attend,
    attend_fused,
    attention_watched,
    rows_may_be_empty,
)
from mechir.models.decoder_config import dimensions, hooked_config_from_hf
from mechir.models.decoder_prompt import (
    DEFAULT_ANSWERS,
    DEFAULT_INSTRUCTION,
    QWEN3_RERANKER_TEMPLATE,
    RANKLLAMA_TEMPLATE,
    decoder_prompt,
)
from mechir.models.decoder_weights import _Checkpoint, _checkpoint_files, _hf_tensors, _load_weights
from mechir.models.encoder import CrossEncoderClassifier, HookedCrossEncoder
from mechir.models.hooked import HookedRerankerMixin
from mechir.models.prompt import Prompt, encode_prompts, pad_token_id
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
    tl_attention_forward,
)
from mechir.parts import (
    CrossEncoderBatch,
    Part,
    check_max_length,
    parse_parts,
    prompt_batch_from_tokens,
)
from mechir.running import RunningKey, current_frame

__all__ = [
    "DEFAULT_INSTRUCTION",
    "QWEN3_RERANKER_TEMPLATE",
    "RANKLLAMA_TEMPLATE",
    "Prompt",
    "HookedDecoderReranker",
    "dimensions",
    "encode_prompts",
    "hooked_config_from_hf",
    "load",
]

Kind = Literal["yes_no", "classifier"]


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
    as in TransformerLens, in fewer passes over the ``[batch, head, query, key]`` scores. When
    no hook of this forward pass is on ``hook_attn_scores`` or ``hook_pattern``, one fused
    ``scaled_dot_product_attention`` (:func:`~mechir.models.encoder.attend_fused`); otherwise the
    causal (and padding) mask is filled in with one ``masked_fill`` and fully masked rows
    (softmax NaN, the queries of left padding) become zeros in one op, only where they can
    occur, where TransformerLens runs a ``where`` and an ``isnan`` / ``zeros_like`` / ``where``
    per layer. A configuration this path does not cover (a cache, attention results, an
    additive mask, logn scaling, sinks, clipping, soft caps, OLMo's QK norm) runs
    TransformerLens's own forward."""
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
    n_query, n_key = q.shape[1], k.shape[1]
    local = self.attn_type == "local"
    # a query without keys: left padding (the first key masked), or a sliding window over padding
    empty_rows = attention_mask is not None and (
        local or rows_may_be_empty(self, attention_mask, _first_key_masked)
    )
    fused = not attention_watched(self)
    if fused and attention_mask is None and not local:
        return attend_fused(
            self, q, k, v, None, scale=1 / self.attn_scale, empty_rows=False, is_causal=True
        )
    keep = causal_mask(self, n_query, n_key, q.device)
    if attention_mask is not None:
        keep = keep & attention_mask[:, None, None, :].bool()
    if fused:
        return attend_fused(self, q, k, v, keep, scale=1 / self.attn_scale, empty_rows=empty_rows)
    scores = self.calculate_attention_scores(q, k)  # [batch, head, query_pos, key_pos]
    return attend(self, scores.masked_fill(~keep, float("-inf")), v, empty_rows=empty_rows)


def _first_key_masked(attention_mask: Int[Tensor, "batch pos"]) -> Tensor:
    """Whether some row starts with padding (left padding: its first queries see no key)."""
    return ~attention_mask[:, 0].bool().all()


class _DecoderTerms(AttentionTerms):
    """What a decoder attention declares: rotary positions, and the sliding window of a local
    layer (TransformerLens masks key ``j`` of query ``i`` when ``i - j >= window_size``)."""

    __slots__ = ()

    def rotate_positions(  # type: ignore[override]
        self, x: Float[Tensor, "batch pos head d_head"]
    ) -> Float[Tensor, "batch pos head d_head"]:
        """``hook_q``/``hook_k``-shaped ``x`` rotated as at positions ``0..pos-1`` (those of a
        right-padded batch), with the attention's own rotary tables: linear in ``x``."""
        return self.apply_rotary(x)  # type: ignore[attr-defined]

    @property
    def window(self) -> int | None:  # type: ignore[override]
        local = self.attn_type == "local"  # type: ignore[attr-defined]
        return self.cfg.window_size - 1 if local else None  # type: ignore[attr-defined]


class DecoderAttention(Attention, _DecoderTerms):
    """TransformerLens's ``Attention`` (same parameters, hook points and hook values) with the
    lean causal forward (:func:`_lean_forward`); :class:`HookedDecoderReranker` builds its
    blocks' attention from it, with TransformerLens's constructor arguments."""

    forward = _lean_forward  # type: ignore[assignment]


class DecoderGroupedQueryAttention(GroupedQueryAttention, _DecoderTerms):
    """TransformerLens's ``GroupedQueryAttention`` with the lean causal forward
    (:func:`_lean_forward`)."""

    forward = _lean_forward  # type: ignore[assignment]


def _lean_attention_class(attn: nn.Module) -> type:
    return (
        DecoderGroupedQueryAttention
        if isinstance(attn, GroupedQueryAttention)
        else DecoderAttention
    )


class HookedDecoderReranker(HookedRerankerMixin, HookedTransformer):
    """A decoder LLM reranker on TransformerLens's ``HookedTransformer`` (see the module
    docstring for the computation and its hook points).

    Args:
        cfg: the TransformerLens config (:func:`hooked_config_from_hf`).
        tokenizer: the Hugging Face tokenizer (fast: prompts are split into parts by offsets).
        family: the registry entry (:class:`mechir.models.Family`).
        prompt: the template, instruction and answers (:class:`~mechir.models.prompt.Prompt`).
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
        prompt: Prompt,
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
        for layer, block in enumerate(self.blocks):  # TransformerLens builds Attention or GQA
            block.attn = _lean_attention_class(block.attn)(cfg, block.attn.attn_type, layer)
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
        (:meth:`~mechir.models.prompt.Prompt.pieces`, each piece tokenized alone)."""
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
        space that joins it to the template, see :meth:`~mechir.models.prompt.Prompt.pieces`): what
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


def _prompt(kind: Kind, options: LoadOptions) -> Prompt:
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
    return decoder_prompt(template, instruction, answers)  # type: ignore[arg-type]


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
    answer_ids = prompt.answer_ids(tokenizer) if kind == "yes_no" else None
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
