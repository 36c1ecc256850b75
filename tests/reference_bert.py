"""A hand-written BERT cross-encoder forward pass from Hugging Face weights: the test oracle.

It shares no code with mechir or TransformerLens. ``prob_keep`` multiplies the post-softmax
attention probabilities by a 0/1 mask (direction ablation, ``zero`` mode); ``score_keep`` sets
removed scores to -inf before the softmax (``renormalize`` mode; all-removed rows give zeros).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def reference_logits(
    hf,
    input_ids,
    token_type_ids,
    attention_mask,
    *,
    layer_masks=None,
    mode="zero",
    hidden_states=None,
):
    """Logits ``[batch, num_labels]``; ``layer_masks``: {layer: keep [batch, (heads,) q, k]}."""
    bert = hf.bert
    cfg = hf.config
    emb = bert.embeddings
    pos = torch.arange(input_ids.shape[1])[None]
    x = emb.word_embeddings(input_ids) + emb.position_embeddings(pos)
    x = x + emb.token_type_embeddings(token_type_ids)
    x = F.layer_norm(
        x, (cfg.hidden_size,), emb.LayerNorm.weight, emb.LayerNorm.bias, cfg.layer_norm_eps
    )
    h, d = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
    pad = attention_mask[:, None, None, :] == 0
    for i, layer in enumerate(bert.encoder.layer):
        att = layer.attention
        split = lambda t: t.view(t.shape[0], t.shape[1], h, d).transpose(1, 2)  # noqa: E731
        q, k, v = (split(lin(x)) for lin in (att.self.query, att.self.key, att.self.value))
        scores = q @ k.transpose(-1, -2) / math.sqrt(d)
        scores = scores.masked_fill(pad, float("-inf"))
        keep = None
        if layer_masks is not None and i in layer_masks:
            keep = layer_masks[i]
            keep = keep[:, None] if keep.dim() == 3 else keep
        if keep is not None and mode == "renormalize":
            scores = scores.masked_fill(keep == 0, float("-inf"))
        probs = torch.softmax(scores, -1).nan_to_num(0.0)
        if keep is not None and mode == "zero":
            probs = probs * keep
        ctx = (probs @ v).transpose(1, 2).reshape(x.shape)
        x = att.output.LayerNorm(att.output.dense(ctx) + x)
        ff = layer.output.dense(F.gelu(layer.intermediate.dense(x)))
        x = layer.output.LayerNorm(ff + x)
        if hidden_states is not None:
            hidden_states.append(x)
    pooled = torch.tanh(bert.pooler.dense(x[:, 0]))
    return hf.classifier(pooled)
