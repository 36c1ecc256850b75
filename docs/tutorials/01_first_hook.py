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
# # 1. Your first hook experiment
#
# A cross-encoder reads `[CLS] query [SEP] document [SEP]` and maps the final `[CLS]` state to a
# relevance score. mechir loads it into a TransformerLens `HookedEncoder`, so every activation
# passes through a named hook point (`blocks.3.attn.hook_z`, `blocks.3.mlp.hook_post`, ...) where a
# function can read or replace it, and it knows the **part** of every token:
# CLS | QUERY | SEP1 | DOCUMENT | SEP2.
#
# This tutorial loads a small real cross-encoder, the embedded demo model shipped with mechir
# (`"demo"`: MiniLM, 6 layers x 12 heads, fine-tuned on SciFact; no download), scores a few
# pairs, looks at the parts, and writes a hook by hand on the per-head attention output
# `blocks.{l}.attn.hook_z`.
#
# Set `MECHIR_MODEL` to use another model (a local directory or a hub id).

# %%
import os

import matplotlib.pyplot as plt
import torch

import mechir
from mechir.hooks import head_knockout_hooks, running_batch

MODEL = os.environ.get("MECHIR_MODEL", "demo")
model = mechir.load_cross_encoder(MODEL, device="cpu")
print(model.cfg.n_layers, "layers x", model.cfg.n_heads, "heads, d_head =", model.cfg.d_head)

# %% [markdown]
# ## Encode and score
#
# `model.encode(queries, documents)` tokenizes the pairs and labels every token with its part
# (`batch.parts`, `[batch, pos]`). `model.score(batch)` returns one float32 score per pair, on the
# CPU; for this 1-label model the score is the classifier's logit.

# %%
queries = ["vitamin d deficiency increases the risk of fractures"] * 2
documents = [
    "Low serum vitamin D was associated with a higher risk of hip fractures in older adults.",
    "The protein folds into a beta barrel that binds the membrane of the mitochondria.",
]
batch = model.encode(queries, documents, max_length=160)
print(batch)
print(model.score(batch))

# %% [markdown]
# The parts of the first pair, token by token (`Part` is an `IntEnum`: CLS=0, QUERY=1, SEP1=2,
# DOCUMENT=3, SEP2=4, PAD=5):

# %%
tokens = model.tokenizer.convert_ids_to_tokens(batch.input_ids[0].tolist())
for token, part in list(zip(tokens, batch.parts[0].tolist()))[:14]:
    print(f"{token:>12}  {mechir.Part(part).name}")

# %% [markdown]
# ## What `hook_z` holds
#
# `blocks.{l}.attn.hook_z` is each head's output *before* the output projection `W_O`:
# for head `h` at position `i`, `z[b, i, h] = sum_j A_h[i, j] v_h[j]`, the attention-weighted
# sum of value vectors. Its shape is **`[batch, pos, head, d_head]`**: one `d_head`-vector per pair,
# token and head. The attention output is `sum_h z[:, :, h] @ W_O[h] + b_O`, so zeroing
# `z[:, :, h]` removes head `h`'s contribution exactly (the same as zeroing its rows of `W_O`).
#
# `run_with_cache` records every activation of one forward pass:

# %%
LAYER, HEAD = 2, 5
scores, cache = model.run_with_cache(batch)
z = cache[f"blocks.{LAYER}.attn.hook_z"]
print("hook_z shape:", tuple(z.shape), "= [batch, pos, head, d_head]")

# %% [markdown]
# ## A hand-written hook
#
# A hook is a function `fn(activation, hook)` returning the (possibly modified) activation. To
# silence head `HEAD` of layer `LAYER` **on document tokens only**, the hook needs the parts of the
# batch it is running on. It reads them *inside* the function with `running_batch(hook)`, so the
# same hook works on any batch, and on the sub-batches of `model.score(..., batch_size=...)`.


# %%
def silence_head_on_document(z, hook):
    # z: [batch, pos, head, d_head]; the mask: [batch, pos]
    document = running_batch(hook).mask("document").to(z.device)
    z = z.clone()
    z[:, :, HEAD][document] = 0.0
    return z


hooks = [(f"blocks.{LAYER}.attn.hook_z", silence_head_on_document)]
clean = model.score(batch)
silenced = model.score(batch, hooks=hooks)
print("clean:   ", clean)
print("silenced:", silenced)

# %% [markdown]
# The library's factory `head_knockout_hooks` does the same thing (heads as `"l/h"`, TransformerLens
# `"LlHh"`, `(l, h)` or `{l: [h]}`), so the two must agree exactly:

# %%
library = model.score(batch, hooks=head_knockout_hooks(model, f"{LAYER}/{HEAD}", parts="document"))
print(library)
assert torch.equal(library, silenced)

# %% [markdown]
# Hooks compose with `+` and also run in a context manager (`with model.hooks(fwd_hooks=...)`).
# One factory call per head gives the effect of knocking out every head of the layer in turn on the
# relevant pair:

# %%
effects = [
    (model.score(batch[:1], hooks=head_knockout_hooks(model, (LAYER, h))) - clean[:1]).item()
    for h in range(model.cfg.n_heads)
]
fig, ax = plt.subplots(figsize=(6, 2.5))
ax.bar(range(model.cfg.n_heads), effects)
ax.set_xlabel(f"head of layer {LAYER}")
ax.set_ylabel("score change")
ax.set_title("Knocking out one head (all positions), relevant pair")
plt.show()
