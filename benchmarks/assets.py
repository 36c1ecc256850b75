"""The real model and collection the benchmarks run on: ``../shared``'s SciFact cross-encoder and
quick set where present (the project's machines), else their embedded demo copies (a user's machine
or the GPU machine, which get no ``../shared``): the same model stored in compact block codes
(every score within 1e-3 of the float32 model's) and the same 1,000 pairs. A result JSON records
which one ran."""

from __future__ import annotations

from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SHARED_MODEL = ROOT.parent / "shared" / "models" / "minilm-l6-ce-scifact"
SCIFACT = ROOT.parent / "shared" / "data" / "scifact"


def default_model() -> str:
    """The shared model's directory, or ``"demo"`` without ``../shared``."""
    return str(SHARED_MODEL) if SHARED_MODEL.exists() else "demo"


def quick_set() -> Any:
    """The SciFact quick set (50 claims x BM25 top-20) from ``../shared``, or the demo's copy."""
    from mechir.data import load_collection

    return load_collection(SCIFACT, split="quick") if SCIFACT.exists() else load_collection("demo")


def hf_model(name: str, attn_implementation: str = "eager") -> Any:
    """The same checkpoint as a Hugging Face model in float32 with eager attention (the oracle;
    ``attn_implementation="sdpa"``: PyTorch's fused attention): the sequence classifier, or for
    a MonoT5 checkpoint ``T5ForConditionalGeneration``."""
    import torch
    import transformers

    from mechir.demo import resolve_model

    path = resolve_model(name)
    architectures = transformers.AutoConfig.from_pretrained(path).architectures or []
    cls = (
        transformers.T5ForConditionalGeneration
        if "T5ForConditionalGeneration" in architectures
        else transformers.AutoModelForSequenceClassification
    )
    return cls.from_pretrained(path, attn_implementation=attn_implementation, dtype=torch.float32)


#: Random checkpoints of real rerankers' shapes (the weights do not change the speed), for
#: families whose weights are not on this machine: ``bench_scoring.py --shape NAME``.
SHAPES: dict[str, dict[str, Any]] = {
    # mixedbread-ai/mxbai-rerank-base-v1 (DeBERTa-v3-base); vocabulary: the tokenizer's below
    "deberta-v3-base": dict(
        model_type="deberta-v2", hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
        intermediate_size=3072, max_position_embeddings=512, relative_attention=True,
        position_buckets=256, norm_rel_ebd="layer_norm", share_att_key=True,
        pos_att_type=["p2c", "c2p"], position_biased_input=False, type_vocab_size=0,
        layer_norm_eps=1e-7, pad_token_id=0, num_labels=1,
        architectures=["DebertaV2ForSequenceClassification"],
    ),
    # castorini/monot5-base-msmarco (T5 v1.0 base: ReLU FFN, tied embeddings)
    "monot5-base": dict(
        model_type="t5", d_model=768, d_kv=64, d_ff=3072, num_layers=12, num_decoder_layers=12,
        num_heads=12, relative_attention_num_buckets=32, relative_attention_max_distance=128,
        feed_forward_proj="relu", tie_word_embeddings=True, decoder_start_token_id=0,
        pad_token_id=0, eos_token_id=1, dropout_rate=0.0,
        architectures=["T5ForConditionalGeneration"],
    ),
}  # fmt: skip


def random_checkpoint(shape: str, directory: Path, seed: int = 0) -> Path:
    """A random checkpoint of ``SHAPES[shape]`` saved to ``directory``, with a SentencePiece
    tokenizer of the family's class (DeBERTa-v3's, or T5's with MonoT5's prompt words) whose
    pieces are the quick set's words (so inputs are about as long as with the real tokenizer)."""
    import torch
    import transformers

    settings = dict(SHAPES[shape])
    col = quick_set()
    texts = [*col.queries.values(), *(p.document for p in col.candidates(depth=20))]
    t5 = settings["model_type"] == "t5"  # T5's tokenizer keeps the case
    words = sorted({w for t in texts for w in (t if t5 else t.lower()).split()})
    chars = sorted({c for w in words for c in w})
    pieces = [(f"\u2581{w}", -1.0) for w in words] + [(c, -10.0) for c in [*chars, "\u2581"]]
    if t5:  # <pad> 0, </s> 1, <unk> 2 as T5's; the prompt's words
        prompt = {f"\u2581{w}" for w in ("Query", "Document", "Relevant", "true", "false")} | {":"}
        vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
        vocab += [(w, -1.0) for w in sorted(prompt)] + [p for p in pieces if p[0] not in prompt]
        tokenizer = transformers.T5TokenizerFast(vocab=vocab, extra_ids=0)
    else:
        vocab = [(t, 0.0) for t in ("[PAD]", "[CLS]", "[SEP]", "[UNK]", "[MASK]")] + pieces
        tokenizer = transformers.DebertaV2Tokenizer(vocab=vocab, do_lower_case=True, unk_id=3)
    config = transformers.AutoConfig.for_model(settings.pop("model_type"), **settings)
    config.vocab_size = len(tokenizer)
    torch.manual_seed(seed)
    model = getattr(transformers, config.architectures[0])(config)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return Path(directory)
