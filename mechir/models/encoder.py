"""The hooked cross-encoder: a TransformerLens ``HookedEncoder`` with a hooked relevance head.

What every encoder family shares: the model class :class:`HookedCrossEncoder`, its BERT-block
body and heads, built from an ``EncoderShape`` and the family's ``EncoderSpec``
(:mod:`mechir.models.spec`: how its config and state dict map onto mechir's, its embedding
rule, head activation and pair layout, and, for a body TransformerLens's blocks cannot express,
its own body builder: ModernBERT). The families
themselves are one file each (:mod:`mechir.models.bert`, ``electra``, ``roberta``, ``distilbert``,
``modernbert``).

The relevance computation of the BERT-block families, with the hook point of every step::

    embed.hook_embed, embed.hook_pos_embed, embed.hook_token_type_embed (absent for DistilBERT)
    -> embed.ln (-> embed.hook_embed_proj, ELECTRA with embedding_size != hidden_size)
    hook_full_embed -> blocks.{l}.* -> blocks.{L-1}.hook_normalized_resid_post
    -> pooler.hook_pooler_out      act(h_first W_p + b_p)  act: tanh (BERT, RoBERTa, XLM-R),
                                                           GELU (ELECTRA), ReLU (DistilBERT)
    -> classifier.hook_logits      pooled W_c + b_c              [batch, num_labels]
    -> hook_score                  one relevance score per pair  [batch]

For ELECTRA, RoBERTa and XLM-R the "pooler" is the classification head's ``dense`` layer and the
classifier its ``out_proj``; for DistilBERT they are ``pre_classifier`` and ``classifier``.
RoBERTa/XLM-R position ids start at ``padding_idx + 1`` (``embed.position_offset``).
Pre-LN families (ModernBERT) end their blocks in ``hook_resid_post`` and add ``ln_final`` ->
``hook_final_hidden`` (``model.block_output_name(l)``, ``model.final_hidden_name``).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Sequence
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
from mechir.models.hooked import HookedRerankerMixin, HooksArg
from mechir.models.registry import Family, LoadOptions, UnsupportedModelError, family_of
from mechir.models.scores import DEFAULT_SCORE_TYPE, ScoreType, check_score_type
from mechir.models.spec import EncoderShape, EncoderSpec
from mechir.models.tl import (
    Attention,
    BertBlock,
    BertEmbed,
    BertPooler,
    HookedEncoder,
    HookedRootModule,
    HookedTransformerConfig,
    HookPoint,
    LayerNorm,
    TypedModuleList,
    attention_direction,
)
from mechir.parts import CrossEncoderBatch, check_max_length, encode, pair_layout_of
from mechir.running import HookFn, Hooks, running_batch

__all__ = [
    "EncoderShape",
    "EncoderSpec",
    "HookFn",
    "HookedCrossEncoder",
    "Hooks",
    "HooksArg",
    "load_encoder",
    "running_batch",
]

ReturnType = Literal["score", "logits", "pooled", "resid", None]


class HookAwareLayerNorm(LayerNorm):
    """TransformerLens ``LayerNorm`` that runs PyTorch's fused ``layer_norm`` when neither of its
    hook points (``hook_scale``, ``hook_normalized``) has a hook, forward or backward, and
    TransformerLens's exact step-by-step computation (with both hook points) whenever one has.
    Same parameters, same hook names, same results up to float rounding; about 6 fewer passes
    over the activations."""

    def forward(self, x: Float[Tensor, "*batch d_model"]) -> Float[Tensor, "*batch d_model"]:
        hooked = any(
            point._forward_hooks or point._backward_hooks or point._backward_pre_hooks
            for point in (self.hook_scale, self.hook_normalized)
        )
        if hooked or self.cfg.dtype not in (torch.float32, torch.float64):
            return super().forward(x)
        return nn.functional.layer_norm(x, (self.length,), self.w, self.b, self.eps)


class EncoderAttention(Attention, AttentionTerms):
    """TransformerLens's bidirectional attention -- the same parameters, hook points and hook
    values -- in fewer passes over the ``[batch, head, query, key]`` scores.

    When no hook of this forward pass reads or changes ``hook_attn_scores`` or ``hook_pattern``
    (:func:`attention_watched`), one fused ``scaled_dot_product_attention`` computes ``z`` without
    materialising the scores (:func:`attend_fused`; ``hook_q``/``k``/``v``/``z`` still fire).
    Otherwise the explicit path (:func:`attend`): ``1/sqrt(d_head)`` scales the queries instead of
    the scores, the padding mask is added in place, and fully masked rows (softmax NaN) become
    zeros only where they can occur. A configuration this path does not cover (a cache, attention
    results, rotary/ALiBi positions, a causal mask, QK norm, ...) runs TransformerLens's own
    forward."""

    def _lean(self) -> bool:
        c = self.cfg
        return (
            c.positional_embedding_type == "standard"
            and attention_direction(self) == "bidirectional"
            and not (c.use_attn_result or c.load_in_4bit or c.use_qk_norm or c.use_logn_attn)
            and not c.use_attention_sinks
            and c.clip_qkv is None
            and not c.attn_scores_soft_cap > 0
        )

    def forward(  # type: ignore[override]
        self,
        query_input: Tensor,
        key_input: Tensor,
        value_input: Tensor,
        past_kv_cache_entry: Any = None,
        additive_attention_mask: Float[Tensor, "#batch 1 1 kv_pos"] | None = None,
        attention_mask: Tensor | None = None,
        position_bias: Tensor | None = None,
    ) -> Float[Tensor, "batch pos d_model"]:
        """``softmax(q k^T / sqrt(d_head) + mask) v W_O + b_O``, hooks as in TransformerLens."""
        if past_kv_cache_entry is not None or position_bias is not None or not self._lean():
            return super().forward(
                query_input, key_input, value_input, past_kv_cache_entry,
                additive_attention_mask, attention_mask, position_bias,
            )  # fmt: skip
        q, k, v = self.calculate_qkv_matrices(query_input, key_input, value_input)
        mask = additive_attention_mask
        empty_rows = mask is not None and rows_may_be_empty(self, mask, _all_keys_masked)
        if not attention_watched(self):
            return attend_fused(
                self, q, k, v, mask, scale=1 / self.attn_scale, empty_rows=empty_rows
            )
        scores = (q / self.attn_scale).transpose(1, 2) @ k.permute(0, 2, 3, 1)
        if mask is not None:
            scores = scores.add_(mask)  # in place: the fresh product is read by nothing else
        return attend(self, scores, v, empty_rows=empty_rows)


def _all_keys_masked(mask: Float[Tensor, "#batch 1 1 key_pos"]) -> Tensor:
    """Whether some row of the additive key mask removes every key (a pair without tokens)."""
    return mask.isneginf().all(-1).any()


class CrossEncoderEmbed(BertEmbed):
    """``BertEmbed`` (same parameters and hook names) with the family's embedding rules.

    ``LN(W_E[t] + W_pos[position_offset + i] + W_tt[type])``, then ``embed.hook_embed_proj``
    ``(x W_proj + b_proj)`` when the embedding is narrower than the model (ELECTRA-small).

    * ``position_offset`` 0: positions ``0..n-1``. ``position_offset = padding_idx + 1``
      (RoBERTa/XLM-R): real tokens ``padding_idx + 1 + i``, padding tokens ``padding_idx``
      (Hugging Face's ``create_position_ids_from_input_ids``).
    * ``n_token_types`` 0: no token-type embedding and no ``embed.hook_token_type_embed``
      (DistilBERT); 1 (RoBERTa/XLM-R): one row, always added.

    Attributes:
        n_token_types: rows of the token-type embedding (0: none).
    """

    def __init__(self, cfg: HookedTransformerConfig, shape: EncoderShape, spec: EncoderSpec):
        embed_cfg = cfg
        if shape.d_embed != cfg.d_model:
            embed_cfg = copy.copy(cfg)
            embed_cfg.d_model = shape.d_embed
        super().__init__(embed_cfg)
        self.cfg = cfg
        self.ln = HookAwareLayerNorm(embed_cfg)
        self.pad_token_id = shape.pad_token_id
        self.position_offset = spec.position_offset(shape)
        self.n_token_types = shape.n_token_types
        if shape.n_token_types == 0:
            del self.token_type_embed, self.hook_token_type_embed
        elif shape.n_token_types != 2:
            self.token_type_embed.W_token_type = nn.Parameter(
                torch.empty(shape.n_token_types, shape.d_embed, dtype=cfg.dtype)
            )
        self.projected = shape.d_embed != cfg.d_model
        if self.projected:
            self.W_proj = nn.Parameter(torch.empty(shape.d_embed, cfg.d_model, dtype=cfg.dtype))
            self.b_proj = nn.Parameter(torch.zeros(cfg.d_model, dtype=cfg.dtype))
            self.hook_embed_proj = HookPoint()

    def position_ids(self, input_ids: Int[Tensor, "batch pos"]) -> Int[Tensor, "batch pos"]:
        """Row of ``W_pos`` of every token (see the class docstring)."""
        if self.position_offset == 0:
            return torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        real = input_ids.ne(self.pad_token_id).long()
        return real.cumsum(1) * real + self.pad_token_id

    def token_states(
        self,
        token_ids: Int[Tensor, " n"],
        *,
        token_type: int = 0,
        position: int | None = None,
    ) -> Float[Tensor, "n d_model"]:
        """What ``hook_full_embed`` holds for tokens of one segment at sequence position
        ``position`` (``None``: without a position embedding)."""
        x = self.embed.W_E[token_ids]
        if self.n_token_types:
            n_types = self.token_type_embed.W_token_type.shape[0]
            x = x + self.token_type_embed.W_token_type[min(token_type, n_types - 1)]
        if position is not None:
            x = x + self.pos_embed.W_pos[self.position_offset + position]
        return self._project(self.ln(x[None]))[0]

    def _project(self, x: Float[Tensor, "batch pos d_embed"]) -> Float[Tensor, "batch pos d_model"]:
        if not self.projected:
            return x
        return self.hook_embed_proj(x @ self.W_proj + self.b_proj)

    def forward(
        self,
        input_ids: Int[Tensor, "batch pos"],
        token_type_ids: Int[Tensor, "batch pos"] | None = None,
    ) -> Float[Tensor, "batch pos d_model"]:
        x = self.hook_embed(self.embed(input_ids))
        x = x + self.hook_pos_embed(self.pos_embed.W_pos[self.position_ids(input_ids)])
        if self.n_token_types:
            if token_type_ids is None:
                token_type_ids = torch.zeros_like(input_ids)
            x = x + self.hook_token_type_embed(self.token_type_embed(token_type_ids))
        return self._project(self.ln(x))


class CrossEncoderPooler(BertPooler):
    """``BertPooler`` with the family's activation: ``act(resid[:, 0] W + b)``, hooked at
    ``hook_pooler_out`` (tanh: BERT/RoBERTa/XLM-R; GELU: ELECTRA; ReLU: DistilBERT)."""

    ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
        "tanh": nn.Tanh,
        "gelu": nn.GELU,
        "relu": nn.ReLU,
    }

    #: What the pooler reads: the first position (``"cls"``; ModernBERT's head may say ``"mean"``).
    pooling: str = "cls"

    def __init__(self, cfg: HookedTransformerConfig, activation: str = "tanh"):
        super().__init__(cfg)
        self.activation = self.ACTIVATIONS[activation]()


class CrossEncoderClassifier(nn.Module):
    """Linear classification head on the pooled [CLS] vector: ``logits = pooled @ W + b``."""

    def __init__(self, cfg: HookedTransformerConfig, num_labels: int):
        super().__init__()
        self.W = nn.Parameter(torch.empty(cfg.d_model, num_labels, dtype=cfg.dtype))
        self.b = nn.Parameter(torch.zeros(num_labels, dtype=cfg.dtype))
        self.hook_logits = HookPoint()

    def forward(self, pooled: Float[Tensor, "batch d_model"]) -> Float[Tensor, "batch n_labels"]:
        return self.hook_logits(nn.functional.linear(pooled, self.W.T, self.b))


class HookedCrossEncoder(HookedRerankerMixin, HookedEncoder):
    """TransformerLens ``HookedEncoder`` whose forward pass returns cross-encoder relevance scores.

    The masked-language-model and next-sentence heads of ``HookedEncoder`` are not built (a
    cross-encoder has none); the pooler and a classifier with hook points are.

    While a forward pass runs, :attr:`running_batch` is the :class:`CrossEncoderBatch` it runs on
    (like an attention mask, the parts of every token travel with the input), so part-dependent
    hooks read the parts of the batch they run on: a hook list is built once and is correct for
    every batch and sub-batch.

    Args:
        cfg: the encoder configuration (see :func:`hooked_config_from_hf`).
        shape: the family-independent encoder description (default: read from ``cfg``).
        family: the registry entry of the model's family (:class:`mechir.models.Family`).
        spec: the family's :class:`EncoderSpec` (default BERT's).
        num_labels: 1 (score = the logit) or >= 2 (MonoBERT: 2).
        tokenizer: the model's Hugging Face tokenizer, used by :meth:`encode`.
        relevant_label: the relevant class when ``num_labels >= 2``.
        score_type: what :meth:`score` returns, from the classifier logits ``z``:
            ``"binary_logit"`` (default) the log-odds of relevance: ``z`` for one label,
            ``z_rel - logsumexp(z_other)`` for several (``z1 - z0`` for MonoBERT; ranks exactly
            like the softmax probability and is linear in the classifier for two labels);
            ``"logit"`` the relevant class's logit ``z_rel`` alone; ``"log_prob"`` its
            log-softmax (log-sigmoid for one label); ``"prob"`` its softmax (sigmoid).
    """

    def __init__(
        self,
        cfg: HookedTransformerConfig,
        num_labels: int,
        tokenizer: Any = None,
        *,
        relevant_label: int = 1,
        score_type: ScoreType | None = None,
        move_to_device: bool = True,
        family: Family | None = None,
        spec: EncoderSpec | None = None,
        shape: EncoderShape | None = None,
    ):
        # HookedEncoder.__init__ would build the (unused, vocabulary-sized) MLM/NSP heads and warn
        # about its deprecation; we build only what a cross-encoder has.
        if family is None or spec is None:  # built by hand: BERT (its family file, by name)
            bert = family_of("bert", "BertForSequenceClassification")
            family, spec = family or bert, spec or bert.implementation().SPEC
        HookedRootModule.__init__(self)
        self.cfg = cfg
        self.init_reranker(tokenizer, family)
        self.spec = spec
        if num_labels < 1:
            raise ValueError(f"num_labels must be >= 1, got {num_labels}")
        if num_labels > 1 and not 0 <= relevant_label < num_labels:
            raise ValueError(
                f"relevant_label {relevant_label} out of range for {num_labels} labels"
            )
        self.num_labels = num_labels
        self.relevant_label = relevant_label if num_labels > 1 else 0
        self.score_type = DEFAULT_SCORE_TYPE if score_type is None else score_type
        shape = shape or _bert_shape(cfg)
        self.ln_final: nn.Module | None = None
        if self.spec.body is not None:
            self.spec.body(self, cfg, shape)
        else:
            self.embed = CrossEncoderEmbed(cfg, shape, self.spec)
            self.blocks = TypedModuleList([BertBlock(cfg) for _ in range(cfg.n_layers)])
            for block in self.blocks:
                block.ln1, block.ln2 = HookAwareLayerNorm(cfg), HookAwareLayerNorm(cfg)
                block.attn = EncoderAttention(cfg)
            self.pooler = CrossEncoderPooler(cfg, self.spec.head_activation)
        self.classifier = CrossEncoderClassifier(cfg, num_labels)
        self.hook_full_embed = HookPoint()
        self.hook_score = HookPoint()
        if move_to_device and cfg.device is not None:
            nn.Module.to(self, cfg.device)
        self.setup()

    @property
    def score_type(self) -> ScoreType:
        return self._score_type

    @score_type.setter
    def score_type(self, value: ScoreType) -> None:
        self._score_type = check_score_type(value)

    # ------------------------------------------------------------------ forward
    def scores_from_logits(
        self, logits: Float[Tensor, "batch n_labels"]
    ) -> Float[Tensor, " batch"]:
        """Relevance score from classifier logits, according to :attr:`score_type`."""
        if self.num_labels == 1:
            x = logits[:, 0]
            if self.score_type in ("logit", "binary_logit"):
                return x
            return nn.functional.logsigmoid(x) if self.score_type == "log_prob" else x.sigmoid()
        rel = self.relevant_label
        if self.score_type == "logit":
            return logits[:, rel]
        if self.score_type == "binary_logit":
            if self.num_labels == 2:
                return logits[:, rel] - logits[:, 1 - rel]
            others = torch.cat([logits[:, :rel], logits[:, rel + 1 :]], dim=-1)
            return logits[:, rel] - others.logsumexp(-1)
        log_probs = logits.log_softmax(-1)[:, rel]
        return log_probs if self.score_type == "log_prob" else log_probs.exp()

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
        """Run the cross-encoder.

        Args:
            input: a :class:`CrossEncoderBatch`, or token ids (then pass ``token_type_ids`` and,
                for padded batches, ``attention_mask``).
            return_type: ``"score"`` ``[batch]`` (default), ``"logits"`` ``[batch, num_labels]``,
                ``"pooled"`` ``[batch, d_model]``, ``"resid"`` (final hidden states
                ``[batch, pos, d_model]``) or None.
            start_at_layer: run blocks from this layer on, starting from ``resid`` (the input of
                that block, ``blocks.{l}.hook_resid_pre``); the embeddings are not run.
            stop_at_layer: run blocks before this layer only and return the input of block
                ``stop_at_layer`` ``[batch, pos, d_model]`` (``return_type`` is ignored).
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
        with self.forward_frame(input, token_type_ids, attention_mask) as input_now:
            if resid is None:
                resid = self.hook_full_embed(self.embed(input_now.tokens, input_now.token_type_ids))
            else:
                resid = resid.to(self.cfg.device)
            additive = (
                None
                if input_now.attention_mask is None
                else self.additive_attention_mask(input_now.attention_mask)
            )
            for layer in range(start, stop):
                resid = self._finish(layer, self.blocks[layer](resid, additive))
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

    @property
    def abilities(self) -> Abilities:
        """A cross-encoder's: bidirectional, post-LN or pre-LN as its spec says, no prompt."""
        return Abilities(
            causal=False,
            post_ln=self.spec.blocks == "post_ln",
            qk_norm=False,
            grouped_kv=False,
            cross_attention=False,
            prompt=False,
            edges=self.family.edge_circuits,
        )

    # ------------------------------------------------------------------ block-level API
    @staticmethod
    def additive_attention_mask(
        attention_mask: Int[Tensor, "batch pos"],
    ) -> Float[Tensor, "batch 1 1 pos"]:
        """0 on real tokens, -inf on padding keys (what the encoder adds to attention scores)."""
        return torch.where(attention_mask[:, None, None, :] == 0, -torch.inf, 0.0)

    def run_block(
        self,
        layer: int,
        resid: Float[Tensor, "batch pos d_model"],
        additive_mask: Float[Tensor, "batch 1 1 pos"],
        *,
        cls_only: bool = False,
    ) -> Float[Tensor, "batch pos_out d_model"]:
        """Run block ``layer`` (with its hooks) on ``resid``, its input.

        With ``cls_only`` only query position 0 ([CLS], the only one the pooler reads) is
        computed, keys and values still from every position: ``[batch, 1, d_model]``. It falls
        back to the full block when a hook sits on the block or split q/k/v inputs are enabled,
        because such hooks may expect every position.
        """
        block = self.blocks[layer]
        cls_only = cls_only and self._cls_only_is_safe(layer)
        if self.spec.blocks == "pre_ln":
            return self._finish(layer, block(resid, additive_mask, 1 if cls_only else None))
        if not cls_only:
            return block(resid, additive_mask)
        query = resid[:, :1]
        attn_out = block.hook_attn_out(
            block.attn(query, resid, resid, additive_attention_mask=additive_mask)
        )
        resid_mid = block.hook_resid_mid(query + attn_out)
        normalized = block.ln1(resid_mid)
        resid_post = block.hook_resid_post(normalized + block.hook_mlp_out(block.mlp(normalized)))
        return block.hook_normalized_resid_post(block.ln2(resid_post))

    def _finish(
        self, layer: int, resid: Float[Tensor, "batch pos d_model"]
    ) -> Float[Tensor, "batch pos d_model"]:
        """A block's output as the next block reads it; after the last block of a pre-LN model
        (ModernBERT) that is the final norm's output ``hook_final_hidden``."""
        if self.ln_final is None or layer != self.cfg.n_layers - 1:
            return resid
        return self.hook_final_hidden(self.ln_final(resid))

    @property
    def final_hidden_name(self) -> str:
        """Hook of the final hidden states, the input of the score head: BERT blocks'
        ``blocks.{L-1}.hook_normalized_resid_post``; ModernBERT's ``hook_final_hidden`` (the
        output of the final norm ``ln_final``, whose ``hook_normalized`` is before its weight)."""
        if self.ln_final is not None:
            return "hook_final_hidden"
        return self.block_output_name(self.cfg.n_layers - 1)

    def block_output_name(self, layer: int) -> str:
        """Hook of block ``layer``'s output (post-LN BERT: ``hook_normalized_resid_post``;
        pre-LN ModernBERT: ``hook_resid_post``, before the final norm for the last block)."""
        if self.spec.blocks == "pre_ln":
            return f"blocks.{layer}.hook_resid_post"
        return f"blocks.{layer}.hook_normalized_resid_post"

    def _cls_only_is_safe(self, layer: int) -> bool:
        if self.pooler.pooling != "cls":
            return False  # mean pooling reads every position
        if self.ln_final is not None and layer == self.cfg.n_layers - 1:
            final = [*self.ln_final.modules(), self.hook_final_hidden]
            if any(m._forward_hooks or m._forward_pre_hooks for m in final):
                return False
        cfg = self.cfg
        if cfg.use_split_qkv_input or cfg.use_hook_mlp_in or cfg.use_attn_in:
            return False
        return not any(
            m._forward_hooks or m._forward_pre_hooks for m in self.blocks[layer].modules()
        )

    def score_from_resid(
        self, resid: Float[Tensor, "batch pos d_model"]
    ) -> Float[Tensor, " batch"]:
        """The score head on final hidden states: pooler, classifier, ``hook_score``."""
        return self.hook_score(self.scores_from_logits(self.classifier(self.pooler(resid))))

    # ------------------------------------------------------------------ user API
    def encode(
        self,
        queries: str | Sequence[str],
        documents: str | Sequence[str],
        *,
        max_length: int | None = None,
        pair_ids: Sequence[str] | None = None,
    ) -> CrossEncoderBatch:
        """Tokenize pairs with this model's tokenizer (see :func:`mechir.encode`).

        ``max_length`` defaults to :attr:`max_length` and may not exceed it; the pair layout is
        the family's. ``pair_ids`` (one per pair) identify the examples (see
        :class:`~mechir.parts.CrossEncoderBatch`).
        """
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer: pass one to load_cross_encoder")
        length = self.max_length if max_length is None else max_length
        check_max_length(length, self.max_length)
        batch = encode(
            self.tokenizer, queries, documents, max_length=length, layout=self.spec.layout
        )
        return batch if pair_ids is None else batch.with_pair_ids(pair_ids)

    @property
    def max_length(self) -> int:
        """Longest input the position table allows (RoBERTa: positions minus the offset)."""
        return self.cfg.n_ctx - self.embed.position_offset

    @property
    def d_mlp(self) -> int:
        return self.cfg.d_mlp

    def to(self, device_or_dtype: torch.device | str | torch.dtype, print_details: bool = False):  # type: ignore[override]
        return super().to(device_or_dtype, print_details=print_details)


# ---------------------------------------------------------------------- conversion from HF
def _bert_shape(cfg: HookedTransformerConfig) -> EncoderShape:
    return EncoderShape(
        d_model=cfg.d_model,
        n_heads=cfg.n_heads,
        d_mlp=cfg.d_mlp,
        n_layers=cfg.n_layers,
        n_positions=cfg.n_ctx,
        d_vocab=cfg.d_vocab,
        eps=cfg.eps,
        act_fn=cfg.act_fn,
        n_token_types=2,
        d_embed=cfg.d_model,
        pad_token_id=0,
    )


def encoder_family(hf_config: Any, architecture: str | None = None) -> tuple[Family, EncoderSpec]:
    """The registry entry and :class:`EncoderSpec` of a Hugging Face encoder config.

    Raises:
        UnsupportedModelError: not an encoder family mechir loads.
    """
    from mechir.models.registry import family_for_config

    family = family_for_config(hf_config, type(hf_config).__name__, architecture)
    if family.kind != "encoder":
        raise UnsupportedModelError(f"{family.name} is not an encoder family")
    return family, family.implementation().SPEC


def hooked_config_from_shape(
    shape: EncoderShape,
    *,
    architecture: str = "BertForSequenceClassification",
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> HookedTransformerConfig:
    """TransformerLens config for an :class:`EncoderShape`."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return HookedTransformerConfig(
        d_model=shape.d_model,
        d_head=shape.d_model // shape.n_heads,
        n_heads=shape.n_heads,
        d_mlp=shape.d_mlp,
        n_layers=shape.n_layers,
        n_ctx=shape.n_positions,
        eps=shape.eps,
        d_vocab=shape.d_vocab,
        act_fn=shape.act_fn,
        attention_dir="bidirectional",
        original_architecture=architecture,
        device=str(device),
        dtype=dtype,
    )


def hooked_config_from_hf(
    hf_config: Any, *, device: str | torch.device | None = None, dtype: torch.dtype = torch.float32
) -> HookedTransformerConfig:
    """TransformerLens config for a Hugging Face config of a supported family (built locally)."""
    family, spec = encoder_family(hf_config)
    return hooked_config_from_shape(
        spec.encoder_config(hf_config), architecture=family.hf_class, device=device, dtype=dtype
    )


def state_dict_from_hf(hf_model: nn.Module, n_heads: int) -> dict[str, Tensor]:
    """Map a supported ``*ForSequenceClassification`` state dict to mechir names."""
    _, spec = encoder_family(hf_model.config, type(hf_model).__name__)
    sd = spec.state_dict(hf_model, n_heads)
    return {k: v.detach().clone().contiguous() for k, v in sd.items()}


def hooked_cross_encoder_from_hf(
    hf_model: nn.Module,
    tokenizer: Any,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    relevant_label: int = 1,
    score_type: ScoreType | None = None,
) -> HookedCrossEncoder:
    """Convert an in-memory ``*ForSequenceClassification`` (already validated) to mechir."""
    family, spec = encoder_family(hf_model.config, type(hf_model).__name__)
    shape = spec.encoder_config(hf_model.config)
    cfg = hooked_config_from_shape(shape, architecture=family.hf_class, device=device, dtype=dtype)
    model = HookedCrossEncoder(
        cfg,
        hf_model.config.num_labels,
        tokenizer,
        relevant_label=relevant_label,
        score_type=score_type,
        move_to_device=False,
        family=family,
        spec=spec,
        shape=shape,
    )
    state = {k: v.to(dtype) for k, v in state_dict_from_hf(hf_model, cfg.n_heads).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    # Only TL's non-parameter buffers (e.g. attention masks) may be missing.
    missing = [m for m in missing if not m.endswith(("IGNORE", "mask"))]
    if missing or unexpected:
        raise RuntimeError(
            f"weight conversion mismatch: missing {missing}, unexpected {unexpected}"
        )
    nn.Module.to(model, cfg.device)
    return model.eval()


# ---------------------------------------------------------------------- loading
def _check_encoder_config(family: Family, config: Any, source: str) -> None:
    if getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False):
        raise UnsupportedModelError(
            f"{source}: decoder {family.name} is not supported; load a cross-encoder "
            f"({', '.join(family.architectures)})"
        )
    if getattr(config, "position_embedding_type", "absolute") != "absolute":
        raise UnsupportedModelError(
            f"{source}: position_embedding_type {config.position_embedding_type!r} is not "
            "supported (absolute positions only)"
        )


def _check_tokenizer(tokenizer: Any, family: Family, spec: EncoderSpec, source: str) -> None:
    """The tokenizer must join pairs the way the family was trained to read them."""
    try:
        layout = pair_layout_of(tokenizer)
    except (AttributeError, ValueError):
        return  # a tokenizer without a pair template: the family's layout is used
    if layout.middle_seps != spec.layout.middle_seps:
        raise ValueError(
            f"{source}: the tokenizer puts {layout.middle_seps} separator(s) between query and "
            f"document, but {family.name} cross-encoders read {spec.layout.middle_seps}: pass "
            "the model's own tokenizer"
        )


def load_encoder(
    family: Family,
    spec: EncoderSpec,
    source: str | os.PathLike | Any,
    tokenizer: Any,
    options: LoadOptions,
) -> HookedCrossEncoder:
    """Load an encoder family's ``*ForSequenceClassification`` checkpoint (a resolved local
    directory or hub id, or an in-memory model) with Hugging Face (eager attention), check it
    (a trained head, the tokenizer's pair layout, finite weights) and convert it.

    Raises:
        UnsupportedModelError: a decoder or relative-position config, or no trained head.
        ValueError: unreadable weights, a tokenizer of another layout, non-finite weights.
    """
    from mechir.loading import check_finite_weights

    options.refuse_prompt(family)
    if isinstance(source, (str, os.PathLike)):
        name = str(source)
        from transformers import AutoConfig

        _check_encoder_config(family, AutoConfig.from_pretrained(source), name)
        try:
            hf_model, info = family.hf_model_class().from_pretrained(
                source, output_loading_info=True, attn_implementation="eager"
            )
        except (OSError, RuntimeError, ValueError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ValueError(f"{name}: could not load the weights ({first})") from err
        missing_head = [k for k in info["missing_keys"] if k.startswith(spec.head_keys)]
        if missing_head:
            raise UnsupportedModelError(
                f"{name}: the checkpoint has no trained classification head ({missing_head} "
                f"missing); mechir loads {family.name} cross-encoders "
                f"({', '.join(family.architectures)})"
            )
    else:
        name = type(source).__name__
        _check_encoder_config(family, source.config, name)
        hf_model = source
    _check_tokenizer(tokenizer, family, spec, name)
    check_finite_weights(hf_model, name)
    return hooked_cross_encoder_from_hf(
        hf_model.eval(),
        tokenizer,
        device=options.device,
        dtype=options.dtype,
        relevant_label=options.relevant_label,
        score_type=options.score_type,
    )


def entry_points(spec: EncoderSpec) -> tuple[Callable[..., HookedCrossEncoder], Callable]:
    """The ``load`` and ``dimensions`` functions of an encoder family's file (see
    :class:`mechir.models.Family`): ``load, dimensions = entry_points(SPEC)``."""

    def load(
        family: Family, source: Any, tokenizer: Any, options: LoadOptions
    ) -> HookedCrossEncoder:
        return load_encoder(family, spec, source, tokenizer, options)

    def dimensions(config: Any) -> dict[str, int]:
        shape = spec.encoder_config(config)
        return {
            "n_layers": shape.n_layers,
            "n_heads": shape.n_heads,
            "d_model": shape.d_model,
            "d_mlp": shape.d_mlp,
        }

    return load, dimensions
