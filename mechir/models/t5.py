"""MonoT5 rerankers (``T5ForConditionalGeneration``, e.g. ``castorini/monot5-base-msmarco``,
``castorini/monot5-3b-msmarco``).

The pair is a prompt (default :data:`DEFAULT_TEMPLATE`, ``Query: {q} Document: {d} Relevant:``)
read by the encoder; the decoder runs one step from the decoder start token and the score is
``logit("true") - logit("false")`` there, which ranks exactly like the softmax over the two
answers that the MonoT5 paper uses. The model is built here from TransformerLens hook points (its
``HookedEncoderDecoder`` names the encoder blocks ``encoder.{l}``; here they are ``blocks.{l}``,
so every encoder site and hook factory of :mod:`mechir.hooks` works on the encoder unchanged)::

    embed.hook_embed -> hook_full_embed                  W_E[t]: no position embedding
    blocks.{l}: hook_resid_pre -> ln1 -> attn -> hook_attn_out
                hook_resid_mid = resid_pre + attn_out -> ln2 -> mlp -> hook_mlp_out
                hook_resid_post = resid_mid + mlp_out           (pre-RMSNorm: the block output)
    ln_final -> hook_final_hidden                        the encoder output (the decoder reads it)
    hook_decoder_embed = W_E[decoder_start_token]        one decoder step per pair
    decoder.{l}: hook_resid_pre -> ln1 -> attn (causal self-attention) -> hook_attn_out
                 hook_resid_mid -> ln2 -> cross_attn (queries: decoder; keys, values: the encoder
                 output) -> hook_cross_attn_out; hook_resid_mid_cross -> ln3 -> mlp
                 -> hook_mlp_out; hook_resid_post
    decoder_ln_final -> hook_decoder_final -> classifier.hook_logits  [batch, 2]: (false, true)
    -> hook_score = logit(true) - logit(false)

* Attention (``attn`` and ``cross_attn``): ``q = x W_Q`` (``hook_q``), ``k``, ``v`` likewise, no
  biases and **no** ``1/sqrt(d_head)`` scale (T5 folds it into the weights);
  ``hook_attn_scores = q k^T + position_bias + mask`` (the total: the relative position bias of
  layer 0, shared by every layer, the padding mask -inf and, in the decoder, the causal mask),
  ``hook_pattern = softmax`` (rows with every key removed are zeros, not NaN), ``hook_z``.
* Relative positions: T5's buckets (``relative_attention_num_buckets``,
  ``relative_attention_max_distance``) exactly as Hugging Face computes them, bidirectional in the
  encoder, causal in the decoder; ``blocks.0.attn.hook_position_bias`` and
  ``decoder.0.attn.hook_position_bias`` ``[1, head, query, key]``. Cross-attention has none.
* RMSNorm (``ln*``: ``x / sqrt(mean(x^2) + eps) * w``, hook points as TransformerLens's).
* FFN: ``relu`` (T5 v1.0, MonoT5) ``mlp.hook_pre = x W_in``, ``mlp.hook_post = act(hook_pre)``;
  gated (``gated-gelu``, T5 v1.1 / Flan-T5) ``hook_pre = x W_in`` (the activated half, HF's
  ``wi_0``), ``hook_pre_linear = x W_gate`` (``wi_1``), ``hook_post = act(pre) * pre_linear``.
  The neuron is ``hook_post``, the input of ``W_out``.
* Output: ``classifier.hook_logits = (h * d_model^-0.5) W_U[:, (false, true)]`` (the answers
  read as a two-label classifier: tools reading a cross-encoder's classifier logits work as
  they are), where ``d_model^-0.5`` applies when the config scales decoder outputs (tied
  embeddings, T5 v1.0) and ``W_U`` is ``W_E^T`` for tied embeddings.
  ``return_type="vocab_logits"`` gives every token's logit (``classifier.hook_vocab_logits``).

Parts of the encoder input: the template's tokens before the query are ``prefix`` (``CLS``),
between query and document ``middle`` (``SEP1``), after the document, with the final ``</s>``,
``suffix`` (``SEP2``), by the one part rule of every prompt-based reranker
(:func:`mechir.models.prompt.token_parts`: a token overlapping the query or the document belongs
to it). Long documents are cut (the template's suffix is always kept) and the pair re-tokenized,
so ``input_ids`` are always the tokenizer's own encoding of a prompt string.

Interventions on the decoder: the sites ``cross_pattern``, ``cross_attn_scores``, ``cross_z``,
``decoder_z`` and ``decoder_neuron`` of :mod:`mechir.hooks.site`, and
``direction_ablation_hooks(model, attending="decoder", attended=...)`` (the decoder reading parts
of the encoder input through cross-attention).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn as nn
from jaxtyping import Float, Int
from torch import Tensor

from mechir.interface import Abilities
from mechir.models.hooked import HookedRerankerMixin
from mechir.models.prompt import Prompt, encode_prompts, pad_token_id
from mechir.models.registry import Family, LoadOptions
from mechir.models.scores import ScoreType, check_score_type
from mechir.models.t5_blocks import (
    AnswerHead,
    T5DecoderBlock,
    T5Embed,
    T5EncoderBlock,
    T5Norm,
    T5Shape,
    dimensions,
    hooked_config,
    t5_shape,
)
from mechir.models.t5_prompt import (
    DEFAULT_ANSWERS,
    DEFAULT_MAX_LENGTH,
    DEFAULT_TEMPLATE,
    monot5_prompt,
)
from mechir.models.t5_weights import _hf_tensors, _stream_tensors, convert_tensor
from mechir.models.tl import (
    ActivationCache,
    FactoredMatrix,
    HookedRootModule,
    HookedTransformerConfig,
    HookPoint,
    TypedModuleList,
)
from mechir.parts import (
    CrossEncoderBatch,
    Part,
    check_max_length,
    prompt_batch_from_tokens,
)

__all__ = [
    "DEFAULT_ANSWERS",
    "DEFAULT_TEMPLATE",
    "HookedMonoT5",
    "Prompt",
    "build_from_tensors",
    "dimensions",
    "encode_prompts",
    "load",
]

ReturnType = Literal["score", "logits", "vocab_logits", "resid", None]


# ---------------------------------------------------------------------------- the model
class _CachingRoot(HookedRootModule):
    """``HookedRootModule`` whose ``run_with_cache`` returns an ``ActivationCache`` (as
    ``HookedEncoder``'s and ``HookedTransformer``'s do), which the reranker mixin expects."""

    def run_with_cache(  # type: ignore[override]
        self,
        *model_args: Any,
        return_cache_object: bool = True,
        remove_batch_dim: bool = False,
        **kwargs: Any,
    ) -> tuple[Any, Any]:
        out, cache = super().run_with_cache(
            *model_args, remove_batch_dim=remove_batch_dim, **kwargs
        )
        if return_cache_object:
            cache = ActivationCache(cache, self, has_batch_dim=not remove_batch_dim)
        return out, cache


class HookedMonoT5(HookedRerankerMixin, _CachingRoot):
    """A hooked MonoT5 reranker (see the module docstring for the computation and its hooks).

    Like :class:`~mechir.models.HookedCrossEncoder` it scores a :class:`CrossEncoderBatch`;
    its "classifier" logits are the two answers' logits ``(false, true)``, so ``num_labels`` is
    2, ``relevant_label`` 1, and the score types are those of a two-label cross-encoder
    (default ``"binary_logit"``: ``logit(true) - logit(false)``; ``"prob"``: MonoT5's softmax
    probability of ``true``).

    Args:
        cfg: the TransformerLens config (:func:`hooked_config`).
        shape: the :class:`T5Shape`.
        tokenizer: the T5 tokenizer (fast).
        family: the registry entry.
        answer_ids: token ids of the relevant and the non-relevant answer.
        tied: whether the output embedding is ``W_E`` (else ``classifier.W_U``).
        template, answer_tokens: the prompt and the answers (recorded on the model).
        score_type: see above.
    """

    def __init__(
        self,
        cfg: HookedTransformerConfig,
        shape: T5Shape,
        tokenizer: Any,
        *,
        family: Family,
        answer_ids: tuple[int, int],
        tied: bool = True,
        template: str = DEFAULT_TEMPLATE,
        answer_tokens: tuple[str, str] = DEFAULT_ANSWERS,
        score_type: ScoreType | None = None,
        move_to_device: bool = True,
    ):
        HookedRootModule.__init__(self)
        self.cfg = cfg
        self.init_reranker(tokenizer, family)
        self.shape = shape
        self.prompt: Prompt = monot5_prompt(template, answer_tokens, family.name)
        self.answer_tokens = tuple(answer_tokens)
        self.answer_ids = (int(answer_ids[0]), int(answer_ids[1]))
        self.decoder_start_token_id = shape.decoder_start_token_id
        self.num_labels, self.relevant_label = 2, 1
        self.score_type = "binary_logit" if score_type is None else score_type
        self.embed = T5Embed(cfg)
        self.hook_full_embed = HookPoint()
        self.blocks = TypedModuleList([T5EncoderBlock(cfg, shape, i) for i in range(cfg.n_layers)])
        self.ln_final = T5Norm(cfg)
        self.hook_final_hidden = HookPoint()
        self.hook_decoder_embed = HookPoint()
        self.decoder = TypedModuleList([T5DecoderBlock(cfg, shape, i) for i in range(cfg.n_layers)])
        self.decoder_ln_final = T5Norm(cfg)
        self.hook_decoder_final = HookPoint()
        scale = shape.d_model**-0.5 if shape.scale_output else 1.0
        self.classifier = AnswerHead(cfg, tied=tied, scale=scale)
        self.hook_score = HookPoint()
        if move_to_device and cfg.device is not None and str(cfg.device) != "meta":
            nn.Module.to(self, cfg.device)
        self.setup()

    @property
    def abilities(self) -> Abilities:
        """MonoT5's: a bidirectional pre-norm encoder read by a decoder through cross-attention,
        a prompt."""
        return Abilities(
            causal=False,
            post_ln=False,
            qk_norm=False,
            grouped_kv=False,
            cross_attention=True,
            prompt=True,
            edges=self.family.edge_circuits,
        )

    # ------------------------------------------------------------------ settings
    @property
    def template(self) -> str:
        return self.prompt.template

    @property
    def score_type(self) -> ScoreType:
        return self._score_type

    @score_type.setter
    def score_type(self, value: ScoreType) -> None:
        self._score_type = check_score_type(value)

    @property
    def max_length(self) -> int:
        """Longest input :meth:`encode` makes by default (``cfg.n_ctx``: the tokenizer's
        ``model_max_length``, else the config's ``n_positions``, else 512)."""
        return self.cfg.n_ctx

    @property
    def d_mlp(self) -> int:
        return self.cfg.d_mlp

    # ------------------------------------------------------------------ weights, stacked
    def _stack(self, name: str) -> Tensor:
        return torch.stack([getattr(block.attn, name) for block in self.blocks])

    @property
    def W_Q(self) -> Float[Tensor, "n_layers n_heads d_model d_head"]:
        """Encoder query weights of every layer (``blocks.{l}.attn``)."""
        return self._stack("W_Q")

    @property
    def W_K(self) -> Float[Tensor, "n_layers n_heads d_model d_head"]:
        return self._stack("W_K")

    @property
    def W_V(self) -> Float[Tensor, "n_layers n_heads d_model d_head"]:
        return self._stack("W_V")

    @property
    def W_O(self) -> Float[Tensor, "n_layers n_heads d_head d_model"]:
        return self._stack("W_O")

    @property
    def b_Q(self) -> Float[Tensor, "n_layers n_heads d_head"]:
        """Zeros: T5 attention has no biases."""
        return self._stack("b_Q")

    @property
    def b_K(self) -> Float[Tensor, "n_layers n_heads d_head"]:
        return self._stack("b_K")

    @property
    def QK(self) -> FactoredMatrix:
        """``W_Q W_K^T`` of every encoder head: the whole content part of the attention score
        (T5's relative position bias is added apart, and there is no ``1/sqrt(d_head)``)."""
        return FactoredMatrix(self.W_Q, self.W_K.transpose(-2, -1))

    @property
    def OV(self) -> FactoredMatrix:
        return FactoredMatrix(self.W_V, self.W_O)

    # ------------------------------------------------------------------ forward
    def scores_from_logits(self, logits: Float[Tensor, "batch 2"]) -> Float[Tensor, " batch"]:
        """The score from the answer logits ``(false, true)`` (:attr:`score_type`)."""
        if self.score_type == "binary_logit":
            return logits[:, 1] - logits[:, 0]
        if self.score_type == "logit":
            return logits[:, 1]
        log_probs = logits.log_softmax(-1)[:, 1]
        return log_probs if self.score_type == "log_prob" else log_probs.exp()

    @staticmethod
    def additive_attention_mask(
        attention_mask: Int[Tensor, "batch pos"],
    ) -> Float[Tensor, "batch 1 1 pos"]:
        """0 on real tokens, -inf on padding keys (what every attention over the encoder input
        adds to its scores)."""
        return torch.where(attention_mask[:, None, None, :] == 0, -torch.inf, 0.0)

    def encoder_position_bias(self, width: int) -> Float[Tensor, "1 head pos pos"]:
        return self.blocks[0].attn.position_bias(width, width)

    def run_block(
        self,
        layer: int,
        resid: Float[Tensor, "batch pos d_model"],
        additive_mask: Float[Tensor, "batch 1 1 pos"],
        *,
        cls_only: bool = False,
    ) -> Float[Tensor, "rows pos d_model"]:
        """Run encoder block ``layer`` (with its hooks) on its input ``resid``; after the last
        block, the final norm (``hook_final_hidden``). ``cls_only`` is ignored: the decoder
        reads every position of the encoder output."""
        block = self.blocks[layer]
        out = block(resid, additive_mask, self.encoder_position_bias(resid.shape[1]))
        return self._finish(layer, out)

    def _finish(self, layer: int, resid: Tensor) -> Tensor:
        if layer != self.cfg.n_layers - 1:
            return resid
        return self.hook_final_hidden(self.ln_final(resid))

    @property
    def final_hidden_name(self) -> str:
        """The encoder output (after its final norm), the input of the decoder."""
        return "hook_final_hidden"

    def block_output_name(self, layer: int) -> str:
        """Encoder block ``layer``'s output ``blocks.{layer}.hook_resid_post`` (pre-norm: before
        the final norm for the last block)."""
        return f"blocks.{layer}.hook_resid_post"

    def run_decoder(
        self,
        encoder_hidden: Float[Tensor, "batch pos d_model"],
        additive_mask: Float[Tensor, "#batch 1 1 pos"] | None,
    ) -> Float[Tensor, "rows d_model"]:
        """The decoder's first step from the decoder start token, reading ``encoder_hidden``:
        the final decoder state ``hook_decoder_final`` ``[batch, d_model]``."""
        rows = encoder_hidden.shape[0]
        start = self.embed.W_E[self.decoder_start_token_id]
        x = self.hook_decoder_embed(start.expand(rows, 1, -1).clone())
        bias = self.decoder[0].attn.position_bias(1, 1)
        for block in self.decoder:
            x = block(x, bias, encoder_hidden, additive_mask)
        return self.hook_decoder_final(self.decoder_ln_final(x))[:, 0]

    def vocab_matrix(self) -> Float[Tensor, "d_model d_vocab"]:
        """The output embedding: ``W_E^T`` (tied) or ``classifier.W_U``."""
        return self.embed.W_E.T if self.classifier.tied else self.classifier.W_U

    def answer_columns(self) -> Float[Tensor, "d_model 2"]:
        """Output-embedding columns of the answers, ``(non-relevant, relevant)``."""
        ids = [self.answer_ids[1], self.answer_ids[0]]
        if self.classifier.tied:
            return self.embed.W_E[ids].T
        return self.classifier.W_U[:, ids]

    def _head(
        self, encoder_hidden: Tensor, additive_mask: Tensor | None, return_type: ReturnType
    ) -> Tensor | None:
        h = self.run_decoder(encoder_hidden, additive_mask)
        if return_type == "vocab_logits":
            return self.classifier(h, self.vocab_matrix(), vocab=True)
        logits = self.classifier(h, self.answer_columns())
        if return_type == "logits":
            return logits
        score = self.hook_score(self.scores_from_logits(logits))
        return score if return_type == "score" else None

    def score_from_resid(
        self, resid: Float[Tensor, "batch pos d_model"]
    ) -> Float[Tensor, " batch"]:
        """The score from the encoder output (decoder and answer head), masked by the running
        batch's attention mask (run it inside :meth:`running_on`)."""
        mask = self.additive_attention_mask(self.running_batch.attention_mask.to(resid.device))
        return self._head(resid, mask, "score")  # type: ignore[return-value]

    def _layer_arg(self, what: str, layer: int) -> int:
        n = self.cfg.n_layers
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer <= n:
            raise ValueError(f"{what}={layer!r} out of range: the model has {n} layers (0-{n})")
        return layer

    def forward(  # type: ignore[override]
        self,
        input: CrossEncoderBatch | Int[Tensor, "batch pos"],
        token_type_ids: Int[Tensor, "batch pos"] | None = None,
        attention_mask: Int[Tensor, "batch pos"] | None = None,
        *,
        return_type: ReturnType = "score",
        start_at_layer: int | None = None,
        stop_at_layer: int | None = None,
        resid: Float[Tensor, "batch pos d_model"] | None = None,
    ) -> Tensor | None:
        """Run MonoT5 on a batch (or token ids with ``attention_mask``).

        Args:
            return_type: ``"score"`` ``[batch]`` (default), ``"logits"`` (the answers'
                ``(false, true)`` logits ``[batch, 2]``), ``"vocab_logits"`` ``[batch, d_vocab]``,
                ``"resid"`` (the encoder output ``[batch, pos, d_model]``) or None.
            start_at_layer: run encoder blocks from this layer on, from ``resid`` (the input of
                that block; for ``n_layers``, the encoder output).
            stop_at_layer: run encoder blocks before this layer only and return the input of
                block ``stop_at_layer``.
        """
        n_layers = self.cfg.n_layers
        start = 0 if start_at_layer is None else self._layer_arg("start_at_layer", start_at_layer)
        stop = (
            n_layers if stop_at_layer is None else self._layer_arg("stop_at_layer", stop_at_layer)
        )
        if start > stop:
            raise ValueError(f"start_at_layer {start} is after stop_at_layer {stop}")
        if (start_at_layer is None) != (resid is None):
            raise ValueError("pass resid= (the input of block start_at_layer) with start_at_layer")
        with self.forward_frame(input, token_type_ids, attention_mask) as now:
            if resid is None:
                resid = self.hook_full_embed(self.embed(now.tokens))
            else:
                resid = resid.to(self.cfg.device)
            mask = now.attention_mask
            additive = None if mask is None else self.additive_attention_mask(mask)
            if stop > start:
                bias = self.encoder_position_bias(resid.shape[1])
                for layer in range(start, stop):
                    resid = self._finish(layer, self.blocks[layer](resid, additive, bias))
            if stop_at_layer is not None or return_type == "resid":
                return resid
            return self._head(resid, additive, return_type)

    # ------------------------------------------------------------------ user API
    def encode(
        self,
        queries: str | Sequence[str],
        documents: str | Sequence[str],
        *,
        max_length: int | None = None,
        pair_ids: Sequence[str] | None = None,
    ) -> CrossEncoderBatch:
        """Fill the prompt with each pair and tokenize it (:func:`encode_prompts`); the parts
        label the template tokens (prefix, middle, suffix), the query and the document.
        ``max_length`` defaults to :attr:`max_length` and may not exceed it."""
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer: pass one to load_cross_encoder")
        length = self.max_length if max_length is None else max_length
        check_max_length(length, self.max_length)
        batch = encode_prompts(self.tokenizer, self.prompt, queries, documents, max_length=length)
        return batch if pair_ids is None else batch.with_pair_ids(pair_ids)

    def template_ids(self) -> tuple[list[int], list[int], list[int]]:
        """The prompt's own tokens: before the query, between query and document, after the
        document (with the tokenizer's special tokens, T5's ``</s>``), each piece tokenized
        alone (as the whole prompt is for whitespace-split SentencePiece tokenizers such as
        T5's, where the template meets the slots at spaces)."""
        tok = self.tokenizer

        def piece(text: str) -> list[int]:
            return list(tok(text, add_special_tokens=False)["input_ids"]) if text.strip() else []

        plain = list(tok("x", add_special_tokens=False)["input_ids"])
        full = list(tok("x")["input_ids"])
        start = next(i for i in range(len(full)) if full[i : i + len(plain)] == plain)
        lead, trail = full[:start], full[start + len(plain) :]
        prefix, middle, suffix = self.prompt.around(tok)
        return lead + piece(prefix), piece(middle), piece(suffix) + trail

    @property
    def n_special(self) -> int:
        """Tokens of a pair's input besides its query and document: the template's."""
        return sum(len(ids) for ids in self.template_ids())

    def field_tokens(
        self, text: str, field: Literal["query", "document"] = "document"
    ) -> list[int]:
        """``text``'s token ids as the query or the document of this model's prompt: the
        tokenizer's, without special tokens (T5's template pieces end at the fields)."""
        if field not in ("query", "document"):
            raise ValueError(f"field must be 'query' or 'document', got {field!r}")
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def batch_from_tokens(
        self,
        query_ids: Sequence[Sequence[int]],
        document_ids: Sequence[Sequence[int]],
        *,
        max_length: int | None = None,
    ) -> CrossEncoderBatch:
        """A batch from already-tokenized queries and documents (no special tokens), the
        template's tokens (:meth:`template_ids`) around them, documents cut to ``max_length``
        (default :attr:`max_length`): what :func:`mechir.parts.cross_encoder_batch_from_tokens`
        is for the encoder families (token-level perturbations use it).

        Raises:
            ValueError: lists of different lengths, an empty query or document, or a query
                leaving no room for a document token; the message names the pair.
        """
        prefix, middle, suffix = self.template_ids()
        pieces = [(prefix, Part.CLS), ([], Part.QUERY), (middle, Part.SEP1), ([], Part.DOCUMENT),
                  (suffix, Part.SEP2)]  # fmt: skip
        return prompt_batch_from_tokens(
            pieces, query_ids, document_ids,
            max_length=self.max_length if max_length is None else max_length,
            pad_token_id=pad_token_id(self.tokenizer),
        )  # fmt: skip

    def to(self, device_or_dtype: torch.device | str | torch.dtype, print_details: bool = False):  # type: ignore[override]
        """Move (or cast) the model and keep ``cfg.device`` / ``cfg.dtype`` in step."""
        if isinstance(device_or_dtype, torch.dtype):
            self.cfg.dtype = device_or_dtype
        else:
            self.cfg.device = str(torch.device(device_or_dtype))
        return nn.Module.to(self, device_or_dtype)


def _n_ctx(tokenizer: Any, shape: T5Shape) -> int:
    length = getattr(tokenizer, "model_max_length", None)
    if isinstance(length, int) and 0 < length <= 1_000_000:
        return length
    return shape.n_positions or DEFAULT_MAX_LENGTH


def build_from_tensors(
    tensors: Iterator[tuple[str, Tensor]],
    shape: T5Shape,
    tokenizer: Any,
    *,
    family: Family,
    options: LoadOptions,
    source: str,
) -> HookedMonoT5:
    """The hooked MonoT5 from a stream of Hugging Face tensors: the model is built on the meta
    device and each tensor converted (cast to ``options.dtype``) and assigned as it arrives, so
    at most one full copy of the weights exists (plus one tensor in conversion).

    Raises:
        ValueError: a non-finite tensor (named), missing or unknown weights.
    """
    template = options.template or DEFAULT_TEMPLATE
    answers = tuple(options.answer_tokens or DEFAULT_ANSWERS)
    if tokenizer is None:
        raise ValueError("MonoT5 needs its tokenizer: pass tokenizer=...")
    prompt = monot5_prompt(template, answers, family.name)  # type: ignore[arg-type]
    answer_ids = prompt.answer_ids(tokenizer)
    dtype = options.dtype or torch.float32
    cfg = hooked_config(shape, n_ctx=_n_ctx(tokenizer, shape), device=options.device, dtype=dtype)
    state: dict[str, Tensor] = {}
    lm_head: Tensor | None = None
    for name, tensor in tensors:
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise ValueError(
                f"{source}: weight {name!r} has {bad} non-finite values (NaN/inf) out of "
                f"{tensor.numel()}: the checkpoint is corrupted; re-download or re-save it"
            )
        if name == "lm_head.weight":
            lm_head = tensor.to(dtype).contiguous()
            continue
        converted = convert_tensor(name, tensor, shape.n_heads)
        if converted is not None:
            state[converted[0]] = converted[1].to(dtype).contiguous()
    embedding = state.get("embed.embed.W_E")
    tied = lm_head is None or (embedding is not None and torch.equal(lm_head, embedding))
    if not tied:
        state["classifier.W_U"] = lm_head.T.contiguous()  # type: ignore[union-attr]
    del lm_head
    with torch.device("meta"):
        model = HookedMonoT5(
            cfg,
            shape,
            tokenizer,
            family=family,
            answer_ids=answer_ids,
            tied=tied,
            template=template,
            answer_tokens=answers,  # type: ignore[arg-type]
            score_type=options.score_type,  # type: ignore[arg-type]
            move_to_device=False,
        )
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(
            f"{source}: the T5 checkpoint does not match its config (missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}); re-save the model"
        )
    model.load_state_dict(state, assign=True)
    del state
    nn.Module.to(model, cfg.device)
    return model.eval()


def load(family: Family, source: Any, tokenizer: Any, options: LoadOptions) -> HookedMonoT5:
    """Load a ``T5ForConditionalGeneration`` reranker (a local directory or hub id, streamed
    tensor by tensor from its weight files; or an in-memory model).

    Raises:
        ValueError: an ``instruction`` (MonoT5 has none), a bad template or answer token, a
            slow tokenizer, non-finite weights.
        UnsupportedModelError: a T5 variant mechir does not implement (see :func:`t5_shape`).
    """
    if options.instruction is not None:
        raise ValueError(
            f"instruction: {family.name} prompts have no instruction; drop the option (or write "
            "the words into --template)"
        )
    monot5_prompt(options.template or DEFAULT_TEMPLATE, family=family.name)
    if options.score_type is not None:
        check_score_type(options.score_type)
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            f"{type(tokenizer).__name__} is a slow tokenizer: MonoT5 needs a fast one (with "
            "offsets, tokenizer.json) to find the query and document tokens"
        )
    if isinstance(source, (str, os.PathLike)):
        from transformers import AutoConfig

        name = str(source)
        directory = Path(source)
        if not directory.is_dir():
            from huggingface_hub import snapshot_download

            directory = Path(snapshot_download(name))
        config = AutoConfig.from_pretrained(directory)
        tensors = _stream_tensors(directory)
    else:
        name, config = type(source).__name__, source.config
        tensors = _hf_tensors(source)
    shape = t5_shape(config, name)
    return build_from_tensors(
        tensors, shape, tokenizer, family=family, options=options, source=name
    )
