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
# # 2. Attention direction ablation and the 5x5 heatmap
#
# Which information flows does relevance depend on? *Direction ablation* removes the attention
# **of** tokens of one part (the attending part, the rows of the attention pattern) **to** tokens of
# another (the attended part, the columns): "Q->D removed" means query tokens can no longer read
# the document, while the document can still read the query. With the `"zero"` mode the removed
# attention probabilities are set to 0, `A'_ij = A_ij M_ij`, as in the cross-encoder papers.
#
# We rerank BM25's top 4 for a handful of SciFact queries, once per each of the 25 part -> part
# directions (removed in all layers), and draw the nDCG@10 of each as a 5x5 grid.
#
# `MECHIR_MODEL` and `MECHIR_DATASET` (a collection directory or an ir_datasets id) choose another
# model and collection.

# %%
import os

import matplotlib.pyplot as plt
import numpy as np

import mechir
from mechir.data import load_collection
from mechir.evaluation import evaluate, rerank
from mechir.hooks import cumulative_layer_ranges, direction_ablation_hooks

MODEL = os.environ.get("MECHIR_MODEL", "demo")
DATASET = os.environ.get("MECHIR_DATASET", "demo")
N_QUERIES, DEPTH, MAX_LENGTH = 5, 4, 96  # small, to run in seconds on a CPU

model = mechir.load_cross_encoder(MODEL, device="cpu")
collection = load_collection(DATASET, split=os.environ.get("MECHIR_SPLIT", "quick"))
print(collection)
# queries with a relevant document among their BM25 top DEPTH (so nDCG@10 has something to rank)
candidates = collection.candidates(depth=DEPTH)
found = {p.qid for p in candidates if collection.qrels.get(p.qid, {}).get(p.docid, 0) > 0}
qids = [q for q in collection.query_ids() if q in found][:N_QUERIES]
pairs = [p for p in candidates if p.qid in qids]
print(len(pairs), "pairs of", len(qids), "queries")

# %% [markdown]
# ## The baseline
#
# `rerank` scores every candidate (hooks optional) and returns a run `{qid: {docid: score}}`;
# `evaluate` computes nDCG@10 with ir_measures.

# %%
run = rerank(model, pairs, max_length=MAX_LENGTH, progress=False)
baseline = evaluate(run, collection.qrels).aggregate["nDCG@10"]
print(f"no ablation: nDCG@10 = {baseline:.4f}")

# %% [markdown]
# ## One direction
#
# `direction_ablation_hooks` is built once: inside the forward pass the hooks read the parts of
# whatever batch is running, so the same list serves every sub-batch of `rerank`.

# %%
q_to_d = direction_ablation_hooks(model, attending="query", attended="document", layers="all")
run_qd = rerank(model, pairs, hooks=q_to_d, max_length=MAX_LENGTH, progress=False)
print(f"Q->D removed: nDCG@10 = {evaluate(run_qd, collection.qrels).aggregate['nDCG@10']:.4f}")

# %% [markdown]
# ## All 25 directions
#
# For many conditions, encode the pairs once and call `model.score(batch, hooks=...)`: the
# parts are `mechir.PARTS` (CLS, QUERY, SEP1, DOCUMENT, SEP2) and `layers=None` means all layers.
# We keep both nDCG@10 and the mean score change against the unablated model.

# %%
batch = model.encode([p.query for p in pairs], [p.document for p in pairs], max_length=MAX_LENGTH)
clean = model.score(batch, batch_size=32)


def ablate(hooks) -> tuple[float, float]:
    """(nDCG@10, mean score change) of the pairs with ``hooks``."""
    scores = model.score(batch, hooks=hooks, batch_size=32)
    run: dict[str, dict[str, float]] = {}
    for pair, score in zip(pairs, scores.tolist()):
        run.setdefault(pair.qid, {})[pair.docid] = score
    return evaluate(run, collection.qrels).aggregate["nDCG@10"], (scores - clean).mean().item()


cells = [
    [ablate(direction_ablation_hooks(model, attending=a, attended=b)) for b in mechir.PARTS]
    for a in mechir.PARTS
]
ndcg, change = np.array(cells).transpose(2, 0, 1)

# %% [markdown]
# Rows: the attending part (whose tokens lose attention); columns: the attended part (what they
# can no longer read). Cells far below the baseline mark information flows the ranking needs.
# With CLS -> anything removed the score hardly depends on the input any more, so nDCG there
# measures little more than tie-breaking; the mean score change shows what moved.

# %%
names = [p.name for p in mechir.PARTS]
fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), layout="constrained")
panels = (
    (ndcg, f"nDCG@10 (baseline {baseline:.3f})", "viridis"),
    (change, "mean score change", "RdBu_r"),
)
for ax, (values, title, cmap) in zip(axes, panels):
    limit = np.abs(values).max() if cmap == "RdBu_r" else None
    image = ax.imshow(values, cmap=cmap, vmin=-limit if limit else None, vmax=limit)
    ax.set_xticks(range(5), names, rotation=45)
    ax.set_yticks(range(5), names)
    ax.set_xlabel("attended part (no longer read)")
    ax.set_ylabel("attending part")
    ax.set_title(title)
    for i in range(5):
        for j in range(5):
            ax.text(j, i, f"{values[i, j]:.2f}", ha="center", va="center", fontsize=8)
    fig.colorbar(image, ax=ax, shrink=0.8)
plt.show()

# %% [markdown]
# ## Layers matter too
#
# `layers=` takes ints, ranges or `"all"`; `cumulative_layer_ranges(n)` gives the ranges `0..k`
# the papers sweep. Here Q->D is removed in layers `0..k` for growing `k`:

# %%
by_depth = [
    ablate(direction_ablation_hooks(model, attending="query", attended="document", layers=layers))[
        0
    ]
    for layers in cumulative_layer_ranges(model.cfg.n_layers)
]
fig, ax = plt.subplots(figsize=(6, 3))
ax.plot(range(model.cfg.n_layers), by_depth, marker="o")
ax.axhline(baseline, color="grey", linestyle="--", label="no ablation")
ax.set_xlabel("Q->D removed in layers 0..k")
ax.set_ylabel("nDCG@10")
ax.legend()
plt.show()
