"""Tiny random cross-encoders of every supported family, saved with a tokenizer of its kind.

Each family gets a ``*ForSequenceClassification`` built from its ``transformers`` config class and
a tokenizer built offline with the ``tokenizers`` library (WordPiece for BERT/ELECTRA/DistilBERT,
byte-level BPE for RoBERTa, Unigram for XLM-RoBERTa) wrapped in ``PreTrainedTokenizerFast``.
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


@dataclass(frozen=True)
class FamilySpec:
    """How to build one family's tiny checkpoint."""

    name: str
    model_class: str
    tokenizer: Callable[[], PreTrainedTokenizerFast]
    config: Callable[[int, int], Any]  #: (vocabulary size, max input length) -> config
    has_token_types: bool
    middle_seps: int


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
    )
}
FAMILY_NAMES = tuple(SPECS)


def save_tiny_family(
    name: str, directory: Path, *, num_labels: int = 1, seed: int = 0, max_length: int = MAX_LENGTH
) -> Path:
    """Build a random tiny ``name`` cross-encoder and save model + tokenizer to ``directory``."""
    spec = SPECS[name]
    tok = spec.tokenizer()
    config = spec.config(len(tok), max_length)
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


def save_tiny_decoder(name: str, directory: Path, *, seed: int = 0) -> Path:
    """Build a random tiny decoder reranker ``name`` and save model + tokenizer to ``directory``."""
    spec = DECODER_SPECS[name]
    tok = spec.tokenizer()
    config = spec.config(len(tok))
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


def load_hf_decoder(name: str, directory: Path) -> Any:
    """The saved decoder as Hugging Face runs it (eager attention, eval mode)."""
    cls = getattr(transformers, DECODER_SPECS[name].model_class)
    return cls.from_pretrained(directory, attn_implementation="eager").eval()
