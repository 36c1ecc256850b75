"""A tiny ColBERT-style late-interaction model equals a plain-torch MaxSim written here (query
augmentation with [MASK], projection, normalisation, MaxSim and its winners); matching-level
patching of the winner tokens."""

from __future__ import annotations

import pytest
import torch
from transformers import BertModel

from mechir.hooks import output_patch_hooks, tower_source
from mechir.models.late_interaction import HookedLateInteraction, load_late_interaction
from tests.helpers import DOCUMENTS, QUERIES, tiny_bert_config, tiny_tokenizer

QUERY_LENGTH = 10


@pytest.fixture(scope="module")
def late(tmp_path_factory):
    tok = tiny_tokenizer(tmp_path_factory.mktemp("tok"))
    torch.manual_seed(11)
    base = BertModel(tiny_bert_config(initializer_range=0.3)).eval()
    projection = torch.randn(12, 32)  # nn.Linear layout [dim, d_model]
    skip = tok.convert_tokens_to_ids([".", ","])
    model = load_late_interaction(
        base,
        projection=projection,
        tokenizer=tok,
        query_length=QUERY_LENGTH,
        skiplist=skip,
        device="cpu",
    )
    return model, base, projection, tok, skip


def _reference(base, projection, tok, skip, queries, documents):
    """ColBERT by hand: [CLS] q [SEP] [MASK]... to QUERY_LENGTH (all attended), documents as the
    tokenizer pads them, tokens projected and normalised, sum over query tokens of the max over
    the document's real, non-skiplisted tokens."""
    scores, winners = [], []
    for query, document in zip(queries, documents):
        q_ids = tok(query)["input_ids"][:QUERY_LENGTH]
        q_ids = q_ids + [tok.mask_token_id] * (QUERY_LENGTH - len(q_ids))
        d_ids = tok(document)["input_ids"]
        with torch.no_grad():
            q = base(input_ids=torch.tensor([q_ids])).last_hidden_state[0] @ projection.T
            d = base(input_ids=torch.tensor([d_ids])).last_hidden_state[0] @ projection.T
        q = q / q.norm(dim=-1, keepdim=True)
        d = d / d.norm(dim=-1, keepdim=True)
        keep = torch.tensor([i not in skip for i in d_ids])
        sim = q @ d[keep].T
        best, arg = sim.max(-1)
        scores.append(best.sum())
        winners.append(torch.arange(len(d_ids))[keep][arg])
    return torch.stack(scores), winners


def test_late_interaction_equals_plain_torch_maxsim(late):
    model, base, projection, tok, skip = late
    assert isinstance(model, HookedLateInteraction)
    documents = [*DOCUMENTS[:3], "the cat, the dog. the fish"]
    batch = model.encode(QUERIES, documents)
    assert batch.queries.input_ids.shape[1] == QUERY_LENGTH
    assert (batch.queries.input_ids == tok.mask_token_id).any()
    ref, ref_winners = _reference(base, projection, tok, skip, QUERIES, documents)
    torch.testing.assert_close(model.score(batch, batch_size=3), ref, atol=1e-5, rtol=0)
    found = model.matches(batch)
    torch.testing.assert_close(found.scores, ref, atol=1e-5, rtol=0)
    for b, winners in enumerate(ref_winners):
        assert found.winners[b].tolist() == winners.tolist()


def test_patching_the_winner_tokens_restores_the_clean_score(late):
    """Token embeddings of the clean documents put at the clean MaxSim winners of a corrupted
    document (same length) give back exactly the clean score when the winners are the only
    tokens MaxSim reads there; patching every token is the clean run."""
    model, *_ = late
    ids = ["a", "b"]
    clean = model.encode(
        QUERIES[:2], ["the cat runs in the house", "a small fish is blue"], pair_ids=ids
    )
    corrupted = model.encode(
        QUERIES[:2], ["the dog runs in the house", "a small bird is red"], pair_ids=ids
    )
    source = tower_source(model, clean, [model.output_hook_name])
    every = model.score(corrupted, hooks=output_patch_hooks(model, source))
    torch.testing.assert_close(every, model.score(clean), atol=1e-6, rtol=0)
    winners = model.matches(clean).winners
    at = torch.zeros_like(clean.documents.attention_mask, dtype=torch.bool)
    for b in range(len(at)):
        at[b, winners[b][winners[b] >= 0]] = True
    patched = model.score(corrupted, hooks=output_patch_hooks(model, source, positions=at))
    # with the winners patched, every query token finds at least its clean maximum
    assert bool((patched >= model.score(clean) - 1e-5).all())
    assert not torch.allclose(model.score(corrupted), model.score(clean), atol=1e-4)


def test_no_projection_is_refused(tmp_path):
    tok = tiny_tokenizer(tmp_path)
    base = BertModel(tiny_bert_config()).eval()
    with pytest.raises(ValueError, match="no projection"):
        load_late_interaction(base, tokenizer=tok, device="cpu")
    with pytest.raises(ValueError, match=r"expected \[dim, 32\]"):
        load_late_interaction(base, projection=torch.zeros(4, 7), tokenizer=tok, device="cpu")


def test_match_head_effects_equal_an_hf_knockout_oracle(late):
    """Head 1/2 knocked out in the document tower: the per-token MaxSim of every query token
    equals the plain-torch reference with that head's slice of the attention output zeroed by a
    Hugging Face forward hook."""
    from mechir.models.late_interaction import match_head_effects

    model, base, projection, tok, skip = late
    batch = model.encode(QUERIES[:2], DOCUMENTS[:2])
    table = match_head_effects(model, batch, heads=["1/2", "0/0"])
    assert set(table["head"]) == {"1/2", "0/0"}

    def zero_head(module, args, out):
        z = out[0].clone()
        z[..., 2 * 8 : 3 * 8] = 0
        return (z, *out[1:])

    scores = []
    for q, d in zip(QUERIES[:2], DOCUMENTS[:2]):
        q_ids = tok(q)["input_ids"]
        q_ids = q_ids + [tok.mask_token_id] * (QUERY_LENGTH - len(q_ids))
        with torch.no_grad():
            qe = base(input_ids=torch.tensor([q_ids])).last_hidden_state[0] @ projection.T
            handle = base.encoder.layer[1].attention.self.register_forward_hook(zero_head)
            try:
                de = base(input_ids=torch.tensor([tok(d)["input_ids"]])).last_hidden_state[0]
            finally:
                handle.remove()
        qe = qe / qe.norm(dim=-1, keepdim=True)
        de = de @ projection.T
        de = de / de.norm(dim=-1, keepdim=True)
        scores.append((qe @ de.T).max(-1).values)
    rows = table[table["head"] == "1/2"]
    for b in range(2):
        got = torch.tensor(rows[rows["pair"] == b]["knocked"].to_list())
        torch.testing.assert_close(got, scores[b], atol=1e-5, rtol=0)
    assert (rows["effect"].abs() > 1e-4).any()
