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
# # 5. QK circuits and matching heads
#
# Two views of the heads that let query and document tokens find each other:
#
# - **weights** (`mechir.circuits`): the pre-softmax score from a query-side state `x_q` to a
#   key-side state `x_k` is `x_q W_QK x_k^T / sqrt(d_head)` (plus a key-bias term), with
#   `W_QK = W_Q W_K^T` of rank `d_head`. Its SVD `W_QK = U diag(S) V^T` says which directions
#   `u_k` of the attending token look for which directions `v_k` of the attended token. When
#   `u_k` and `v_k` point the same way (`cos(u_k, v_k) > 0`) the head matches like with like;
#   `alignment = sum_k S_k cos(u_k, v_k) = trace(W_QK)`.
# - **activations** (`mechir.matching`): *matching heads* (Vast et al.) put clearly more of
#   their maximal Query -> Document attention (`qd_max`) on relevant documents than on random
#   ones: `Delta_h = median_q qd_max(relevant) - median_q qd_max(easy negative)`.

# %%
import os

import matplotlib.pyplot as plt

import mechir
from mechir.circuits import qk_alignment, qk_svd, singular_direction_tokens
from mechir.data import load_collection, matching_pairs
from mechir.matching import matching_head_labels, matching_heads

MODEL = os.environ.get("MECHIR_MODEL", "demo")
DATASET = os.environ.get("MECHIR_DATASET", "demo")
model = mechir.load_cross_encoder(MODEL, device="cpu")
collection = load_collection(DATASET, split=os.environ.get("MECHIR_SPLIT", "quick"))

# %% [markdown]
# ## QK SVD of every head, in one batched call
#
# `qk_svd` never materializes the `d_model x d_model` matrices (thin QR of `W_Q` and `W_K`, then
# a `d_head x d_head` SVD). `qk_alignment` turns the spectra into a tidy table, one row per head.

# %%
svd = qk_svd(model)
print(svd)
alignment = qk_alignment(model, k=4)
columns = ["label", "sigma_1", "alignment_norm", "alignment_pos_norm", "key_bias_norm"]
strongest = alignment.sort_values("alignment_norm", ascending=False)
print(strongest[columns].head(8).to_string(index=False))

# %%
grid = alignment.pivot(index="layer", columns="head", values="alignment_norm")
fig, ax = plt.subplots(figsize=(7, 3.5))
image = ax.imshow(grid.to_numpy(), cmap="coolwarm", vmin=-1, vmax=1)
ax.set_xlabel("head")
ax.set_ylabel("layer")
ax.set_title("QK alignment (weighted mean cosine of u_k, v_k)")
fig.colorbar(image, ax=ax)
plt.show()

# %% [markdown]
# What does the strongest self-matching head look for? `singular_direction_tokens` lists the
# vocabulary tokens (as layer 0 sees them) projecting most on `u_0` (query side) and `v_0`
# (document side). Both signs are listed, since a singular pair is defined up to a joint flip.

# %%
best = alignment.sort_values("alignment_norm", ascending=False).iloc[0]["label"]
tokens = singular_direction_tokens(model, best, 0, n=5, svd=svd)
print(tokens[["label", "vector", "sign", "rank", "token", "projection"]].to_string(index=False))

# %% [markdown]
# ## Matching heads from attention statistics
#
# `matching_pairs` draws relevant documents, hard negatives and random ("easy") negatives for
# some queries; `matching_heads` streams the attention statistics of every pair, layer and head
# (reduced inside the forward pass: no cache of patterns is kept) and scores every head.

# %%
pairs = matching_pairs(collection, n_queries=6, max_relevant=1, max_hard=1, n_easy=2)
print(pairs["kind"].value_counts().to_dict())
deltas, stats = matching_heads(model, pairs, max_length=128)
qd = deltas[(deltas["statistic"] == "qd_max") & (deltas["negative"] == "easy_negative")]
print(qd.head(5)[["label", "delta", "positive_median", "negative_median"]].to_string(index=False))
print("matching heads:", matching_head_labels(deltas, threshold=0.1))

# %% [markdown]
# Do the two views agree? Each head's `Delta` (activations) against its QK alignment (weights):

# %%
both = qd.merge(alignment, on=["layer", "head", "label"])
fig, ax = plt.subplots(figsize=(5, 4))
ax.scatter(both["alignment_norm"], both["delta"], c=both["layer"], cmap="viridis")
for _, row in both.nlargest(3, "delta").iterrows():
    ax.annotate(row["label"], (row["alignment_norm"], row["delta"]))
ax.set_xlabel("QK alignment (normalized)")
ax.set_ylabel("Delta qd_max (relevant - easy negative)")
plt.show()

# %% [markdown]
# Vocabulary embeddings are what layer 0 sees; deeper heads read contextual states. With `batch=`
# the candidates are the real tokens' residual states entering the head's layer, here for the
# strongest matching head on the relevant pairs (`example` and `position` locate each token):

# %%
top_head = matching_head_labels(deltas, threshold=0.0)[0]
relevant = pairs[pairs["kind"] == "relevant"]
batch = model.encode(list(relevant["query"]), list(relevant["document"]), max_length=128)
in_context = singular_direction_tokens(model, top_head, 0, n=4, svd=svd, batch=batch)
print(in_context[["label", "vector", "sign", "token", "part", "projection"]].to_string(index=False))
