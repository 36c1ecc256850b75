"""MonoT5 (``T5ForConditionalGeneration``): tiny random checkpoints of T5 v1.0 (ReLU FFN, tied
and scaled output) and v1.1 (gated GELU, own ``lm_head``), saved as directories with an offline
SentencePiece-style tokenizer, against Hugging Face: every hidden state and the score, the
prompt's tokens and parts, the options, and every intervention against a Hugging Face oracle
(attention replaced, weight surgery) or mechir's own naive reference."""

from __future__ import annotations

import copy
import json
import sys

import pytest
import torch

from mechir import Part, circuits, load_cross_encoder
from mechir.hooks import (
    direction_ablation_hooks,
    head_knockout_hooks,
    neuron_ablation_hooks,
    site_hooks,
)
from mechir.hooks.site import Zero
from mechir.interface import HookedReranker
from mechir.models.registry import UnsupportedModelError
from mechir.models.t5 import DEFAULT_TEMPLATE, HookedMonoT5
from mechir.models.t5_blocks import relative_position_bucket
from tests.families.builders import load_hf_t5, t5_tokenizer, tiny_t5_config
from tests.helpers import DOCUMENTS, QUERIES

ATOL = 1e-5


def hf_logits(hf, batch, **kwargs):
    start = torch.full((len(batch), 1), hf.config.decoder_start_token_id)
    with torch.no_grad():
        return hf(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            decoder_input_ids=start,
            **kwargs,
        )


def hf_scores(hf, batch, answers=("true", "false"), tokenizer=None):
    tok = tokenizer or t5_tokenizer()
    yes, no = (tok.convert_tokens_to_ids("▁" + a) for a in answers)
    logits = hf_logits(hf, batch).logits[:, 0]
    return logits[:, yes] - logits[:, no]


# ------------------------------------------------------------------ loading and parity
def test_a_saved_directory_loads_as_monot5(t5):
    variant, model, hf, _ = t5
    assert isinstance(model, HookedMonoT5) and isinstance(model, HookedReranker)
    assert model.family.name == "MonoT5" and model.family.kind == "encoder-decoder"
    assert model.template == DEFAULT_TEMPLATE and model.answer_tokens == ("true", "false")
    assert model.classifier.tied == (variant == "v1.0")
    assert hf.config.scale_decoder_outputs == (variant == "v1.0")


def test_every_hidden_state_and_the_score_match_hf(t5):
    _, model, hf, batch = t5
    assert batch.attention_mask.sum(-1).unique().numel() > 1, "batch must contain padding"
    out = hf_logits(hf, batch, output_hidden_states=True)
    last = model.cfg.n_layers - 1
    encoder = ["hook_full_embed", *(model.block_output_name(i) for i in range(last))]
    encoder.append(model.final_hidden_name)
    decoder = ["hook_decoder_embed", *(f"decoder.{i}.hook_resid_post" for i in range(last))]
    decoder.append("hook_decoder_final")
    with torch.no_grad():
        vocab, cache = model.run_with_cache(batch, return_type="vocab_logits")
    real = batch.attention_mask.bool()
    assert len(out.encoder_hidden_states) == len(encoder)
    for name, want in zip(encoder, out.encoder_hidden_states):
        torch.testing.assert_close(cache[name][real], want[real], atol=ATOL, rtol=1e-5)
    for name, want in zip(decoder, out.decoder_hidden_states):
        got = cache[name] if cache[name].dim() == 3 else cache[name][:, None]
        torch.testing.assert_close(got, want, atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(vocab, out.logits[:, 0], atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(model.score(batch), hf_scores(hf, batch), atol=ATOL, rtol=1e-5)
    yes, no = model.answer_ids
    answers = model(batch, return_type="logits")
    torch.testing.assert_close(answers, out.logits[:, 0][:, [no, yes]], atol=ATOL, rtol=1e-5)


def test_padding_does_not_change_scores(t5):
    _, model, _, batch = t5
    alone = torch.cat([model.score(batch[i]) for i in range(len(batch))])
    torch.testing.assert_close(model.score(batch), alone, atol=ATOL, rtol=0)


@pytest.mark.parametrize("score_type", ["logit", "log_prob", "prob"])
def test_score_types_read_the_two_answer_logits(t5, score_type):
    _, model, hf, batch = t5
    yes, no = model.answer_ids
    logits = hf_logits(hf, batch).logits[:, 0]
    two = torch.stack([logits[:, no], logits[:, yes]], -1)
    want = {
        "logit": two[:, 1],
        "log_prob": two.log_softmax(-1)[:, 1],
        "prob": two.softmax(-1)[:, 1],  # MonoT5's own probability of "true"
    }[score_type]
    model.score_type = score_type
    try:
        torch.testing.assert_close(model.score(batch), want, atol=ATOL, rtol=1e-5)
    finally:
        model.score_type = "binary_logit"


def test_relative_position_buckets_are_hugging_faces():
    from transformers.models.t5.modeling_t5 import T5Attention as HFAttention

    relative = torch.arange(-300, 300)[None]
    for bidirectional in (True, False):
        for buckets, distance in ((32, 128), (8, 12), (16, 20)):
            kw = dict(bidirectional=bidirectional, num_buckets=buckets, max_distance=distance)
            mine = relative_position_bucket(relative, **kw)
            assert torch.equal(mine, HFAttention._relative_position_bucket(relative, **kw))


def test_streaming_load_equals_the_in_memory_conversion(t5, t5_dirs):
    variant, model, hf, batch = t5
    from_memory = load_cross_encoder(hf, tokenizer=model.tokenizer, device="cpu")
    mine, other = model.state_dict(), from_memory.state_dict()
    assert mine.keys() == other.keys() and ("classifier.W_U" in mine) == (variant == "v1.1")
    for name in mine:
        assert torch.equal(mine[name], other[name]), name


def test_bfloat16_scores_follow_float32(t5_dirs):
    directory = t5_dirs("v1.0")
    exact = load_cross_encoder(directory, device="cpu")
    half = load_cross_encoder(directory, device="cpu", dtype=torch.bfloat16)
    assert half.embed.W_E.dtype == torch.bfloat16 and half.cfg.dtype == torch.bfloat16
    batch = exact.encode(QUERIES, DOCUMENTS)
    want, got = exact.score(batch), half.score(batch)
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    torch.testing.assert_close(got, want, atol=0.1 * want.abs().max().item(), rtol=0)
    assert torch.equal(got.argsort(), want.argsort())


# ------------------------------------------------------------------ the prompt and its parts
def test_encode_is_the_tokenizers_encoding_of_the_prompt(t5):
    _, model, _, batch = t5
    texts = [DEFAULT_TEMPLATE.format(query=q, document=d) for q, d in zip(QUERIES, DOCUMENTS)]
    ref = model.tokenizer(texts, padding=True, return_tensors="pt")
    assert torch.equal(batch.input_ids, ref["input_ids"])
    assert torch.equal(batch.attention_mask, ref["attention_mask"])
    assert not batch.token_type_ids.any()


def test_parts_label_the_template_the_query_and_the_document(t5):
    _, model, _, _ = t5
    batch = model.encode(["who eats cats?"], ["a small fish"])
    pieces = model.tokenizer.convert_ids_to_tokens(batch.input_ids[0])
    assert pieces == [
        "▁Query", ":", "▁who", "▁eats", "▁cat", "s", "?", "▁Document", ":", "▁a", "▁small",
        "▁fish", "▁Relevant", ":", "</s>",
    ]  # fmt: skip
    p = [Part.CLS] * 2 + [Part.QUERY] * 5 + [Part.SEP1] * 2 + [Part.DOCUMENT] * 3
    p += [Part.SEP2] * 3  # the suffix, with </s>
    assert batch.parts[0].tolist() == [int(x) for x in p]
    assert batch.mask("prefix").sum() == 2 and batch.mask("suffix").sum() == 3


def test_long_documents_are_cut_and_the_suffix_kept(t5):
    _, model, _, _ = t5
    long_doc = " ".join(["the big red house"] * 20)
    batch = model.encode(["what house"], [long_doc], max_length=24)
    ids = batch.input_ids[0].tolist()
    assert len(ids) <= 24
    pieces = model.tokenizer.convert_ids_to_tokens(ids)
    assert pieces[-3:] == ["▁Relevant", ":", "</s>"]
    n_doc = int(batch.mask("document").sum())
    kept = " ".join(long_doc.split()[:n_doc])
    text = DEFAULT_TEMPLATE.format(query="what house", document=kept)
    assert ids == model.tokenizer(text)["input_ids"]
    with pytest.raises(ValueError, match="pair 0: the prompt without its document has"):
        model.encode([" ".join(["cat"] * 30)], ["a dog"], max_length=24)


def test_template_and_answer_options(t5_dirs):
    directory = t5_dirs("v1.0")
    template = "Question: {query} Passage: {document} Relevant:"
    model = load_cross_encoder(
        directory, device="cpu", template=template, answer_tokens=("yes", "no")
    )
    assert model.template == template and model.answer_tokens == ("yes", "no")
    batch = model.encode(QUERIES, DOCUMENTS)
    texts = [template.format(query=q, document=d) for q, d in zip(QUERIES, DOCUMENTS)]
    assert torch.equal(batch.input_ids, model.tokenizer(texts, padding=True, return_tensors="pt")[
        "input_ids"
    ])  # fmt: skip
    assert batch.mask("query").sum() > 0 and batch.mask("middle").sum() > 0
    want = hf_scores(load_hf_t5(directory), batch, answers=("yes", "no"))
    torch.testing.assert_close(model.score(batch), want, atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize(
    "options,message",
    [
        (dict(instruction="be brief"), "instruction: MonoT5 prompts have no instruction"),
        (dict(template="Query: {query} Relevant:"), "must hold {query} and {document} once"),
        (dict(template="{document} {query}"), "{query} must come before {document}"),
        (dict(template="{instruction} {query} {document}"), "have no {instruction} slot"),
        (dict(answer_tokens=("truest", "false")), "answer token 'truest' is 3 tokens"),
        (dict(score_type="odds"), "unknown score_type 'odds'"),
    ],
)
def test_bad_prompt_options_are_one_line_errors(t5_dirs, options, message):
    with pytest.raises(ValueError, match=message.replace("{", r"\{").replace("}", r"\}")) as err:
        load_cross_encoder(t5_dirs("v1.0"), device="cpu", **options)
    assert "\n" not in str(err.value)


def test_unsupported_t5_checkpoints_are_refused(tmp_path):
    import transformers

    tok = t5_tokenizer()
    config = tiny_t5_config(len(tok))
    config.num_decoder_layers = 1
    hf = transformers.T5ForConditionalGeneration(config)
    with pytest.raises(UnsupportedModelError, match="1 decoder layers for 2 encoder layers"):
        load_cross_encoder(hf, tokenizer=tok, device="cpu")
    encoder_only = transformers.T5EncoderModel(tiny_t5_config(len(tok)))
    encoder_only.save_pretrained(tmp_path / "enc")
    tok.save_pretrained(tmp_path / "enc")
    with pytest.raises(UnsupportedModelError, match="loads 't5' as T5ForConditionalGeneration"):
        load_cross_encoder(tmp_path / "enc", device="cpu")


def test_the_cli_scores_with_the_template_option(t5_dirs, capsys):
    from mechir.cli import main
    from mechir.settings import default_max_length, position_limit

    directory = t5_dirs("v1.0")
    # no position table and the tokenizer's "no limit" placeholder: the model decides (512)
    assert position_limit(directory) is None and default_max_length(directory) is None
    template = "Question: {query} Passage: {document} Relevant:"
    argv = ["score", "--model", str(directory), "--device", "cpu", "--template", template]
    argv += ["--query", "what cat", "--document", "the cat runs"]
    assert main(argv) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    model = load_cross_encoder(directory, device="cpu", template=template)
    expected = model.score(model.encode(["what cat"], ["the cat runs"]))
    assert [r["score"] for r in rows] == expected.tolist()
    default = load_cross_encoder(directory, device="cpu")
    assert rows[0]["score"] != default.score(default.encode(["what cat"], ["the cat runs"]))[0]


# ------------------------------------------------------------------ Hugging Face oracles
def hf_t5_modules(hf, kind):
    """``kind`` ("SelfAttention" of the encoder, "EncDecAttention") attention modules in layer
    order."""
    encoder = kind == "SelfAttention"
    stack = hf.encoder if encoder else hf.decoder
    return [getattr(block.layer[0 if encoder else 1], kind) for block in stack.block]


def masked_t5_attention(keep_of_module, mode):
    """Hugging Face's T5 eager attention with direction ablation: ``keep_of_module[id(m)]`` is
    a ``[batch, query, key]`` 0/1 mask applied after (zero) or before (renormalize) the
    softmax."""

    def attention(module, query, key, value, attention_mask, scaling=1.0, dropout=0.0,
                  position_bias=None, **_):  # fmt: skip
        scores = query @ key.transpose(2, 3) * scaling
        if position_bias is not None:
            scores = scores + position_bias
        if attention_mask is not None:
            if attention_mask.dtype == torch.bool:
                scores = scores.masked_fill(~attention_mask, float("-inf"))
            else:
                scores = scores.masked_fill(attention_mask < -1e30, float("-inf"))
        keep = keep_of_module.get(id(module))
        if keep is not None and mode == "renormalize":
            scores = scores.masked_fill(keep[:, None] == 0, float("-inf"))
        probs = torch.softmax(scores, -1).nan_to_num(0.0)
        if keep is not None and mode == "zero":
            probs = probs * keep[:, None]
        return (probs @ value).transpose(1, 2).contiguous(), probs

    return attention


def keep_mask(batch, attending, attended):
    parts = batch.parts
    rows = torch.isin(parts, torch.tensor(attending))
    cols = torch.isin(parts, torch.tensor(attended))
    return (~(rows[:, :, None] & cols[:, None, :])).float()


@pytest.mark.parametrize("mode", ["zero", "renormalize"])
@pytest.mark.parametrize(
    "attending,attended,layers",
    [
        ((Part.QUERY,), (Part.DOCUMENT,), [0, 1]),
        ((Part.CLS,), tuple(Part)[:5], [1]),  # the prefix reads nothing: all-removed rows
        ((Part.DOCUMENT, Part.SEP2), (Part.QUERY, Part.SEP1), [0]),
    ],
)
def test_direction_ablation_matches_hf_with_masked_attention(
    t5, monkeypatch, attending, attended, layers, mode
):
    _, model, hf, batch = t5
    keep = keep_mask(batch, [int(p) for p in attending], [int(p) for p in attended])
    modules = hf_t5_modules(hf, "SelfAttention")
    oracle = masked_t5_attention({id(modules[i]): keep for i in layers}, mode)
    monkeypatch.setattr(sys.modules[type(hf).__module__], "eager_attention_forward", oracle)
    expected = hf_scores(hf, batch)
    hooks = direction_ablation_hooks(
        model, attending=attending, attended=attended, layers=layers, mode=mode
    )
    got = model.score(batch, hooks=hooks)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    assert not torch.allclose(got, model.score(batch), atol=1e-4), "ablation had no effect"


@pytest.mark.parametrize("mode", ["zero", "renormalize"])
@pytest.mark.parametrize("attended", [("query",), ("document",), ("query", "document")])
def test_decoder_cross_attention_ablation_matches_hf(t5, monkeypatch, attended, mode):
    """``attending="decoder"``: the decoder step no longer reads those encoder tokens."""
    _, model, hf, batch = t5
    cols = batch.mask(attended)  # [batch, key]
    keep = (~cols)[:, None, :].float()  # one decoder step
    modules = hf_t5_modules(hf, "EncDecAttention")
    oracle = masked_t5_attention({id(m): keep for m in modules}, mode)
    monkeypatch.setattr(sys.modules[type(hf).__module__], "eager_attention_forward", oracle)
    expected = hf_scores(hf, batch)
    hooks = direction_ablation_hooks(model, attending="decoder", attended=attended, mode=mode)
    got = model.score(batch, hooks=hooks)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    assert not torch.allclose(got, model.score(batch), atol=1e-4)


def test_direction_ablation_of_the_issue_changes_the_score(t5):
    _, model, _, batch = t5
    hooks = direction_ablation_hooks(model, attending="document", attended="query", layers="all")
    assert not torch.allclose(model.score(batch, hooks=hooks), model.score(batch), atol=1e-4)


def test_encoder_and_cross_directions_compose_in_one_list(t5):
    _, model, _, batch = t5
    both = direction_ablation_hooks(
        model, directions=[("document", "query"), ("decoder", "document")], layers=[1]
    )
    one = direction_ablation_hooks(model, attending="document", attended="query", layers=[1])
    other = direction_ablation_hooks(model, attending="decoder", attended="document", layers=[1])
    assert len(both) == 2
    torch.testing.assert_close(
        model.score(batch, hooks=both), model.score(batch, hooks=one + other), atol=0, rtol=0
    )


def test_decoder_direction_is_refused_where_it_cannot_exist(t5, tmp_path):
    _, model, _, _ = t5
    with pytest.raises(ValueError, match="attended='decoder': the encoder never reads"):
        direction_ablation_hooks(model, attending="query", attended="decoder")
    from tests.helpers import tiny_cross_encoder

    bert, _, _ = tiny_cross_encoder(tmp_path)
    with pytest.raises(ValueError, match="BERT has no decoder reading its input"):
        direction_ablation_hooks(bert, attending="decoder", attended="query")


def test_head_knockout_equals_hf_weight_surgery(t5):
    _, model, hf, batch = t5
    heads = [(0, 1), (1, 2), (1, 3)]
    got = model.score(batch, hooks=head_knockout_hooks(model, heads=["0/1", "1/2", "L1H3"]))
    surgered = copy.deepcopy(hf)
    d = model.cfg.d_head
    with torch.no_grad():
        modules = hf_t5_modules(surgered, "SelfAttention")
        for layer, h in heads:
            modules[layer].o.weight[:, h * d : (h + 1) * d] = 0
    torch.testing.assert_close(got, hf_scores(surgered, batch), atol=ATOL, rtol=0)
    assert not torch.allclose(got, model.score(batch), atol=1e-4)


@pytest.mark.parametrize("site", ["cross_z", "decoder_z"])
def test_decoder_head_knockout_equals_hf_weight_surgery(t5, site):
    _, model, hf, batch = t5
    got = model.score(batch, hooks=site_hooks(model, site, action=Zero(), units=["0/2", "1/0"]))
    surgered = copy.deepcopy(hf)
    d = model.cfg.d_head
    with torch.no_grad():
        for layer, h in [(0, 2), (1, 0)]:
            block = surgered.decoder.block[layer]
            attn = block.layer[1].EncDecAttention if site == "cross_z" else block.layer[0]
            attn = attn if site == "cross_z" else attn.SelfAttention
            attn.o.weight[:, h * d : (h + 1) * d] = 0
    torch.testing.assert_close(got, hf_scores(surgered, batch), atol=ATOL, rtol=0)
    assert not torch.allclose(got, model.score(batch), atol=1e-4)


@pytest.mark.parametrize("stack", ["encoder", "decoder"])
def test_neuron_ablation_equals_hf_weight_surgery(t5, stack):
    _, model, hf, batch = t5
    neurons = {0: [1, 5, 100], 1: [0, 7]}
    if stack == "encoder":
        hooks = neuron_ablation_hooks(model, neurons=neurons)
    else:
        hooks = site_hooks(model, "decoder_neuron", action=Zero(), units=neurons)
    got = model.score(batch, hooks=hooks)
    surgered = copy.deepcopy(hf)
    with torch.no_grad():
        for layer, idx in neurons.items():
            block = getattr(surgered, stack).block[layer]
            block.layer[-1].DenseReluDense.wo.weight[:, idx] = 0
    torch.testing.assert_close(got, hf_scores(surgered, batch), atol=ATOL, rtol=0)
    assert not torch.allclose(got, model.score(batch), atol=1e-6)


# ------------------------------------------------------------------ circuits
def test_qk_alignment_equals_trace_of_hf_query_key_weights(t5):
    _, model, hf, _ = t5
    table = circuits.qk_alignment(model, dtype=torch.float64)
    h, d = model.cfg.n_heads, model.cfg.d_head
    expected = []
    for attn in hf_t5_modules(hf, "SelfAttention"):
        wq, wk = (lin.weight.detach().double().view(h, d, -1) for lin in (attn.q, attn.k))
        expected.append((wq * wk).sum((1, 2)))
    torch.testing.assert_close(
        torch.tensor(table["alignment"].to_numpy()), torch.cat(expected), rtol=1e-10, atol=1e-10
    )
    assert (table["key_bias_norm"] == 0).all()  # T5 attention has no biases


def test_token_embeddings_are_what_layer_zero_sees(t5):
    _, model, _, batch = t5
    with torch.no_grad():
        _, cache = model.run_with_cache(batch, names_filter="hook_full_embed")
    for b, pos in [(0, 0), (0, 2), (1, int(batch.lengths[1]) - 1)]:
        table = circuits.token_embeddings(model, position=pos)
        torch.testing.assert_close(
            table[batch.input_ids[b, pos]], cache["hook_full_embed"][b, pos], atol=0, rtol=0
        )


def test_bare_token_ids_need_a_batch(t5):
    _, model, _, batch = t5
    hooks = direction_ablation_hooks(model, attending="decoder", attended="query")
    with pytest.raises(RuntimeError, match="run it on a CrossEncoderBatch"):
        model.run_with_hooks(batch.input_ids, attention_mask=batch.attention_mask, fwd_hooks=hooks)
    torch.testing.assert_close(
        model(batch.input_ids, attention_mask=batch.attention_mask), model.score(batch)
    )
