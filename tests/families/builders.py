"""Tiny random cross-encoders of every supported family, saved with a tokenizer of its kind.

Each family gets a ``*ForSequenceClassification`` built from its ``transformers`` config class and
a tokenizer built offline with the ``tokenizers`` library (WordPiece for BERT/ELECTRA/DistilBERT,
byte-level BPE for RoBERTa, Unigram for XLM-RoBERTa) wrapped in ``PreTrainedTokenizerFast``.

**Selection by declaration.** Every builder names the ``transformers`` class it saves, and that
class names its registry entry (:data:`mechir.models.FAMILIES`), so a builder's
:class:`~mechir.models.Family` is looked up, never written down. Tests that need "every family
with edges" or "every causal family" select builders with :func:`tiny_names` by what the registry
entry declares (``edge_circuits``, ``kind``; :func:`pre_ln` reads an encoder family's
``SPEC.blocks``), not by name lists. Adding a family is its file, its registry entry and one
builder here; ``tests/families/test_builders.py`` fails while a registered family has none.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers.trainers import BpeTrainer, UnigramTrainer
from transformers import PreTrainedTokenizerFast

from mechir.models.registry import FAMILIES, Family
from tests.helpers import DOCUMENTS, QUERIES, WORDS

D_MODEL, N_HEADS, N_LAYERS, MAX_LENGTH = 32, 4, 2, 64
CORPUS = [" ".join(WORDS), *QUERIES, *DOCUMENTS] * 3


def wordpiece_tokenizer(*, token_types: bool = True) -> PreTrainedTokenizerFast:
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, "##s", "##ing", "?", ".", ","]
    tok = Tokenizer(models.WordPiece({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", 2), ("[SEP]", 3)],
    )
    names = ["input_ids", "token_type_ids", "attention_mask"] if token_types else None
    return _wrap(tok, "[CLS]", "[SEP]", "[PAD]", "[UNK]", "[MASK]", names or _NO_TYPES)


_NO_TYPES = ["input_ids", "attention_mask"]
_ROBERTA_SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]


def byte_level_bpe_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(
        vocab_size=300,
        special_tokens=_ROBERTA_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    return _wrap(tok, "<s>", "</s>", "<pad>", "<unk>", "<mask>", _NO_TYPES)


def unigram_tokenizer() -> PreTrainedTokenizerFast:
    """SentencePiece-style Unigram (Metaspace), XLM-R's special-token ids 0-3."""
    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = UnigramTrainer(
        vocab_size=120, special_tokens=_ROBERTA_SPECIALS, unk_token="<unk>", show_progress=False
    )
    tok.train_from_iterator(CORPUS, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>",
        pair="<s> $A </s> </s> $B </s>",
        special_tokens=[("<s>", 0), ("</s>", 2)],
    )
    return _wrap(tok, "<s>", "</s>", "<pad>", "<unk>", "<mask>", _NO_TYPES)


def deberta_v2_tokenizer() -> Any:
    """DeBERTa-v3's own tokenizer class (``DebertaV2Tokenizer``, SentencePiece Unigram) over a
    hand-made vocabulary: DeBERTa-v3's special-token ids ([PAD] 0, [CLS] 1, [SEP] 2, [UNK] 3),
    then ``"▁word"`` for every word of ``WORDS`` (a whole-word piece wins) and single characters
    (any other word is split into them)."""
    specials = ["[PAD]", "[CLS]", "[SEP]", "[UNK]", "[MASK]"]
    chars = sorted(set("".join(CORPUS).lower()) - {" "}) + ["▁"]
    vocab = [(t, 0.0) for t in specials] + [(f"▁{w}", -1.0) for w in WORDS]
    vocab += [(c, -10.0) for c in chars]
    return transformers.DebertaV2Tokenizer(vocab=vocab, do_lower_case=True, unk_id=3)


def _wrap(tok, cls, sep, pad, unk, mask, input_names) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        cls_token=cls,
        sep_token=sep,
        pad_token=pad,
        unk_token=unk,
        mask_token=mask,
        bos_token=cls,
        eos_token=sep,
        model_input_names=input_names,
    )


def _bert_like(config_class: str, vocab: int, **extra: Any) -> Any:
    return getattr(transformers, config_class)(
        vocab_size=vocab,
        hidden_size=D_MODEL,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=N_HEADS,
        intermediate_size=4 * D_MODEL,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        initializer_range=0.3,
        **extra,
    )


def _roberta_like(config_class: str, vocab: int, max_length: int) -> Any:
    return _bert_like(
        config_class,
        vocab,
        max_position_embeddings=max_length + 2,  # + padding_idx + 1
        type_vocab_size=1,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        layer_norm_eps=1e-5,
    )


def _modernbert(vocab: int, max_length: int, *, pooling: str, local_attention: int = 4) -> Any:
    """Global attention in layers 0, 2, ...; local layers see ``|i - j| <= local_attention // 2``
    (windows shorter than the inputs); biases everywhere except the norms (``norm_bias=False``)."""
    return transformers.ModernBertConfig(
        vocab_size=vocab,
        hidden_size=D_MODEL,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=N_HEADS,
        intermediate_size=4 * D_MODEL,
        max_position_embeddings=max_length,
        global_attn_every_n_layers=2,
        local_attention=local_attention,
        attention_bias=True,
        mlp_bias=True,
        norm_bias=False,
        classifier_bias=True,
        classifier_pooling=pooling,
        pad_token_id=0,
        cls_token_id=2,
        sep_token_id=3,
        bos_token_id=2,
        eos_token_id=3,
        initializer_range=0.3,
        embedding_dropout=0.0,
        attention_dropout=0.0,
        mlp_dropout=0.0,
        classifier_dropout=0.0,
    )


def _deberta(version: int, vocab: int, max_length: int, **extra: Any) -> Any:
    """DeBERTa-v3's settings by default (relative attention with c2p and p2c, log buckets,
    shared position keys, a layer-normed relative table, no absolute positions, no token types);
    8 buckets so that the log buckets and the clamp at the table's edges apply to the inputs."""
    settings: dict[str, Any] = dict(
        vocab_size=vocab,
        hidden_size=D_MODEL,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=N_HEADS,
        intermediate_size=4 * D_MODEL,
        max_position_embeddings=max_length,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        pooler_dropout=0.0,
        initializer_range=0.3,
        relative_attention=True,
        pos_att_type=["p2c", "c2p"],
        position_biased_input=False,
        type_vocab_size=0,
        pad_token_id=0,
    )
    if version == 2:
        settings.update(
            position_buckets=8, max_relative_positions=-1, share_att_key=True,
            norm_rel_ebd="layer_norm",
        )  # fmt: skip
        settings.update(extra)
        return transformers.DebertaV2Config(**settings)
    settings.update(max_relative_positions=6)  # DeBERTa-v1: no buckets; clamped beyond 6
    settings.update(extra)
    return transformers.DebertaConfig(**settings)


@dataclass(frozen=True)
class FamilySpec:
    """How to build one family's tiny checkpoint."""

    name: str
    model_class: str
    tokenizer: Callable[[], PreTrainedTokenizerFast]
    config: Callable[[int, int], Any]  #: (vocabulary size, max input length) -> config
    has_token_types: bool
    middle_seps: int

    @property
    def family(self) -> Family:
        """The registry entry that loads :attr:`model_class`."""
        return registered_family(self.model_class)


SPECS: dict[str, FamilySpec] = {
    spec.name: spec
    for spec in (
        FamilySpec(
            "bert",
            "BertForSequenceClassification",
            wordpiece_tokenizer,
            lambda v, n: _bert_like("BertConfig", v, max_position_embeddings=n),
            True,
            1,
        ),
        FamilySpec(
            "electra",
            "ElectraForSequenceClassification",
            wordpiece_tokenizer,
            lambda v, n: _bert_like(
                "ElectraConfig", v, max_position_embeddings=n, embedding_size=16
            ),
            True,
            1,
        ),
        FamilySpec(
            "roberta",
            "RobertaForSequenceClassification",
            byte_level_bpe_tokenizer,
            lambda v, n: _roberta_like("RobertaConfig", v, n),
            False,
            2,
        ),
        FamilySpec(
            "xlm-roberta",
            "XLMRobertaForSequenceClassification",
            unigram_tokenizer,
            lambda v, n: _roberta_like("XLMRobertaConfig", v, n),
            False,
            2,
        ),
        FamilySpec(
            "distilbert",
            "DistilBertForSequenceClassification",
            lambda: wordpiece_tokenizer(token_types=False),
            lambda v, n: transformers.DistilBertConfig(
                vocab_size=v,
                dim=D_MODEL,
                n_layers=N_LAYERS,
                n_heads=N_HEADS,
                hidden_dim=4 * D_MODEL,
                max_position_embeddings=n,
                dropout=0.0,
                attention_dropout=0.0,
                seq_classif_dropout=0.0,
                initializer_range=0.3,
            ),
            False,
            1,
        ),
        FamilySpec(
            "modernbert",
            "ModernBertForSequenceClassification",
            lambda: wordpiece_tokenizer(token_types=False),
            lambda v, n: _modernbert(v, n, pooling="mean"),
            False,
            1,
        ),
        FamilySpec(
            "modernbert-cls",
            "ModernBertForSequenceClassification",
            lambda: wordpiece_tokenizer(token_types=False),
            # [CLS] pooling: a wider window (|i - j| <= 8), so the last (local) layer's [CLS]
            # still reads document tokens and an ablation in layer 0 reaches the score
            lambda v, n: _modernbert(v, n, pooling="cls", local_attention=16),
            False,
            1,
        ),
        FamilySpec(
            "deberta-v2",
            "DebertaV2ForSequenceClassification",
            deberta_v2_tokenizer,
            lambda v, n: _deberta(2, v, n),
            True,
            1,
        ),
        FamilySpec(
            "deberta",
            "DebertaForSequenceClassification",
            wordpiece_tokenizer,
            lambda v, n: _deberta(1, v, n),
            True,
            1,
        ),
    )
}
FAMILY_NAMES = tuple(SPECS)


def save_tiny_family(
    name: str,
    directory: Path,
    *,
    num_labels: int = 1,
    seed: int = 0,
    max_length: int = MAX_LENGTH,
    **config_overrides: Any,
) -> Path:
    """Build a random tiny ``name`` cross-encoder and save model + tokenizer to ``directory``
    (``config_overrides``: config attributes to change, e.g. another variant of the family)."""
    spec = SPECS[name]
    tok = spec.tokenizer()
    config = spec.config(len(tok), max_length)
    for key, value in config_overrides.items():
        setattr(config, key, value)
    config.num_labels = num_labels
    config.architectures = [spec.model_class]
    torch.manual_seed(seed)
    model = getattr(transformers, spec.model_class)(config)
    with torch.no_grad():  # non-trivial LayerNorm and bias parameters, so none of them is idle
        for pname, p in model.named_parameters():
            if "LayerNorm.weight" in pname or pname.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif pname.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return Path(directory)


def load_hf(name: str, directory: Path) -> Any:
    """The saved checkpoint as Hugging Face runs it (eager attention, eval mode)."""
    cls = getattr(transformers, SPECS[name].model_class)
    return cls.from_pretrained(directory, attn_implementation="eager").eval()


# ------------------------------------------------------------------ MonoT5 (encoder-decoder)
T5_WORDS = (*WORDS, "true", "false", "yes", "no", "Query", "Document", "Relevant")


def t5_tokenizer() -> Any:
    """A SentencePiece-style Unigram tokenizer in T5's layout (``<pad>`` 0, ``</s>`` 1, ``<unk>``
    2; Metaspace pieces; ``</s>`` appended), wrapped in ``T5TokenizerFast``: every word of
    :data:`T5_WORDS` ("true", "false", the template's words) is one piece ``▁word``, anything else
    falls back to characters."""
    import string

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -3.0)]
    vocab += [("▁" + w, -5.0) for w in T5_WORDS]
    vocab += [(c, -8.0) for c in string.ascii_letters + string.digits + ":?.,!'-"]
    vocab += [("s", -6.0), ("ing", -6.0)]
    return transformers.T5TokenizerFast(vocab=vocab, extra_ids=0)


def tiny_t5_config(vocab: int, *, gated: bool = False, n_layers: int = N_LAYERS) -> Any:
    """T5 v1.0 (ReLU FFN, tied embeddings, outputs scaled by d_model^-0.5) or, with ``gated``,
    v1.1 (gated GELU, untied, unscaled); ``d_kv * num_heads != d_model`` and few buckets with a
    short ``max_distance``, so the logarithmic buckets are exercised."""
    return transformers.T5Config(
        vocab_size=vocab,
        d_model=D_MODEL,
        d_kv=6,
        d_ff=4 * D_MODEL,
        num_layers=n_layers,
        num_heads=N_HEADS,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=12,
        dropout_rate=0.0,
        feed_forward_proj="gated-gelu" if gated else "relu",
        tie_word_embeddings=not gated,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
        initializer_factor=1.0,
        architectures=["T5ForConditionalGeneration"],
    )


def save_tiny_t5(directory: Path, *, gated: bool = False, seed: int = 0) -> Path:
    """A random tiny MonoT5 (``T5ForConditionalGeneration``) with :func:`t5_tokenizer`, saved to
    ``directory``; non-trivial norm weights, and for ``gated`` an ``lm_head`` of its own."""
    tok = t5_tokenizer()
    torch.manual_seed(seed)
    model = transformers.T5ForConditionalGeneration(tiny_t5_config(len(tok), gated=gated))
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("layer_norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
        if gated:
            model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.shared.weight))
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return Path(directory)


# ---------------------------------------------------------------------- decoder LLM rerankers
#: Chat special tokens of Qwen's tokenizer (the Qwen3-Reranker template writes them).
CHAT_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]


def chat_bpe_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE (Qwen-like: no BOS, ``<|endoftext|>`` pads) with the chat special tokens,
    trained on the test words and the Qwen3-Reranker template, so "yes"/"no" are single tokens."""
    from mechir.models.decoder import DEFAULT_INSTRUCTION, QWEN3_RERANKER_TEMPLATE

    template = QWEN3_RERANKER_TEMPLATE.replace("{", "").replace("}", "")
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(
        vocab_size=480,
        special_tokens=CHAT_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([*CORPUS, template, DEFAULT_INSTRUCTION, *["yes no"] * 20] * 2, trainer)
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<|endoftext|>",
        eos_token="<|im_end|>",
        additional_special_tokens=CHAT_SPECIALS[1:],
    )


def llama_bpe_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE with Llama's ``<s>``/``</s>`` (BOS/EOS) and ``<unk>`` as padding."""
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(
        vocab_size=330,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([*CORPUS, "query: document:"] * 2, trainer)
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        pad_token="<unk>",
    )  # fmt: skip


def _decoder_config(config_class: str, vocab: int, **extra: Any) -> Any:
    """Two layers, 4 query heads of width 8 sharing 2 key/value heads (GQA), rotary positions."""
    kwargs = dict(
        vocab_size=vocab,
        hidden_size=D_MODEL,
        intermediate_size=2 * D_MODEL,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=N_HEADS,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
        initializer_range=0.1,  # pre-norm residuals grow: keep float32 rounding below 1e-6
        attention_dropout=0.0,
    )
    return getattr(transformers, config_class)(**(kwargs | extra))


@dataclass(frozen=True)
class DecoderSpec:
    """How to build one tiny decoder reranker."""

    name: str
    model_class: str
    tokenizer: Callable[[], PreTrainedTokenizerFast]
    config: Callable[[int], Any]  #: vocabulary size -> config

    @property
    def family(self) -> Family:
        """The registry entry that loads :attr:`model_class`."""
        return registered_family(self.model_class)


DECODER_SPECS: dict[str, DecoderSpec] = {
    spec.name: spec
    for spec in (
        # Qwen3 yes/no reranker: QK-norm, GQA, tied embeddings (as Qwen3-Reranker-0.6B)
        DecoderSpec(
            "qwen3",
            "Qwen3ForCausalLM",
            chat_bpe_tokenizer,
            lambda v: _decoder_config(
                "Qwen3Config", v, head_dim=8, tie_word_embeddings=True, rope_theta=1000.0
            ),
        ),
        # Qwen2 yes/no reranker: q/k/v biases, untied head
        DecoderSpec(
            "qwen2",
            "Qwen2ForCausalLM",
            chat_bpe_tokenizer,
            lambda v: _decoder_config("Qwen2Config", v, tie_word_embeddings=False),
        ),
        # RankLLaMA-style classifier: LlamaForSequenceClassification, one label
        DecoderSpec(
            "llama-seqcls",
            "LlamaForSequenceClassification",
            llama_bpe_tokenizer,
            lambda v: _decoder_config(
                "LlamaConfig", v, pad_token_id=0, bos_token_id=1, eos_token_id=2, num_labels=1
            ),
        ),
        # Mistral with a sliding window shorter than the prompts (Mistral-7B-v0.1's setting)
        DecoderSpec(
            "mistral",
            "MistralForCausalLM",
            chat_bpe_tokenizer,
            lambda v: _decoder_config("MistralConfig", v, sliding_window=24),
        ),
    )
}


def _pad_is_eos(make: Callable[[], PreTrainedTokenizerFast]) -> Callable[[], Any]:
    def tokenizer() -> PreTrainedTokenizerFast:
        tok = make()
        tok.pad_token = tok.eos_token
        return tok

    return tokenizer


#: ``*ForSequenceClassification`` decoders whose pad token is their EOS (a common fine-tuning
#: setting) under RankLLaMA's template, which ends every prompt with the EOS: Hugging Face pools
#: the token before it. Both tokenizers have their EOS at id 2. ``llama-seqcls-no-pad`` has no pad
#: token at all (Hugging Face then pools the last position of an example alone).
PAD_EOS_CLASSIFIER_SPECS: dict[str, DecoderSpec] = {
    spec.name: spec
    for spec in (
        DecoderSpec(
            "llama-seqcls-pad-eos",
            "LlamaForSequenceClassification",
            _pad_is_eos(llama_bpe_tokenizer),
            lambda v: _decoder_config(
                "LlamaConfig", v, pad_token_id=2, bos_token_id=1, eos_token_id=2, num_labels=1
            ),
        ),
        DecoderSpec(
            "qwen3-seqcls-pad-eos",
            "Qwen3ForSequenceClassification",
            _pad_is_eos(chat_bpe_tokenizer),
            lambda v: _decoder_config(
                "Qwen3Config", v, head_dim=8, pad_token_id=2, eos_token_id=2, num_labels=1
            ),
        ),
        DecoderSpec(
            "qwen2-seqcls-pad-eos",
            "Qwen2ForSequenceClassification",
            _pad_is_eos(chat_bpe_tokenizer),
            lambda v: _decoder_config(
                "Qwen2Config", v, pad_token_id=2, eos_token_id=2, num_labels=1
            ),
        ),
        DecoderSpec(
            "mistral-seqcls-pad-eos",
            "MistralForSequenceClassification",
            _pad_is_eos(chat_bpe_tokenizer),
            lambda v: _decoder_config(
                "MistralConfig", v, sliding_window=24, pad_token_id=2, eos_token_id=2, num_labels=1
            ),
        ),
        DecoderSpec(
            "llama-seqcls-no-pad",
            "LlamaForSequenceClassification",
            llama_bpe_tokenizer,
            lambda v: _decoder_config(
                "LlamaConfig", v, pad_token_id=None, bos_token_id=1, eos_token_id=2, num_labels=1
            ),
        ),
    )
}


def _decoder_spec(name: str) -> DecoderSpec:
    return DECODER_SPECS.get(name) or PAD_EOS_CLASSIFIER_SPECS[name]


def save_tiny_decoder(name: str, directory: Path, *, seed: int = 0, **config_changes: Any) -> Path:
    """Build a random tiny decoder reranker ``name`` (:data:`DECODER_SPECS` or
    :data:`PAD_EOS_CLASSIFIER_SPECS`; ``config_changes`` set on its config) and save model +
    tokenizer to ``directory``."""
    spec = _decoder_spec(name)
    tok = spec.tokenizer()
    config = spec.config(len(tok))
    for key, value in config_changes.items():
        setattr(config, key, value)
    config.architectures = [spec.model_class]
    torch.manual_seed(seed)
    model = getattr(transformers, spec.model_class)(config)
    with torch.no_grad():  # non-trivial norm weights and biases, so none of them is idle
        for pname, p in model.named_parameters():
            if pname.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif pname.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return Path(directory)


def load_hf_t5(directory: Path) -> Any:
    """The saved MonoT5 as Hugging Face runs it (eager attention, eval mode)."""
    return transformers.T5ForConditionalGeneration.from_pretrained(
        directory, attn_implementation="eager"
    ).eval()


def load_hf_decoder(name: str, directory: Path) -> Any:
    """The saved decoder as Hugging Face runs it (eager attention, eval mode)."""
    cls = getattr(transformers, _decoder_spec(name).model_class)
    return cls.from_pretrained(directory, attn_implementation="eager").eval()


# ---------------------------------------------------------------------- selection by declaration
def registered_family(model_class: str) -> Family:
    """The registry entry loading checkpoints of the ``transformers`` class ``model_class``."""
    for family in FAMILIES:
        if model_class in family.architectures:
            return family
    raise ValueError(f"no registered family loads {model_class}: add its registry entry")


#: Tiny MonoT5 variants (``save_tiny_t5``): v1.0 (ReLU, tied) and v1.1 (gated GELU, untied).
T5_VARIANTS: dict[str, bool] = {"t5-v1.0": False, "t5-v1.1": True}


def tiny_builders() -> dict[str, tuple[Family, Callable[[Path], Path]]]:
    """Every tiny builder by name: its registry family and ``save(directory) -> directory``
    (cross-encoders of :data:`SPECS`, the MonoT5 variants, the decoders of
    :data:`DECODER_SPECS`)."""
    out: dict[str, tuple[Family, Callable[[Path], Path]]] = {}
    for name, spec in SPECS.items():
        out[name] = (spec.family, lambda d, name=name: save_tiny_family(name, d))
    t5 = registered_family("T5ForConditionalGeneration")
    for name, gated in T5_VARIANTS.items():
        out[name] = (t5, lambda d, gated=gated: save_tiny_t5(d, gated=gated))
    for name, spec in DECODER_SPECS.items():
        out[name] = (spec.family, lambda d, name=name: save_tiny_decoder(name, d))
    return out


def tiny_names(where: Callable[[Family], bool] = lambda family: True) -> tuple[str, ...]:
    """Names of the tiny builders whose registry family satisfies ``where``, e.g.
    ``tiny_names(lambda f: f.edge_circuits)`` (every family the edge engine follows) or
    ``tiny_names(lambda f: f.kind == "decoder")`` (every causal family)."""
    return tuple(name for name, (family, _) in tiny_builders().items() if where(family))


def pre_ln(family: Family) -> bool:
    """Whether an encoder family declares pre-LN blocks (its module's ``SPEC.blocks``)."""
    return family.kind == "encoder" and family.implementation().SPEC.blocks == "pre_ln"


def save_tiny(name: str, directory: Path) -> Path:
    """Save the tiny checkpoint of builder ``name`` (:func:`tiny_builders`) to ``directory``."""
    return tiny_builders()[name][1](directory)
