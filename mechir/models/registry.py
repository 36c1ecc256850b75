"""The registry of the reranker families mechir loads: one :class:`Family` entry per family.

A family is one file of :mod:`mechir.models` (``bert.py``, ``modernbert.py``, ...) that turns a
Hugging Face checkpoint into a hooked reranker, and one entry in :data:`FAMILIES` saying which
checkpoints it loads (``config.model_type`` and architecture). Adding a family is that file plus
its entry here. This module imports neither torch nor TransformerLens: the CLI checks a model
directory's ``config.json`` against it before anything heavy loads.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Literal


class UnsupportedModelError(ValueError):
    """The checkpoint is not a reranker of a family that mechir can load."""


@dataclass(frozen=True)
class LoadOptions:
    """How to load a checkpoint (:func:`mechir.load_cross_encoder`'s options).

    Attributes:
        device: the device (None: CUDA when available).
        dtype: the parameter dtype (a ``torch.dtype``).
        relevant_label: the relevant class of a multi-label classifier (MonoBERT: 1).
        score_type: what a classifier's score is (see ``HookedCrossEncoder``); None: default.
        template: a prompt-based reranker's prompt, with ``{query}`` and ``{document}`` (and
            ``{instruction}``); None: the family's own.
        instruction: an LLM reranker's instruction; None: the family's own.
        answer_tokens: the relevant and non-relevant answers (``("yes", "no")``); the score is
            ``logit(relevant) - logit(non-relevant)``; None: the family's own.
    """

    device: Any = None
    dtype: Any = None
    relevant_label: int = 1
    score_type: str | None = None
    template: str | None = None
    instruction: str | None = None
    answer_tokens: tuple[str, str] | None = None

    def refuse_prompt(self, family: Family) -> None:
        """One line when prompt options reach a family that reads no prompt.

        Raises:
            ValueError: ``template``, ``instruction`` or ``answer_tokens`` was given.
        """
        given = [k for k in ("template", "instruction", "answer_tokens") if getattr(self, k)]
        if given:
            raise ValueError(
                f"{', '.join(given)}: {family.name} reads no prompt (only prompt-based rerankers "
                "such as MonoT5 and LLM rerankers do); drop the option"
            )


@dataclass(frozen=True)
class Family:
    """One family of rerankers.

    Attributes:
        name: display name (``"BERT"``).
        model_types: the ``config.model_type`` values it loads.
        architectures: the ``transformers`` classes it loads (the first is the default class).
        module: the module implementing it; it defines ``load(family, source, tokenizer,
            options) -> HookedReranker``, where ``source`` is a local directory, a hub id, or an
            in-memory ``transformers`` model of one of ``architectures``, and
            ``dimensions(config) -> {"n_layers", "n_heads", "d_model", "d_mlp"}`` read from a
            Hugging Face config alone.
        examples: example checkpoints, for messages and documentation.
        kind: ``"encoder"`` (cross-encoders), ``"encoder-decoder"`` (MonoT5) or ``"decoder"``.
        n_special: the tokens a pair's input has besides its query and document tokens (BERT's
            ``[CLS] q [SEP] d [SEP]``: 3; RoBERTa's ``<s> q </s></s> d </s>``: 4), for checking
            ``--max-length`` before a model loads.
        edge_circuits: whether the edge engine (``patching.edges``) follows its blocks: encoder
            blocks of plain softmax attention and an MLP, post-LN or pre-LN (not DeBERTa's
            disentangled attention, nor MonoT5's or the decoders' prompt-reading stacks).
    """

    name: str
    model_types: tuple[str, ...]
    architectures: tuple[str, ...]
    module: str
    examples: str
    kind: Literal["encoder", "encoder-decoder", "decoder"] = "encoder"
    n_special: int = 3
    edge_circuits: bool = False

    @property
    def hf_class(self) -> str:
        """The default ``transformers`` class of the family."""
        return self.architectures[0]

    def hf_model_class(self, architecture: str | None = None) -> type:
        import transformers

        return getattr(transformers, architecture or self.hf_class)

    def accepts(self, architecture: str | None) -> bool:
        """Whether the family loads checkpoints of ``architecture`` (None: unknown, accepted)."""
        return architecture is None or architecture in self.architectures

    def implementation(self) -> ModuleType:
        return importlib.import_module(self.module)

    def load(self, source: Any, tokenizer: Any, options: LoadOptions) -> Any:
        """The hooked reranker of ``source`` (see :attr:`module`)."""
        return self.implementation().load(self, source, tokenizer, options)

    def dimensions(self, config: Any) -> dict[str, int]:
        """``n_layers``, ``n_heads``, ``d_model``, ``d_mlp`` of a config (no weights loaded)."""
        return self.implementation().dimensions(config)


_CLASSIFIER = "ForSequenceClassification"

#: Every family mechir loads, in the order messages list them.
FAMILIES: tuple[Family, ...] = (
    Family(
        "BERT", ("bert",), ("BertForSequenceClassification",), "mechir.models.bert",
        "castorini/monobert-large-msmarco, cross-encoder/ms-marco-MiniLM-L-6-v2",
        edge_circuits=True,
    ),
    Family(
        "ELECTRA", ("electra",), ("ElectraForSequenceClassification",), "mechir.models.electra",
        "cross-encoder/ms-marco-electra-base", edge_circuits=True,
    ),
    Family(
        "RoBERTa", ("roberta",), ("RobertaForSequenceClassification",), "mechir.models.roberta",
        "cross-encoder/stsb-roberta-base, RoBERTa rerankers", n_special=4, edge_circuits=True,
    ),
    Family(
        "XLM-RoBERTa", ("xlm-roberta",), ("XLMRobertaForSequenceClassification",),
        "mechir.models.roberta",
        "BAAI/bge-reranker-base, BAAI/bge-reranker-large, BAAI/bge-reranker-v2-m3", n_special=4,
        edge_circuits=True,
    ),
    Family(
        "DistilBERT", ("distilbert",), ("DistilBertForSequenceClassification",),
        "mechir.models.distilbert",
        "DistilBERT cross-encoders (e.g. fine-tuned distilbert-base-uncased)", edge_circuits=True,
    ),
    Family(
        "ModernBERT", ("modernbert",), ("ModernBertForSequenceClassification",),
        "mechir.models.modernbert", "Alibaba-NLP/gte-reranker-modernbert-base", edge_circuits=True,
    ),
    Family(
        "DeBERTa-v2", ("deberta-v2",), ("DebertaV2ForSequenceClassification",),
        "mechir.models.deberta",
        "mixedbread-ai/mxbai-rerank-base-v1, mixedbread-ai/mxbai-rerank-large-v1 (DeBERTa-v3)",
    ),
    Family(
        "DeBERTa", ("deberta",), ("DebertaForSequenceClassification",), "mechir.models.deberta",
        "DeBERTa (v1) cross-encoders (e.g. fine-tuned microsoft/deberta-base)",
    ),
    # n_special: the default prompt's tokens in T5's vocabulary
    # (▁Query : ▁Document : ▁Relevant : </s>)
    Family(
        "MonoT5", ("t5",), ("T5ForConditionalGeneration",), "mechir.models.t5",
        "castorini/monot5-base-msmarco, castorini/monot5-3b-msmarco", kind="encoder-decoder",
        n_special=7,
    ),
    # Decoder LLM rerankers (mechir.models.decoder): yes/no *ForCausalLM rerankers and
    # *ForSequenceClassification decoders. n_special: the prompt's template tokens depend on the
    # tokenizer; encode() checks that a pair fits.
    *(
        Family(
            name, (model_type,), (f"{arch}ForCausalLM", f"{arch}ForSequenceClassification"),
            "mechir.models.decoder", examples, kind="decoder",
        )
        for name, model_type, arch, examples in (
            ("Qwen3", "qwen3", "Qwen3",
             "Qwen/Qwen3-Reranker-0.6B, Qwen/Qwen3-Reranker-4B, Qwen/Qwen3-Reranker-8B"),
            ("Qwen2", "qwen2", "Qwen2",
             "Qwen2/Qwen2.5 yes/no rerankers and classifiers (pass their template=)"),
            ("Llama", "llama", "Llama",
             "RankLLaMA (castorini/rankllama-v1-7b-lora-passage, LoRA merged), Llama rerankers"),
            ("Mistral", "mistral", "Mistral", "Mistral yes/no rerankers and classifiers"),
        )
    ),
)  # fmt: skip


#: What mechir loads, for messages: ``"rerankers of the families BERT (bert), ..."``.
SUPPORTED = "rerankers of the families " + ", ".join(
    f"{f.name} ({'/'.join(f.model_types)})" for f in FAMILIES
)


def family_of(model_type: str | None, architecture: str | None = None) -> Family | None:
    """The family loading checkpoints of ``model_type`` (and ``architecture``, when known), or
    None when mechir does not support them."""
    for family in FAMILIES:
        if model_type in family.model_types and family.accepts(architecture):
            return family
    return None


def families_of(model_type: str | None) -> list[Family]:
    """Every family loading some architecture of ``model_type``."""
    return [f for f in FAMILIES if model_type in f.model_types]


def family_for_config(config: Any, source: str, architecture: str | None = None) -> Family:
    """The family of a Hugging Face config (``model_type`` and ``architectures``; an in-memory
    model's own class is passed as ``architecture``).

    Raises:
        UnsupportedModelError: naming the source, what it is and what mechir loads.
    """
    model_type = getattr(config, "model_type", None)
    candidates = families_of(model_type)
    if not candidates:
        raise UnsupportedModelError(
            f"{source}: model_type {model_type!r} is not supported; mechir loads {SUPPORTED}"
        )
    archs = [architecture] if architecture else list(getattr(config, "architectures", None) or [])
    for arch in archs or [None]:
        for family in candidates:
            if family.accepts(arch):
                return family
    accepted = sorted({a for f in candidates for a in f.architectures})
    what = (
        "no sequence-classification head"
        if all(a.endswith(_CLASSIFIER) for a in accepted)
        else "an architecture mechir does not load"
    )
    raise UnsupportedModelError(
        f"{source}: checkpoint architecture {archs} has {what} (mechir loads {model_type!r} as "
        f"{', '.join(accepted)}); mechir loads {SUPPORTED}"
    )
