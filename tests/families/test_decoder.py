"""Decoder LLM rerankers (Qwen3 and Qwen2 yes/no, a Llama classifier, Mistral with a sliding
window): tiny random checkpoints saved as local directories, each checked against Hugging Face
run on the same ``input_ids`` / ``attention_mask`` (right and left padding), and every
intervention against an oracle outside mechir where one exists (Hugging Face with its eager
attention function replaced, Hugging Face with weight surgery) or refused in one line."""

from __future__ import annotations

import copy
import sys

import pytest
import torch

from mechir import Part, circuits, load_cross_encoder
from mechir.hooks import (
    direction_ablation_hooks,
    head_knockout_hooks,
    neuron_ablation_hooks,
    patch_hooks,
)
from mechir.models.decoder import DEFAULT_INSTRUCTION, HookedDecoderReranker
from mechir.models.registry import family_of
from tests.families.builders import (
    DECODER_SPECS,
    PAD_EOS_CLASSIFIER_SPECS,
    load_hf_decoder,
    save_tiny_decoder,
)
from tests.helpers import DOCUMENTS, QUERIES

ATOL = 1e-5
NAMES = tuple(DECODER_SPECS)


@pytest.fixture(scope="session")
def decoder_dirs(tmp_path_factory):
    cache: dict[str, object] = {}

    def get(name: str):
        if name not in cache:
            cache[name] = save_tiny_decoder(name, tmp_path_factory.mktemp(name))
        return cache[name]

    return get


@pytest.fixture(scope="session", params=NAMES)
def decoder(request, decoder_dirs):
    """``(name, model, hf, batch)``: loaded with ``load_cross_encoder(directory)``; the batch
    is right-padded (``padding_side="left"`` is tested on its own)."""
    directory = decoder_dirs(request.param)
    model = load_cross_encoder(directory, device="cpu")
    return (
        request.param,
        model,
        load_hf_decoder(request.param, directory),
        model.encode(QUERIES, DOCUMENTS),
    )


@pytest.fixture(scope="session")
def qwen3(decoder_dirs):
    directory = decoder_dirs("qwen3")
    model = load_cross_encoder(directory, device="cpu")
    return model, load_hf_decoder("qwen3", directory), model.encode(QUERIES, DOCUMENTS)


# ------------------------------------------------------------------ Hugging Face oracles
def last_real(batch):
    return batch.attention_mask.shape[1] - 1 - batch.attention_mask.flip(1).argmax(1)


def hf_scores(hf, model, batch):
    """HF's score on the same ids and mask: ``logit(yes) - logit(no)`` of the language model at
    the last real token, or the classifier's logit."""
    with torch.no_grad():
        logits = hf(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    if model.kind == "classifier":
        return logits[:, 0]
    last = logits[torch.arange(len(batch)), last_real(batch)]
    yes, no = model.answer_ids
    return last[:, yes] - last[:, no]


def masked_eager_attention(keep_per_layer, mode):
    """HF's eager attention (grouped key/value heads repeated) applying a direction ablation."""

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **_):
        groups = query.shape[1] // key.shape[1]
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
        scores = query @ key.transpose(2, 3) * scaling
        scores = scores.masked_fill(attention_mask < -1e30, float("-inf"))
        keep = keep_per_layer.get(module.layer_idx)
        if keep is not None and mode == "renormalize":
            scores = scores.masked_fill(keep[:, None] == 0, float("-inf"))
        probs = torch.softmax(scores, -1).nan_to_num(0.0)
        if keep is not None and mode == "zero":
            probs = probs * keep[:, None]
        return (probs @ value).transpose(1, 2).contiguous(), probs

    return attention


def hand_keep(batch, attending, attended):
    """0/1 keep-mask built position by position from the part ids (no mechir mask code)."""
    parts = batch.parts.tolist()
    keep = torch.ones(len(parts), len(parts[0]), len(parts[0]))
    for b, row in enumerate(parts):
        for i, pi in enumerate(row):
            for j, pj in enumerate(row):
                if pi in attending and pj in attended:
                    keep[b, i, j] = 0
    return keep


# ------------------------------------------------------------------ loading and parity
def test_directory_loads_as_its_family(decoder):
    name, model, hf, _ = decoder
    assert isinstance(model, HookedDecoderReranker)
    assert model.family is family_of(hf.config.model_type, type(hf).__name__)
    assert model.family.kind == "decoder"
    assert model.kind == ("classifier" if "seqcls" in name else "yes_no")
    assert model.cfg.n_key_value_heads == 2 and model.cfg.n_heads == 4


@pytest.mark.parametrize("side", ["right", "left"])
def test_every_hidden_state_and_the_score_match_hf(decoder, side):
    name, model, hf, _ = decoder
    batch = model.encode(QUERIES, DOCUMENTS, padding_side=side)
    assert batch.attention_mask.sum(-1).unique().numel() > 1, "batch must contain padding"
    if side == "left":
        assert (batch.attention_mask[:, -1] == 1).all() and (batch.attention_mask[:, 0] == 0).any()
    with torch.no_grad():
        out = hf(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask,
            output_hidden_states=True,
        )  # fmt: skip
    names = ["hook_full_embed"]
    names += [model.block_output_name(i) for i in range(model.cfg.n_layers - 1)]
    names += [model.final_hidden_name]
    with torch.no_grad():
        score, cache = model.run_with_cache(batch, names_filter=names)
    real = batch.attention_mask.bool()
    assert len(out.hidden_states) == len(names)
    for i, hook in enumerate(names):
        torch.testing.assert_close(
            cache[hook][real], out.hidden_states[i][real], atol=ATOL, rtol=1e-5
        )
    torch.testing.assert_close(score, hf_scores(hf, model, batch), atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(model.score(batch), score, atol=0, rtol=0)


DECODER_ATTENTION_HOOKS = (
    "hook_q", "hook_k", "hook_v", "hook_rot_q", "hook_rot_k", "hook_attn_scores", "hook_pattern",
    "hook_z",
)  # fmt: skip


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("mask_a_row", [False, True])
def test_lean_attention_equals_transformer_lens_attention(decoder, side, mask_a_row):
    """mechir's causal attention forward gives TransformerLens's scores and every attention hook
    value (padding on either side; a row masked by a hook: NaN after the softmax, zeros in
    both), each block's attention run by both classes in turn."""
    from transformer_lens.components import Attention, GroupedQueryAttention

    from mechir.models.decoder import DecoderAttention, DecoderGroupedQueryAttention, _lean

    _, model, _, _ = decoder
    lean_classes = {type(block.attn) for block in model.blocks}
    assert lean_classes <= {DecoderAttention, DecoderGroupedQueryAttention}
    assert all(_lean(block.attn) for block in model.blocks)  # no fallback to TL's forward
    batch = model.encode(QUERIES, DOCUMENTS, padding_side=side)
    names = [f"blocks.{i}.attn.{h}" for i in range(model.cfg.n_layers)
             for h in DECODER_ATTENTION_HOOKS]  # fmt: skip

    def mask_row(scores, hook):
        scores = scores.clone()
        scores[:, :, 3, :] = -torch.inf  # query position 3 reads nothing
        return scores

    def run(tl: bool):
        seen = {}
        keep = lambda x, hook: seen.__setitem__(hook.name, x.detach().clone())  # noqa: E731
        hooks = [("blocks.0.attn.hook_attn_scores", mask_row)] if mask_a_row else []
        kept = [type(block.attn) for block in model.blocks]
        try:
            if tl:
                for block in model.blocks:
                    block.attn.__class__ = block.attn.__class__.__bases__[0]
            assert {type(b.attn) for b in model.blocks} <= (
                {Attention, GroupedQueryAttention} if tl else lean_classes
            )
            return model.score(batch, hooks=[*hooks, *((n, keep) for n in names)]), seen
        finally:
            for block, cls in zip(model.blocks, kept):
                block.attn.__class__ = cls

    lean, lean_seen = run(tl=False)
    ref, ref_seen = run(tl=True)
    torch.testing.assert_close(lean, ref, atol=ATOL, rtol=0)
    assert lean_seen.keys() == ref_seen.keys() == set(names)
    for name, value in ref_seen.items():
        torch.testing.assert_close(lean_seen[name], value, atol=ATOL, rtol=1e-5, msg=name)
    if mask_a_row:
        assert (lean_seen["blocks.0.attn.hook_pattern"][:, :, 3] == 0).all()
    if side == "left":  # the queries of left padding read nothing: zero rows in both
        pads = batch.attention_mask[:, 0] == 0
        assert pads.any() and (lean_seen["blocks.1.attn.hook_pattern"][pads, :, 0] == 0).all()


def test_attention_declares_its_rotation_and_window(decoder):
    """What every block's attention declares (:class:`mechir.models.attention.AttentionTerms`)
    against TransformerLens's own computation: ``rotate_positions`` of ``hook_q`` (QK-normed
    where the model has QK-norm) is ``hook_rot_q`` at the real tokens of a right-padded batch;
    ``window`` is the band of TransformerLens's causal mask (None: the plain causal mask); no
    position score terms."""
    from mechir.models.tl import causal_mask

    name, model, _, _ = decoder
    batch = model.encode(QUERIES, DOCUMENTS)
    real = batch.attention_mask.bool()
    with torch.no_grad():
        _, cache = model.run_with_cache(batch, names_filter=lambda n: n.endswith(("_q", "rot_q")))
    n = 40
    i, j = torch.arange(n)[:, None], torch.arange(n)[None]
    for layer, block in enumerate(model.blocks):
        attn = block.attn
        assert attn.qk_score_delta is None
        q = cache[f"blocks.{layer}.attn.hook_q"]
        rotated = attn.rotate_positions(attn.q_norm(q) if model.abilities.qk_norm else q)
        want = cache[f"blocks.{layer}.attn.hook_rot_q"]
        torch.testing.assert_close(rotated[real], want[real], atol=ATOL, rtol=1e-5)
        band = (j <= i) if attn.window is None else (j <= i) & (i - j <= attn.window)
        assert torch.equal(causal_mask(attn, n, n, torch.device("cpu"))[0, 0], band), layer
    if name == "mistral":  # the case with a window is there
        assert all(block.attn.window is not None for block in model.blocks)


def test_left_and_right_padding_and_single_pairs_score_alike(decoder):
    _, model, _, batch = decoder
    right = model.score(batch)
    left = model.score(model.encode(QUERIES, DOCUMENTS, padding_side="left"))
    alone = torch.cat([model.score(batch[i]) for i in range(len(batch))])
    torch.testing.assert_close(left, right, atol=ATOL, rtol=0)
    torch.testing.assert_close(alone, right, atol=ATOL, rtol=0)
    left_batch = model.encode(QUERIES, DOCUMENTS, padding_side="left")
    chunked = model.score(left_batch, batch_size=3)  # sub-batches of a left-padded batch
    torch.testing.assert_close(chunked, right, atol=ATOL, rtol=0)


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("name", tuple(PAD_EOS_CLASSIFIER_SPECS))
def test_classifier_pools_the_last_token_that_is_not_the_pad_token_like_hf(
    decoder_dirs, name, side
):
    """Hugging Face's sequence classifiers pool the last token whose id is not
    ``config.pad_token_id``. With pad = EOS and RankLLaMA's template (every prompt ends with
    the EOS) that is the token before the EOS, on a padded batch (either side) and on each
    example alone; without a pad token, the last position of each example alone."""
    directory = decoder_dirs(name)
    model = load_cross_encoder(directory, device="cpu")
    hf = load_hf_decoder(name, directory)
    batch = model.encode(QUERIES, DOCUMENTS, padding_side=side)
    assert batch.attention_mask.sum(-1).unique().numel() > 1, "batch must contain padding"
    eos = model.tokenizer.eos_token_id
    ends = batch.input_ids[torch.arange(len(batch)), last_real(batch)]
    assert (ends == eos).all(), "every prompt must end with the EOS"
    alone = []
    for q, d in zip(QUERIES, DOCUMENTS):
        one = model.encode([q], [d])
        alone.append(hf(input_ids=one.input_ids).logits[:, 0].detach())
        torch.testing.assert_close(model.score(one), alone[-1], atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(model.score(batch), torch.cat(alone), atol=ATOL, rtol=1e-5)
    if hf.config.pad_token_id is None:
        return
    assert hf.config.pad_token_id == eos == model.tokenizer.pad_token_id
    torch.testing.assert_close(
        model.score(batch), hf_scores(hf, model, batch), atol=ATOL, rtol=1e-5
    )
    with torch.no_grad():  # the EOS's own score differs (the test can tell the two apart)
        _, cache = model.run_with_cache(batch, names_filter=[model.final_hidden_name])
    resid = cache[model.final_hidden_name]
    at_eos = model.classifier(resid[torch.arange(len(batch)), last_real(batch)])[:, 0]
    assert (at_eos - model.score(batch)).abs().min() > 1e-4


def test_yes_no_score_ranks_like_qwen3_rerankers_probability(qwen3):
    """``score_type="prob"`` = Qwen3-Reranker's ``softmax([logit(no), logit(yes)])[1]``, a
    monotone function of the default score ``logit(yes) - logit(no)``."""
    model, hf, batch = qwen3
    default = model.score(batch)
    with torch.no_grad():
        logits = hf(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    last = logits[torch.arange(len(batch)), last_real(batch)]
    no, yes = model.tokenizer.convert_tokens_to_ids(["no", "yes"])
    assert model.answer_ids == (yes, no)  # (relevant, non-relevant), as MonoT5's
    official = torch.stack([last[:, no], last[:, yes]], 1).log_softmax(1)[:, 1].exp()
    model.score_type = "prob"
    try:
        torch.testing.assert_close(model.score(batch), official, atol=ATOL, rtol=0)
    finally:
        model.score_type = "binary_logit"
    torch.testing.assert_close(default.sigmoid(), official, atol=ATOL, rtol=0)


# ------------------------------------------------------------------ prompts and parts
def test_encoding_equals_qwen3_rerankers_own_procedure(qwen3):
    """The Qwen3-Reranker model card: prefix tokens + tokenizer(instruction/query/document)
    + suffix tokens, built here from its strings, not from mechir's template."""
    model, _, _ = qwen3
    tok = model.tokenizer
    prefix = (
        "<|im_start|>system\nJudge whether the Document meets the requirements based on the "
        'Query and the Instruct provided. Note that the answer can only be "yes" or "no".'
        "<|im_end|>\n<|im_start|>user\n"
    )
    suffix = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    batch = model.encode(QUERIES, DOCUMENTS)
    for i, (q, d) in enumerate(zip(QUERIES, DOCUMENTS)):
        middle = f"<Instruct>: {DEFAULT_INSTRUCTION}\n<Query>: {q}\n<Document>: {d}"
        ids = tok.encode(prefix) + tok.encode(middle) + tok.encode(suffix)
        n = int(batch.lengths[i])
        assert batch.input_ids[i, :n].tolist() == ids


def test_parts_label_query_document_instruction_and_template(qwen3):
    model, _, _ = qwen3
    tok = model.tokenizer
    for side in ("right", "left"):
        batch = model.encode(QUERIES, DOCUMENTS, padding_side=side)
        for i, (q, d) in enumerate(zip(QUERIES, DOCUMENTS)):
            ids, parts = batch.input_ids[i], batch.parts[i]
            text = {p: tok.decode(ids[parts == int(p)]) for p in Part}
            assert text[Part.QUERY].strip() == q
            assert text[Part.DOCUMENT].strip() == d
            assert text[Part.INSTRUCTION].strip() == DEFAULT_INSTRUCTION
            assert text[Part.SEP1] == "\n<Document>:"
            assert text[Part.SEP2].startswith("<|im_end|>") and text[Part.SEP2].endswith("\n\n")
            assert text[Part.CLS].startswith("<|im_start|>system") and "<Query>:" in text[Part.CLS]
            assert ((parts == int(Part.PAD)) == (batch.attention_mask[i] == 0)).all()
            order = [p for p in parts.tolist() if p != int(Part.PAD)]
            runs = [p for k, p in enumerate(order) if k == 0 or order[k - 1] != p]
            assert runs == [0, 6, 0, 1, 2, 3, 4]


def test_long_documents_are_cut_to_max_length(qwen3):
    model, _, _ = qwen3
    full = model.encode(QUERIES, DOCUMENTS)
    n_template = int((full.parts[2] != int(Part.DOCUMENT)).sum() - (full.parts[2] == 5).sum())
    limit = n_template + 5
    cut = model.encode(QUERIES, DOCUMENTS, max_length=limit)
    assert int(cut.lengths.max()) <= limit
    doc = cut.input_ids[2][cut.parts[2] == int(Part.DOCUMENT)]
    assert 1 <= len(doc) <= 5
    whole = full.input_ids[2][full.parts[2] == int(Part.DOCUMENT)]
    assert doc.tolist() == whole[: len(doc)].tolist()
    with pytest.raises(ValueError, match="pair 0: the prompt without its document has"):
        model.encode(["what " * 40], ["cat"], max_length=n_template + 2)


def test_token_level_pairs_assemble_like_the_prompt(decoder):
    """Field tokens put into the prompt's own tokens give exactly ``encode``'s batch (ids, mask,
    parts; both padding sides), so token-level perturbations run on the prompt users score."""
    from patching import AlignedPairs, PairBuilder

    _, model, _, _ = decoder
    queries = [model.field_tokens(q, "query") for q in QUERIES]
    documents = [model.field_tokens(d) for d in DOCUMENTS]
    before = model.padding_side
    try:
        for side in ("right", "left"):
            model.padding_side = side
            built = model.batch_from_tokens(queries, documents)
            batch = model.encode(QUERIES, DOCUMENTS)
            for name in ("input_ids", "attention_mask", "parts"):
                assert torch.equal(getattr(built, name), getattr(batch, name)), (side, name)
    finally:
        model.padding_side = before
    assert model.n_special == int(((batch.parts != int(Part.QUERY)) & (batch.parts !=
        int(Part.DOCUMENT)) & (batch.parts != int(Part.PAD)))[0].sum())  # fmt: skip
    builder = PairBuilder(
        model.tokenizer, max_length=model.n_special + 40, n_special=model.n_special,
        tokenize=model.field_tokens,
    )  # fmt: skip
    pair = builder.tfc1(QUERIES[0], DOCUMENTS[0], pair_id="p", term="cat")
    aligned = AlignedPairs.from_pairs([pair], model.tokenizer, model=model)
    assert torch.equal(aligned.clean.parts, aligned.corrupted.parts)
    clean_doc = aligned.clean.input_ids[0][aligned.clean.parts[0] == int(Part.DOCUMENT)]
    assert model.tokenizer.decode(clean_doc) == " " + DOCUMENTS[0] + " cat"
    with pytest.raises(ValueError, match="pair 0: the query has"):
        model.batch_from_tokens(queries[:1], documents[:1], max_length=model.n_special + 2)


def test_template_instruction_and_answers_are_options(decoder_dirs):
    directory = decoder_dirs("qwen3")
    model = load_cross_encoder(
        directory, device="cpu", template="<|im_start|>Q: {query} D: {document} ok?",
        answer_tokens=("no", "yes"),
    )  # fmt: skip
    assert model.prompt.instruction is None and model.prompt.answer_tokens == ("no", "yes")
    batch = model.encode(QUERIES[:1], DOCUMENTS[:1])
    assert not (batch.parts == int(Part.INSTRUCTION)).any()
    assert model.tokenizer.decode(batch.input_ids[0]).startswith("<|im_start|>Q: what cat runs")
    swapped = load_cross_encoder(directory, device="cpu", template=model.prompt.template)
    torch.testing.assert_close(model.score(batch), -swapped.score(batch), atol=ATOL, rtol=0)
    custom = load_cross_encoder(directory, device="cpu", instruction="find cats")
    text = custom.tokenizer.decode(custom.encode(QUERIES[:1], DOCUMENTS[:1]).input_ids[0])
    assert "<Instruct>: find cats\n<Query>: what cat runs" in text
    with pytest.raises(ValueError, match="no {instruction} field"):
        load_cross_encoder(directory, device="cpu", template="{query} {document}", instruction="x")
    with pytest.raises(ValueError, match="{query} must come before {document}"):
        load_cross_encoder(directory, device="cpu", template="{document} {query}")
    with pytest.raises(ValueError, match="answer token 'yes please' is .* tokens"):
        load_cross_encoder(directory, device="cpu", answer_tokens=("yes please", "no"))
    with pytest.raises(ValueError, match="answer_tokens: a .*ForSequenceClassification"):
        load_cross_encoder(decoder_dirs("llama-seqcls"), device="cpu", answer_tokens=("a", "b"))


# ------------------------------------------------------------------ direction ablation
@pytest.mark.parametrize("mode", ["zero", "renormalize"])
@pytest.mark.parametrize(
    "attending,attended,layers",
    [
        ((Part.DOCUMENT,), (Part.QUERY,), [0, 1]),
        ((Part.SEP2,), tuple(Part)[:5], [1]),  # the suffix reads nothing: all-removed rows
        ((Part.QUERY, Part.SEP1), (Part.INSTRUCTION, Part.CLS), [0]),
    ],
)
def test_direction_ablation_matches_hf_with_masked_attention(
    decoder, monkeypatch, attending, attended, layers, mode
):
    name, model, hf, batch = decoder
    if Part.INSTRUCTION in attended and model.prompt.instruction is None:
        attended = (Part.CLS,)
    keep = hand_keep(batch, [int(p) for p in attending], [int(p) for p in attended])
    oracle = masked_eager_attention({layer: keep for layer in layers}, mode)
    monkeypatch.setattr(sys.modules[type(hf).__module__], "eager_attention_forward", oracle)
    expected = hf_scores(hf, model, batch)
    hooks = direction_ablation_hooks(
        model, attending=attending, attended=attended, layers=layers, mode=mode
    )
    got = model.score(batch, hooks=hooks)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    assert not torch.allclose(got, model.score(batch), atol=1e-4), "ablation had no effect"


def test_document_to_query_changes_the_score_and_query_to_document_is_refused(decoder):
    _, model, _, batch = decoder
    hooks = direction_ablation_hooks(model, attending="document", attended="query", layers="all")
    assert not torch.allclose(model.score(batch, hooks=hooks), model.score(batch), atol=1e-4)
    with pytest.raises(ValueError, match=r"^direction QUERY->DOCUMENT cannot exist in .*causal"):
        direction_ablation_hooks(model, attending="query", attended="document", layers="all")
    for group in ("query_to_document", "no_interaction"):
        with pytest.raises(ValueError, match="QUERY->DOCUMENT cannot exist"):
            direction_ablation_hooks(model, directions=group)
    with pytest.raises(ValueError, match="ablate SEP2->DOCUMENT instead"):
        direction_ablation_hooks(model, attending="document", attended="suffix", mode="zero")
    # a direction of which some attention exists is not refused (query reads query)
    direction_ablation_hooks(model, attending="query", attended=["query", "document"])


def test_instruction_directions_follow_the_prompt_order(qwen3, decoder_dirs):
    model, _, _ = qwen3
    with pytest.raises(ValueError, match="INSTRUCTION->QUERY cannot exist"):
        direction_ablation_hooks(model, attending="instruction", attended="query")
    direction_ablation_hooks(model, attending="prefix", attended="instruction")  # "\n<Query>: "
    plain = load_cross_encoder(decoder_dirs("qwen3"), device="cpu", template="{query}|{document}")
    with pytest.raises(ValueError, match="prompt has no INSTRUCTION tokens"):
        direction_ablation_hooks(plain, attending="document", attended="instruction")


# ------------------------------------------------------------------ heads and neurons
def hf_surgered(hf):
    return copy.deepcopy(hf)


def test_head_knockout_with_grouped_heads_equals_hf_weight_surgery(decoder):
    """Knocking out a query head leaves the other head of its key/value group intact."""
    _, model, hf, batch = decoder
    heads = [(0, 1), (1, 2)]
    got = model.score(batch, hooks=head_knockout_hooks(model, heads=["0/1", "L1H2"]))
    surgered = hf_surgered(hf)
    d = model.cfg.d_head
    with torch.no_grad():
        for layer, h in heads:
            surgered.model.layers[layer].self_attn.o_proj.weight[:, h * d : (h + 1) * d] = 0
    torch.testing.assert_close(got, hf_scores(surgered, model, batch), atol=ATOL, rtol=0)
    assert not torch.allclose(got, model.score(batch), atol=1e-4)


def test_neuron_ablation_equals_hf_weight_surgery(decoder):
    _, model, hf, batch = decoder
    neurons = {0: [1, 5, 40], 1: [0, 7]}
    got = model.score(batch, hooks=neuron_ablation_hooks(model, neurons=neurons))
    surgered = hf_surgered(hf)
    with torch.no_grad():
        for layer, idx in neurons.items():
            surgered.model.layers[layer].mlp.down_proj.weight[:, idx] = 0
    torch.testing.assert_close(got, hf_scores(surgered, model, batch), atol=ATOL, rtol=0)
    assert not torch.allclose(got, model.score(batch), atol=1e-5)


def test_key_value_heads_cannot_be_selected_one_query_head_at_a_time(qwen3):
    model, _, batch = qwen3
    _, cache = model.run_with_cache(batch)
    assert cache["blocks.0.attn.hook_k"].shape[2] == 2  # n_key_value_heads
    with pytest.raises(ValueError, match="site 'k' has 2 key/value heads shared by 4 query heads"):
        patch_hooks(model, cache, "k", units=["0/1"])
    hooks = patch_hooks(model, cache, "v")  # every head: defined
    torch.testing.assert_close(model.score(batch, hooks=hooks), model.score(batch))


# ------------------------------------------------------------------ circuits
def test_qk_svd_equals_the_naive_reference(decoder):
    _, model, _, _ = decoder
    fast = circuits.qk_svd(model, dtype=torch.float64)
    ref = circuits.qk_svd_reference(model, dtype=torch.float64)
    torch.testing.assert_close(fast.S, ref.S, atol=1e-10, rtol=1e-8)
    table = circuits.qk_alignment(model, dtype=torch.float64)
    assert len(table) == model.cfg.n_layers * model.cfg.n_heads


def test_qk_circuit_gives_the_attention_score_at_distance_zero(decoder):
    """The diagonal of ``hook_attn_scores`` (a token with itself: rotation cancels) equals
    ``x W_QK x^T`` plus the bias terms, over ``sqrt(d_head)``, with ``x`` the layer's normed
    input; with QK-norm (Qwen3) divided by ``rms(q) rms(k)`` of the un-normed ``hook_q``/``hook_k``.
    Grouped key/value heads: each query head reads its group's keys."""
    _, model, _, batch = decoder
    names = lambda n: n.endswith(("hook_attn_scores", "hook_q", "hook_k", "ln1.hook_normalized"))  # noqa: E731
    with torch.no_grad():
        _, cache = model.run_with_cache(batch, names_filter=names)
        qk = model.QK.AB.double()  # [layer, head, d_model, d_model]
        bias = circuits.qk_bias_terms(model)
    real = batch.attention_mask.bool()
    eps = model.cfg.eps
    group = model.cfg.n_heads // (model.cfg.n_key_value_heads or model.cfg.n_heads)
    for layer, block in enumerate(model.blocks):
        x = (cache[f"blocks.{layer}.ln1.hook_normalized"] * block.ln1.w).double()[real]
        scores = cache[f"blocks.{layer}.attn.hook_attn_scores"].diagonal(dim1=-2, dim2=-1)
        want = torch.einsum("nm,hmk,nk->nh", x, qk[layer], x)
        want = (
            want + x @ bias["key_bias"][layer].double().T + x @ bias["query_bias"][layer].double().T
        )
        want = want + bias["constant"][layer].double()
        if model.cfg.use_qk_norm:
            q = cache[f"blocks.{layer}.attn.hook_q"].double()[real]
            k = cache[f"blocks.{layer}.attn.hook_k"].double()[real].repeat_interleave(group, 1)
            rms = lambda t: (t.pow(2).mean(-1) + eps).sqrt()  # noqa: E731
            want = want / (rms(q) * rms(k))
        want = want / model.cfg.d_head**0.5
        torch.testing.assert_close(
            scores.transpose(1, 2)[real].double(), want, atol=1e-4, rtol=1e-4
        )


def test_token_embeddings_are_what_layer_zero_sees(qwen3):
    model, _, batch = qwen3
    with torch.no_grad():
        _, cache = model.run_with_cache(batch, names_filter="hook_full_embed")
    table = circuits.token_embeddings(model, position=3)
    torch.testing.assert_close(table[batch.input_ids[1, 7]], cache["hook_full_embed"][1, 7])


# ------------------------------------------------------------------ precision and memory
def test_bf16_scores_close_to_fp32(decoder_dirs, qwen3):
    model, _, batch = qwen3
    half = load_cross_encoder(decoder_dirs("qwen3"), device="cpu", dtype=torch.bfloat16)
    assert half.W_E.dtype == torch.bfloat16 and half.classifier.W.dtype == torch.bfloat16
    got = half.score(batch)
    assert got.dtype == torch.float32 and got.isfinite().all()
    torch.testing.assert_close(got, model.score(batch), atol=0.1, rtol=0.05)


def test_weights_are_views_of_one_copy(qwen3):
    """Each TransformerLens weight is a view of the Hugging Face tensor it was read from (no
    copy is made when loading, none in the forward pass: ``W_Q`` rearranged back is
    contiguous)."""
    model, _, _ = qwen3
    attn, mlp = model.blocks[0].attn, model.blocks[0].mlp
    assert not attn.W_Q.is_contiguous() and attn.W_Q.permute(0, 2, 1).is_contiguous()
    assert attn._W_K.permute(0, 2, 1).is_contiguous()
    assert attn.W_O.permute(2, 0, 1).is_contiguous()
    assert mlp.W_gate.T.is_contiguous() and mlp.W_out.T.is_contiguous()
    assert not any(p.is_meta for p in model.parameters())
    assert model.classifier.W.shape == (model.cfg.d_model, 2)  # no vocabulary-sized head
    assert not hasattr(model, "unembed")


# ------------------------------------------------------------------ NIG, patching, matching
def corrupted(model, batch):
    """Clean pairs and the same pairs with every document token replaced by the first query
    token (same lengths and parts: aligned)."""
    from patching import AlignedPairs

    ids = batch.input_ids.clone()
    doc = batch.parts == int(Part.DOCUMENT)
    first_query = batch.input_ids[torch.arange(len(batch)), (batch.parts == 1).int().argmax(1)]
    ids[doc] = first_query[:, None].expand_as(ids)[doc]
    bad = type(batch)(ids, batch.token_type_ids, batch.attention_mask, batch.parts)
    return AlignedPairs.from_batches(batch, bad)


@pytest.mark.parametrize("path", ["input", "activation"])
def test_nig_batched_equals_naive_reference(decoder, path):
    from mechir.attribution import (
        neuron_integrated_gradients,
        neuron_integrated_gradients_reference,
    )

    _, model, _, batch = decoder
    kwargs = dict(n_steps=4, path=path, method="gauss_legendre", aggregate="part")
    got = neuron_integrated_gradients(model, batch, max_batch=5, **kwargs)
    want = neuron_integrated_gradients_reference(model, batch, **kwargs)
    scale = want.attributions.abs().max()
    assert scale > 0
    assert (got.attributions - want.attributions).abs().max() <= 1e-5 * scale
    torch.testing.assert_close(got.scores, want.scores, atol=ATOL, rtol=0)
    torch.testing.assert_close(got.unexplained, want.unexplained, atol=ATOL * 10, rtol=0)
    torch.testing.assert_close(got.scores, model.score(batch), atol=ATOL, rtol=0)


@pytest.mark.parametrize("target", ["resid", "heads", "neurons", "pattern", "pooled"])
def test_patching_sweep_batched_equals_per_cell(decoder, target):
    from patching import (
        head_target,
        neuron_target,
        patch_sweep,
        patch_sweep_reference,
        pattern_target,
        pooled_target,
        resid_target,
    )

    _, model, _, batch = decoder
    target = {
        "resid": resid_target("resid_pre"),
        "heads": head_target(by="part"),
        "neurons": neuron_target({1: [0, 3, 9]}),
        "pattern": pattern_target(heads=["1/1"]),
        "pooled": pooled_target(),
    }[target]
    pairs = corrupted(model, batch[:3])
    fast = patch_sweep(model, pairs, target, batch_size=5, progress=False)
    ref = patch_sweep_reference(model, pairs, target)
    assert fast.dims == ref.dims and fast.coords == ref.coords
    torch.testing.assert_close(fast.patched, ref.patched, atol=ATOL, rtol=0, equal_nan=True)
    torch.testing.assert_close(fast.clean, model.score(batch[:3]), atol=ATOL, rtol=0)
    assert fast.patched.isfinite().any()


def test_path_patching_through_queries_and_grouped_keys_refused(decoder):
    from patching import path_patch, path_patch_reference

    _, model, _, batch = decoder
    pairs = corrupted(model, batch[:2])
    fast = path_patch(model, pairs, ["1/0", "1/3"], channels=("q",))
    ref = path_patch_reference(model, pairs, ["1/0", "1/3"], channels=("q",))
    torch.testing.assert_close(fast.patched, ref.patched, atol=ATOL, rtol=0, equal_nan=True)
    for channels in (("k",), ("q", "v")):
        with pytest.raises(ValueError, match="grouped-query attention.*channels=\\('q',\\)"):
            path_patch(model, pairs, ["1/0"], channels=channels)


def test_attribution_patching_refusals(qwen3):
    from patching import attribution_patch, head_target, qk_target

    model, _, batch = qwen3
    pairs = corrupted(model, batch[:2])
    heads = attribution_patch(model, pairs, head_target(by="part"))
    assert heads.patched.isfinite().all()
    with pytest.raises(ValueError, match="hook_k has 2 key/value heads shared by 4 query heads"):
        attribution_patch(model, pairs, qk_target("k"))
    with pytest.raises(ValueError, match="QK-norm.*atp_star=False"):
        attribution_patch(model, pairs, qk_target("q"))
    plain = attribution_patch(model, pairs, qk_target("q"), atp_star=False)
    assert plain.patched.isfinite().all()


@pytest.mark.parametrize("name", ["qwen2", "llama-seqcls", "mistral"])
def test_atp_star_on_rotary_queries_is_exact_on_a_linear_tail(decoder_dirs, name):
    """AtP* rotates q, k and the patched difference with the attention's rotary tables: exact
    when the score is affine in the last layer's pattern (no MLP, an affine final norm)."""
    from patching import attribution_patch, patch_sweep, qk_target

    model = load_cross_encoder(decoder_dirs(name), device="cpu")
    with torch.no_grad():
        model.blocks[-1].mlp.W_out.zero_()
    model.ln_final.forward = lambda x: x * model.ln_final.w
    pairs = corrupted(model, model.encode(QUERIES, DOCUMENTS)[:3])
    target = qk_target("q", by="part", heads=["1/0", "1/3"])
    exact = patch_sweep(model, pairs, target, progress=False)
    approx = attribution_patch(model, pairs, target, batch_size=2)
    scale = max(1.0, float(exact.patched.nan_to_num().abs().max()))
    torch.testing.assert_close(
        approx.patched, exact.patched, atol=1e-5 * scale, rtol=0, equal_nan=True
    )
    effect = exact.patched - exact.corrupted.view(-1, *[1] * (exact.patched.dim() - 1))
    assert effect.nan_to_num().abs().max() > 1e-3


def test_guided_top_cells_are_the_sweeps_top_cells(qwen3):
    """Verified cells hold the sweep's exact score changes; with a wide safety margin the top 3
    of each pair is the sweep's top 3; 'certified' only where every cell was patched exactly."""
    from patching import head_target, patch_sweep, patch_top_cells

    model, _, batch = qwen3
    pairs = corrupted(model, batch[:2])
    target = head_target(by="part")
    top = patch_top_cells(model, pairs, target, k=3, rtol=10.0, progress=False)
    sweep = patch_sweep(model, pairs, target, progress=False)
    effect = (sweep.patched - sweep.corrupted.view(-1, 1, 1, 1)).nan_to_num()
    for i in range(len(pairs)):
        verified = top.verified[i]
        assert bool(top.certified[i]) == bool(verified.all())
        assert verified.any()
        torch.testing.assert_close(top.exact[i][verified], effect[i][verified], atol=ATOL, rtol=0)
        best = effect[i].abs().flatten().topk(3).indices
        assert top.top[i].tolist() == best.tolist()


def test_attention_statistics_equal_the_naive_reference(qwen3):
    from mechir.matching import attention_statistics, attention_statistics_reference

    model, _, batch = qwen3
    fast = attention_statistics(model, batch, batch_size=3)
    ref = attention_statistics_reference(model, batch)
    for name, value in fast.values.items():
        torch.testing.assert_close(value, ref.values[name], atol=1e-5, rtol=0, equal_nan=True)
    assert (fast.values["qd_mass"] == 0).all()  # causal: no query reads the doc
    assert (fast.values["dq_mass"] > 0).all()
