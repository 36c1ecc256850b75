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
# # 3. Activation patching: which heads carry an added query term?
#
# A follow-up experiment in the style of "Axiomatic Causal Interventions for Reverse Engineering
# Relevance Computation in Neural Retrieval Models". The TFC1 diagnostic says: adding one more
# occurrence of a query term to a document should raise its score. We build pairs
#
# - **clean**: the document with a query term appended,
# - **corrupted**: the document with as many filler tokens appended (same length, same positions),
#
# run both, and patch the clean activation of one head into the corrupted run at a time. The
# metric `(patched - corrupted) / (clean - corrupted)` says how much of the score gain that head
# alone restores (1 = all of it). Then **path patching** asks which earlier heads feed the head we
# found.

# %%
import os

import matplotlib.pyplot as plt

import mechir
from mechir.data import load_collection
from patching import PairBuilder, head_target, patch_sweep, path_patch, plot_heatmap

MODEL = os.environ.get("MECHIR_MODEL", "demo")
DATASET = os.environ.get("MECHIR_DATASET", "demo")
MAX_LENGTH = 96  # short inputs keep this tutorial fast on a CPU

model = mechir.load_cross_encoder(MODEL, device="cpu")
collection = load_collection(DATASET, split=os.environ.get("MECHIR_SPLIT", "quick"))
candidates = collection.candidates(depth=2, query_ids=collection.query_ids(3))

# %% [markdown]
# ## Perturbed pairs
#
# `PairBuilder` makes aligned clean/corrupted token sequences for one tokenizer. With
# `choose="first"` it appends the first content word of the query (words the analyzer keeps,
# no stopwords or bare numbers); documents are cut to fit `max_length` so that the appended span
# is never truncated away. `qrels` gives each pair its relevance grade.

# %%
builder = PairBuilder(model.tokenizer, max_length=MAX_LENGTH, choose="first")
built = builder.build(candidates, "tfc1", qrels=collection.qrels, errors="skip")
pairs = built.batch(model.tokenizer)
print(pairs)
first = built.pairs[0]
print("term added to the first pair:", first.info["term"])
print("clean tail:    ", model.tokenizer.decode(list(first.clean_ids[-8:])))
print("corrupted tail:", model.tokenizer.decode(list(first.corrupted_ids[-8:])))

# %% [markdown]
# ## Sweep every head
#
# `head_target()` patches each head's `hook_z` (all positions) per layer x head. `patch_sweep`
# runs many patched cells per forward pass and returns a `PatchingResult`; `to_frame()` gives a
# tidy table (one row per pair and cell); `result.heatmap()` gives the mean metric as a grid
# (overall, or of one relevance grade) and `plot_heatmap` draws it on any matplotlib axes.
# (`plot_patching(result)` draws all grades at once on a pyplot-free `Figure`, for `savefig`; in a
# notebook, end the cell with that figure to see it, since `plt.show()` does not know it.)

# %%
result = patch_sweep(model, pairs, head_target(), progress=False)
print(result.clean - result.corrupted)  # the score gain from the added term, per pair
fig, axes = plt.subplots(1, 2, figsize=(11, 3.5), layout="constrained")
plot_heatmap(result.heatmap(), ax=axes[0])
plot_heatmap(result.heatmap(grade=1), ax=axes[1])
plt.show()

# %%
table = result.to_frame()
by_head = table.groupby(["layer", "head"])["value"].mean().sort_values(ascending=False)
print(by_head.head(5))
layer, head = by_head.index[0]
found = f"{layer}/{head}"
print("strongest head:", found)

# %% [markdown]
# ## Path patching from the found head
#
# Patching a head's output restores everything downstream of it. Path patching isolates *direct*
# paths: each sender head's clean output is patched, all other heads are frozen at their corrupted
# values, and only the receiver's inputs (here its query, key and value inputs) see the change.
# Senders are every head in earlier layers. If the found head sits in layer 0 there is nothing
# upstream; we then take the strongest head in a later layer.

# %%
if layer == 0:
    later = by_head[by_head.index.get_level_values("layer") > 0]
    layer, head = later.index[0]
    found = f"{layer}/{head}"
path = path_patch(model, pairs, [found], channels=("q", "k", "v"))
print(path.to_frame().groupby(["layer", "head"])["value"].mean().nlargest(3))
fig, ax = plt.subplots(figsize=(6, 3.5), layout="constrained")
plot_heatmap(path.heatmap(), ax=ax)
plt.show()
