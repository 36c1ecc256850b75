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
# # 4. Neuron attribution and pruning
#
# Which FFN neurons does relevance rest on? **Neuron integrated gradients** attribute the score
# `F(x)` to each neuron `i` of a layer along a straight path from a baseline input `x'` (here: the
# document replaced by `[PAD]` tokens) to `x`:
#
# `A_i = integral_0^1 dF/da_i(x' + t (x - x')) * da_i/dt dt`
#
# (conductance). Every attribution comes with its estimated numerical error, and the input path's
# embedding integral must add up to `F(x) - F(x')` (completeness). Then we **prune**: zero the
# neurons with the largest mean attribution and compare the ranking with random neurons of the
# same per-layer counts.

# %%
import os

import matplotlib.pyplot as plt

import mechir
from mechir.attribution import (
    mean_neuron_attributions,
    neuron_integrated_gradients,
    pair_batches,
    pruning_evaluation,
    top_neurons,
)
from mechir.data import load_collection

MODEL = os.environ.get("MECHIR_MODEL", "demo")
DATASET = os.environ.get("MECHIR_DATASET", "demo")
MAX_LENGTH = 96  # short inputs keep this tutorial fast on a CPU

model = mechir.load_cross_encoder(MODEL, device="cpu")
collection = load_collection(DATASET, split=os.environ.get("MECHIR_SPLIT", "quick"))
pairs = collection.candidates(depth=3, query_ids=collection.query_ids(4))

# %% [markdown]
# ## Attributions of a few pairs
#
# `neuron_integrated_gradients` returns a `NeuronAttributions`: `attributions` is
# `[batch, layer, d_mlp]` (summed over the sequence), `error` the estimated error per example and
# layer, and `embedding_completeness` the path integral's own check. 16 steps keep this quick;
# the relative error and the overlap of the top neurons with a half-resolution run say whether
# that is enough (the papers use 50; `n_steps="auto"` refines until `rtol` is met).

# %%
batch = model.encode([p.query for p in pairs[:3]], [p.document for p in pairs[:3]],
                     max_length=MAX_LENGTH)  # fmt: skip
result = neuron_integrated_gradients(model, batch, n_steps=16)
print("attributions:", tuple(result.attributions.shape), "= [batch, layer, d_mlp]")
print("F(x) - F(x'):", result.scores - result.baseline_scores[:, 0])
print("completeness error (per pair):", result.embedding_completeness)
print("estimated error / largest attribution:", result.relative_error())
print("top 0.5% kept at half the steps:", result.selection_overlap(0.5))

# %%
fig, ax = plt.subplots(figsize=(7, 3))
for layer in range(model.cfg.n_layers):
    values = result.attributions[0, layer].sort(descending=True).values
    ax.plot(values[:50], label=f"layer {layer}")
ax.set_xlabel("neuron rank")
ax.set_ylabel("attribution")
ax.set_title("Largest neuron attributions of the first pair")
ax.legend(fontsize=7, ncol=2)
plt.show()

# %% [markdown]
# ## Mean attributions and the top neurons
#
# `mean_neuron_attributions` streams `neuron_integrated_gradients` over batches, keeping only
# running sums, and averages per group: `pair_batches` encodes the pairs lazily and labels each
# with a group (here relevant or not). `top_neurons` keeps the top `percent` % of all neurons by
# signed score, across layers.


# %%
def grade(pair):
    return "relevant" if collection.qrels.get(pair.qid, {}).get(pair.docid, 0) > 0 else "other"


batches = pair_batches(model, pairs, group_of=grade, batch_size=6, max_length=MAX_LENGTH)
means = mean_neuron_attributions(model, batches, n_steps=16)
print({group: means.count(group) for group in means.means.keys()})
everything = sum(means.mean(g) * means.count(g) for g in means.means.keys()) / len(pairs)
selection = top_neurons(everything, 0.5, layers=means.layers, label="top 0.5%")
print(len(selection), "neurons, per layer:", selection.per_layer())
print(selection.table.head())

# %% [markdown]
# ## Pruning
#
# `pruning_evaluation` reranks the candidates unpruned, with the selected neurons zeroed
# (`mechir.hooks.neuron_ablation_hooks`), and with random controls, and tests the differences
# per query (paired t-tests).

# %%
pruned = pruning_evaluation(
    model, pairs, collection.qrels, selection, seeds=(0, 1), max_length=MAX_LENGTH
)
print(pruned.summary[["selection", "n_neurons", "unpruned", "selected", "random_mean"]])
fig, ax = plt.subplots(figsize=(5, 3))
rows = pruned.conditions
ax.bar(range(len(rows)), rows["value"])
ax.set_xticks(range(len(rows)), [f"{k}\n{'' if s != s else int(s)}" for k, s in
                                 zip(rows["kind"], rows["seed"])])  # fmt: skip
ax.set_ylabel(pruned.measure)
plt.show()
