# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 6. BERT and an LLM reranker side by side
#
# mechir runs the same experiments on every family it loads: a BERT-style cross-encoder
# (`HookedEncoder`) and a decoder LLM reranker (`HookedTransformer`) take the same hook
# factories, read the same parts and return scores of the same shape. This tutorial runs two
# experiments on both, with one loop:
#
# * **direction ablation**: the document no longer reads the query (DOCUMENT -> QUERY removed in
#   all layers);
# * **head knockout**: each head of layer 0 zeroed in turn.
#
# The BERT model is the embedded demo (`"demo"`, MiniLM fine-tuned on SciFact). The LLM is a
# **Qwen3 yes/no reranker** (the architecture of `Qwen/Qwen3-Reranker-0.6B`): set `MECHIR_LLM` to
# a checkpoint directory or hub id to use a real one. By default, offline, the tutorial builds a
# **tiny random** Qwen3 (2 layers, 4 query heads sharing 2 key/value heads) with a byte-level BPE
# tokenizer trained on the spot. Its weights are random, so **its numbers mean nothing**: they
# only show that the experiment runs and what it returns.

# %%
import os
import tempfile

import matplotlib.pyplot as plt
import numpy as np
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from tokenizers.trainers import BpeTrainer

import mechir
from mechir.data import load_collection
from mechir.hooks import direction_ablation_hooks, head_knockout_hooks
from mechir.models.decoder import DEFAULT_INSTRUCTION, QWEN3_RERANKER_TEMPLATE

MODEL = os.environ.get("MECHIR_MODEL", "demo")
LLM = os.environ.get("MECHIR_LLM")  # None: build a tiny random Qwen3 reranker
N_PAIRS = 8

collection = load_collection(os.environ.get("MECHIR_DATASET", "demo"), split="quick")
pairs = collection.candidates(depth=2)[:N_PAIRS]
# documents cut to 400 characters: short prompts keep the LLM's part of the run quick on a CPU
queries, documents = [p.query for p in pairs], [p.document[:400] for p in pairs]

# %% [markdown]
# ## A tiny Qwen3 reranker, offline
#
# Qwen3-Reranker reads a chat prompt (system turn, `<Instruct>`, `<Query>`, `<Document>`, and an
# assistant turn with an empty think block) and scores `logit("yes") - logit("no")` of the next
# token. Its tokenizer therefore needs the chat special tokens and single tokens `yes` and `no`:
# we train a byte-level BPE on the template and the collection's text. The model is a
# `Qwen3ForCausalLM` with QK-norm, grouped-query attention and tied embeddings, saved next to its
# tokenizer and loaded like any checkpoint with `mechir.load_cross_encoder(directory)`.


# %%
def tiny_qwen3_reranker(directory: str) -> str:
    """Save a random 2-layer Qwen3 yes/no reranker and its tokenizer to ``directory``."""
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.post_processor = processors.ByteLevel(trim_offsets=False)
    template = QWEN3_RERANKER_TEMPLATE.replace("{", "").replace("}", "")
    text = [template, DEFAULT_INSTRUCTION, *queries, *documents] + ["yes no"] * 200
    trainer = BpeTrainer(
        vocab_size=500,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(text, trainer)
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        pad_token="<|endoftext|>",
        eos_token="<|im_end|>",
        additional_special_tokens=specials[1:],
    )
    config = transformers.Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # GQA: two query heads share each key/value head
        head_dim=8,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        rope_theta=1000.0,
        initializer_range=0.1,
        architectures=["Qwen3ForCausalLM"],
    )
    torch.manual_seed(0)
    transformers.Qwen3ForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


if LLM is None:
    LLM = tiny_qwen3_reranker(tempfile.mkdtemp(prefix="tiny-qwen3-"))

bert = mechir.load_cross_encoder(MODEL, device="cpu")
llm = mechir.load_cross_encoder(LLM, device="cpu")
rerankers = {"BERT (demo)": bert, "Qwen3 LLM": llm}
# the LLM's template and instruction take ~150 tokens with the tiny BPE (fewer with Qwen's)
max_lengths = {"BERT (demo)": 160, "Qwen3 LLM": 400}
for name, model in rerankers.items():
    cfg = model.cfg
    kv = getattr(cfg, "n_key_value_heads", None) or cfg.n_heads
    print(f"{name}: {type(model).__name__}, {cfg.n_layers} layers x {cfg.n_heads} heads", end="")
    print(f" ({kv} key/value heads), causal: {cfg.attention_dir == 'causal'}")

# %% [markdown]
# ## The parts of one pair
#
# Both encode `(query, document)` pairs into a batch whose `parts` label every token. BERT reads
# `[CLS] query [SEP] document [SEP]`: CLS | QUERY | SEP1 | DOCUMENT | SEP2. The LLM reads a filled
# template: its template text takes the same three part ids by position, under the names
# **prefix** (CLS: before the query), **middle** (SEP1: between query and document) and
# **suffix** (SEP2: after the document), and the instruction is a part of its own, INSTRUCTION.
# So `"prefix"` and `"cls"` name the same part and every study reads five parts on every family.
# The prefix comes in two runs here, the system turn before the instruction and `<Query>:` after
# it; a part is a set of tokens, not necessarily one span.

# %%
batches = {
    name: model.encode(queries, documents, max_length=max_lengths[name])
    for name, model in rerankers.items()
}


TEMPLATE_NAMES = {mechir.Part.CLS: "prefix", mechir.Part.SEP1: "middle", mechir.Part.SEP2: "suffix"}


def runs_of_parts(model, batch, row: int = 0) -> list[tuple[str, int, str]]:
    """(part, number of tokens, their text) of each run of one part in ``row``; the LLM's
    template parts under their template names ("prefix (CLS)")."""
    ids, parts = batch.input_ids[row].tolist(), batch.parts[row].tolist()
    out: list[tuple[str, int, str]] = []
    start = 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or parts[i] != parts[start]:
            if parts[start] != mechir.Part.PAD:
                part = mechir.Part(parts[start])
                label = part.name
                if model is llm and part in TEMPLATE_NAMES:
                    label = f"{TEMPLATE_NAMES[part]} ({part.name})"
                out.append((label, i - start, model.tokenizer.decode(ids[start:i])))
            start = i
    return out


for name, model in rerankers.items():
    print(f"--- {name}")
    for part, n, text in runs_of_parts(model, batches[name]):
        shown = text if len(text) < 60 else text[:30] + " ... " + text[-20:]
        print(f"{part:>14} {n:4d} tokens  {shown!r}")

# %% [markdown]
# ## The same experiments on both
#
# The hook factories take any loaded reranker. Each condition is scored on the same pairs as the
# unablated model and we keep the mean score change (BERT's score is its logit; the LLM's is
# `logit(yes) - logit(no)`).

# %%
clean = {name: model.score(batches[name]) for name, model in rerankers.items()}


def change(name: str, hooks) -> float:
    """Mean score change of reranker ``name``'s pairs under ``hooks``."""
    scores = rerankers[name].score(batches[name], hooks=hooks)
    return (scores - clean[name]).mean().item()


doc_to_query = {
    name: change(name, direction_ablation_hooks(model, attending="document", attended="query"))
    for name, model in rerankers.items()
}
head_effects = {
    name: [change(name, head_knockout_hooks(model, (0, h))) for h in range(model.cfg.n_heads)]
    for name, model in rerankers.items()
}
layer0 = {
    name: change(name, head_knockout_hooks(model, layers=[0])) for name, model in rerankers.items()
}
for name in rerankers:
    print(f"{name}: D->Q removed {doc_to_query[name]:+.3f}, all of layer 0 {layer0[name]:+.3f}")

# %% [markdown]
# ## What a causal model cannot ablate
#
# In BERT every token reads every other one, so QUERY -> DOCUMENT (the query reading the
# document) is one of the 25 directions of tutorial 2. In a causal LLM a token reads only the
# tokens before it, and the prompt puts the query first: the query never reads the document, so
# there is nothing to remove. mechir refuses that direction with a one-line `ValueError` instead
# of returning hooks that silently change nothing:

# %%
bert_hooks = direction_ablation_hooks(bert, attending="query", attended="document")
print(f"BERT, Q->D removed: mean score change {change('BERT (demo)', bert_hooks):+.3f}")
try:
    direction_ablation_hooks(llm, attending="query", attended="document")
except ValueError as error:
    print("LLM: ValueError:", error)
else:
    raise AssertionError("a causal model should refuse QUERY->DOCUMENT")

# %% [markdown]
# ## Side by side
#
# What differs between the two families, and what to keep in mind reading the plot:
#
# * **Causal attention.** In the LLM the document reads the query (it comes after it) but not the
#   other way round, and the score is read at the **last** token (the end of the suffix), which
#   reads everything; in BERT the score is read at `[CLS]`, which reads in both directions from
#   layer 0 on.
# * **Template parts.** The LLM's prefix, middle and suffix are dozens of template tokens (the
#   system prompt, `<Query>:`, the assistant turn), not one special token each: ablations that
#   involve them remove much more attention than BERT's `[CLS]`/`[SEP]` columns.
# * **GQA.** The LLM's 4 query heads share 2 key/value heads. Head knockout acts on `hook_z`, the
#   output of each *query* head, so every one of the 4 can be knocked out on its own (a key or
#   value head is shared by two query heads).
# * **Scales.** The tiny LLM is random: its scores and changes are noise around 0 and mean
#   nothing; with `MECHIR_LLM` pointing at a trained reranker the same code measures a real one.

# %%
fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), layout="constrained")
for ax, (name, model) in zip(axes, rerankers.items()):
    labels = ["D->Q removed", "layer 0 out"]
    labels += [f"L0H{h}" for h in range(model.cfg.n_heads)]
    values = np.array([doc_to_query[name], layer0[name], *head_effects[name]])
    colours = ["tab:orange", "tab:green"] + ["tab:blue"] * model.cfg.n_heads
    ax.bar(range(len(values)), values, color=colours)
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.set_xticks(range(len(values)), labels, rotation=60, fontsize=8)
    ax.set_ylabel("mean score change")
    ax.set_title(f"{name}: {model.cfg.n_layers} layers x {model.cfg.n_heads} heads")
fig.suptitle("D->Q removed in all layers (orange), all heads of layer 0 (green), one head (blue)")
plt.show()
