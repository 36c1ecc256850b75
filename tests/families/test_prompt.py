"""The one prompt module of prompt-based rerankers (:mod:`mechir.models.prompt`): the part rule,
the pair checks and the padding id on hand-made prompts whose answer is written out; then the
same cases (the cut at the limit, the instruction field, straddling tokens, empty fields,
answers, padding, bad templates) run through every family's prompt (MonoT5's and the decoders',
each with a tiny tokenizer of its kind)."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest

from mechir.models.decoder_prompt import decoder_prompt
from mechir.models.prompt import encode_prompts, pad_token_id, token_parts
from mechir.models.t5_prompt import monot5_prompt
from mechir.parts import Part, pair_lists
from tests.families.builders import chat_bpe_tokenizer, llama_bpe_tokenizer, t5_tokenizer
from tests.helpers import DOCUMENTS, QUERIES

C, Q, S1, D, S2, INS = (int(p) for p in (Part.CLS, Part.QUERY, Part.SEP1, Part.DOCUMENT,
                                       Part.SEP2, Part.INSTRUCTION))  # fmt: skip


def _spans(text: str, **fields: str) -> dict[str, tuple[int, int]]:
    return {
        name: (text.index(value), text.index(value) + len(value)) for name, value in fields.items()
    }


def _offsets(text: str, tokens: list[str]) -> list[tuple[int, int]]:
    """Character spans of ``tokens`` read left to right in ``text`` ("" = a special token)."""
    out, at = [], 0
    for token in tokens:
        if not token:
            out.append((0, 0))
            continue
        start = text.index(token, at)
        out.append((start, start + len(token)))
        at = start + len(token)
    return out


def test_monot5_prompt_with_its_added_end_token():
    text = "Query: cat food Document: cats eat meat Relevant:"
    tokens = ["Query", ":", "cat", "food", "Document", ":", "cats", "eat", "meat", "Relevant",
              ":", ""]  # fmt: skip
    parts = token_parts(
        _offsets(text, tokens), _spans(text, query="cat food", document="cats eat meat")
    )
    assert parts == [C, C, Q, Q, S1, S1, D, D, D, S2, S2, S2]  # </s>: the suffix it follows


def test_decoder_prompt_with_an_instruction_and_special_tokens_in_the_text():
    text = "<s>Instruct: judge\nQuery: cat\nDocument: a cat</s>"
    tokens = ["<s>", "Instruct", ":", " judge", "\n", "Query", ":", " cat", "\n", "Document", ":",
              " a", " cat", "</s>"]  # fmt: skip
    spans = _spans(text, instruction="judge", query="cat\n", document="a cat")
    spans["query"] = (text.index(" cat") + 1, text.index(" cat") + 4)
    parts = token_parts(_offsets(text, tokens), spans)
    assert parts == [C, C, C, INS, C, C, C, Q, S1, S1, S1, D, D, S2]


def test_a_token_straddling_a_field_belongs_to_the_field_document_first():
    # the prompt "q:ab|d:cd." with query "ab" and document "cd"
    spans = {"query": (2, 4), "document": (7, 9)}
    # "b|" straddles the query's end, "d." the document's; ":c" straddles the document's start
    assert token_parts([(0, 2), (2, 3), (3, 5), (5, 6), (6, 8), (8, 10)], spans) == [
        C, Q, Q, S1, D, D,
    ]  # fmt: skip
    # one token over the whole middle touches query and document: the document wins
    assert token_parts([(0, 2), (3, 8), (8, 10)], spans) == [C, D, D]


def test_character_less_tokens_take_the_gap_they_sit_in():
    spans = {"query": (2, 4), "document": (6, 8)}
    assert token_parts([(0, 0), (2, 4), (0, 0), (6, 8), (0, 0)], spans) == [C, Q, S1, D, S2]


def test_an_empty_instruction_takes_no_token():
    spans = {"instruction": (3, 3), "query": (5, 7), "document": (9, 11)}
    assert token_parts([(0, 4), (5, 7), (9, 11)], spans) == [C, Q, D]


def test_pair_lists():
    assert pair_lists("q", "d") == (["q"], ["d"])
    assert pair_lists(["a", "b"], ("c", "d")) == (["a", "b"], ["c", "d"])
    with pytest.raises(ValueError, match="got 2 queries but 1 documents"):
        pair_lists(["a", "b"], ["c"])
    with pytest.raises(ValueError, match="empty batch"):
        pair_lists([], [])
    with pytest.raises(ValueError, match="pair 1: the document is empty"):
        pair_lists(["a", "b"], ["c", "  "])


def test_pair_lists_refuses_a_non_string(unchecked_shapes):
    with pytest.raises(ValueError, match="pair 0: the query is int"):
        pair_lists([3], ["c"])


@pytest.mark.parametrize(
    ("pad", "eos", "expected"), [(5, 7, 5), (None, 7, 7), (None, None, 0), (0, 7, 0)]
)
def test_pad_token_id(pad, eos, expected):
    assert pad_token_id(SimpleNamespace(pad_token_id=pad, eos_token_id=eos)) == expected


# ------------------------------------------------------------------ the same cases, every family
#: A prompt-based family: its tokenizer (a tiny one of its kind) and how it makes its prompt
#: from (template, instruction, answers), with the family's own style.
FAMILIES = {
    "monot5": (t5_tokenizer, lambda t, i=None, a=("true", "false"): monot5_prompt(t, a)),
    "qwen": (chat_bpe_tokenizer, lambda t, i=None, a=("yes", "no"): decoder_prompt(t, i, a)),
    "llama": (llama_bpe_tokenizer, lambda t, i=None, a=("yes", "no"): decoder_prompt(t, i, a)),
}
TEMPLATE = "Query: {query} Document: {document} Relevant:"


@pytest.fixture(scope="module", params=tuple(FAMILIES))
def family(request):
    """``(name, tokenizer, make_prompt)`` for each prompt-based family."""
    make_tokenizer, make_prompt = FAMILIES[request.param]
    return request.param, make_tokenizer(), make_prompt


def _row(batch, i: int = 0) -> tuple[list[int], list[int]]:
    keep = batch.attention_mask[i].bool()
    return batch.input_ids[i][keep].tolist(), batch.parts[i][keep].tolist()


def _own_encoding(tok, prompt, query: str, document: str) -> list[int]:
    text, _ = prompt.render(query, document, tok)
    return list(tok(text, add_special_tokens=prompt.style.add_special_tokens)["input_ids"])


def test_ids_are_the_tokenizers_encoding_of_the_rendered_prompt(family):
    _, tok, make = family
    prompt = make(TEMPLATE)
    batch = encode_prompts(tok, prompt, QUERIES, DOCUMENTS, max_length=512)
    for i, (q, d) in enumerate(zip(QUERIES, DOCUMENTS)):
        ids, parts = _row(batch, i)
        assert ids == _own_encoding(tok, prompt, q, d)
        text = {p: tok.decode([t for t, x in zip(ids, parts) if x == p]).strip() for p in (Q, D)}
        assert text == {Q: q, D: d}
        runs = [p for k, p in enumerate(parts) if k == 0 or parts[k - 1] != p]
        assert runs == [C, Q, S1, D, S2]


def test_the_document_is_cut_from_its_end_to_the_limit(family):
    """Every limit from one document token to the whole prompt: the prompt fills the limit
    exactly (every test word is one token), the kept document tokens are the first ones, the
    template after the document is kept, and the ids are the tokenizer's own encoding."""
    _, tok, make = family
    prompt = make(TEMPLATE)
    query, document = QUERIES[0], DOCUMENTS[2]
    full_ids, full_parts = _row(encode_prompts(tok, prompt, query, document, max_length=512))
    full_doc = [t for t, p in zip(full_ids, full_parts) if p == D]
    n_template = len(full_ids) - len(full_doc)
    for limit in range(n_template + 1, len(full_ids) + 1):
        ids, parts = _row(encode_prompts(tok, prompt, query, document, max_length=limit))
        assert len(ids) == limit
        doc = [t for t, p in zip(ids, parts) if p == D]
        assert doc == full_doc[: len(doc)] and len(doc) == limit - n_template
        after = [t for t, p in zip(ids, parts) if p == S2]
        assert after == [t for t, p in zip(full_ids, full_parts) if p == S2]
        kept = tok.decode(doc).strip()
        assert document.startswith(kept) and ids == _own_encoding(tok, prompt, query, kept)
    with pytest.raises(
        ValueError, match=f"^pair 0: the prompt without its document has {n_template} "
    ):
        encode_prompts(tok, prompt, query, document, max_length=n_template)


def test_the_instruction_field(family):
    """Decoder prompts fill ``{instruction}`` (its tokens are INSTRUCTION; an empty one has no
    token); MonoT5's prompts have no such field."""
    name, tok, make = family
    template = "Instruct: {instruction} " + TEMPLATE
    if name == "monot5":
        with pytest.raises(ValueError, match=r"^template .*MonoT5 prompts have no \{instruction\}"):
            make(template)
        return
    batch = encode_prompts(tok, make(template, "find cats"), QUERIES[:1], DOCUMENTS[:1],
                           max_length=512)  # fmt: skip
    ids, parts = _row(batch)
    assert tok.decode([t for t, p in zip(ids, parts) if p == INS]).strip() == "find cats"
    assert parts.index(INS) < parts.index(Q)
    empty = encode_prompts(tok, make(template, ""), QUERIES[:1], DOCUMENTS[:1], max_length=512)
    assert INS not in _row(empty)[1]
    with pytest.raises(ValueError, match=r"holds \{instruction\}: give the instruction"):
        make(template)
    with pytest.raises(ValueError, match=r"no \{instruction\} field"):
        make(TEMPLATE, "find cats")


def test_a_token_straddling_a_field_and_the_template_belongs_to_the_field(family):
    """``Query: ca{t}`` with query ``"ca"``: the one token ``cat`` holds the query's end and the
    template's ``t``; likewise at the document's end."""
    _, tok, make = family
    prompt = make("Query: {query}t Document: {document}t Relevant:")
    query, document = "ca", "the red ca"
    text, spans = prompt.render(query, document, tok)
    enc = tok(text, add_special_tokens=prompt.style.add_special_tokens,
              return_offsets_mapping=True)  # fmt: skip
    ids, parts = _row(encode_prompts(tok, prompt, query, document, max_length=512))
    assert ids == enc["input_ids"]
    for field, part in (("query", Q), ("document", D)):
        end = spans[field][1]
        straddling = [k for k, (a, b) in enumerate(enc["offset_mapping"]) if a < end < b]
        assert len(straddling) == 1, (field, tok.convert_ids_to_tokens(ids))  # the case exists
        assert parts[straddling[0]] == part
        assert parts[straddling[0] + 1] != part  # the template text after it


@pytest.mark.parametrize("bad", ["", "   ", "\n\t"])
@pytest.mark.parametrize("field", ["query", "document"])
def test_an_empty_or_whitespace_field_is_refused(family, field, bad):
    _, tok, make = family
    queries, documents = list(QUERIES[:2]), list(DOCUMENTS[:2])
    (queries if field == "query" else documents)[1] = bad
    with pytest.raises(ValueError, match=f"^pair 1: the {field} is empty or whitespace only$"):
        encode_prompts(tok, make(TEMPLATE), queries, documents, max_length=512)


def test_answers_by_the_familys_rule(family):
    """MonoT5: the tokenizer's encoding of the word (``true`` is ``▁true``, not the vocabulary
    entry ``true``); decoders: the vocabulary entry of the word where there is one (Qwen3-Reranker's
    ``convert_tokens_to_ids``: ``Ġcat`` is an entry, though ``"Ġcat"`` encodes to more tokens)."""
    name, tok, make = family
    words = ("true", "false") if name == "monot5" else ("Ġcat", "Ġfish")
    ids = make(TEMPLATE, a=words).answer_ids(tok)
    encoded = [tok(w, add_special_tokens=False)["input_ids"] for w in words]
    vocabulary = tuple(tok.convert_tokens_to_ids(list(words)))
    if name == "monot5":
        assert ids == tuple(e[0] for e in encoded) and all(len(e) == 1 for e in encoded)
        assert tok.convert_ids_to_tokens(list(ids)) == ["▁true", "▁false"]
        assert vocabulary != ids
    else:
        assert ids == vocabulary and all(len(e) > 1 for e in encoded)
    assert len(set(ids)) == 2


def test_an_answer_that_is_not_one_token_is_refused(family):
    _, tok, make = family
    with pytest.raises(ValueError, match=r"^answer token 'xqzv' is [2-9] tokens .*single tokens$"):
        make(TEMPLATE, a=("xqzv", "no")).answer_ids(tok)
    with pytest.raises(ValueError, match="give two different answers"):
        make(TEMPLATE, a=("no", "no")).answer_ids(tok)


class _UnknownWordTokenizer:
    """A tokenizer that reads every word as its unknown token (id 3)."""

    unk_token_id = 3

    def convert_tokens_to_ids(self, word):
        return self.unk_token_id

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [self.unk_token_id]}


def test_an_answer_missing_from_the_vocabulary_is_refused(family):
    _, _, make = family
    with pytest.raises(ValueError, match="answer token 'yes' is not in this tokenizer's vocab"):
        make(TEMPLATE, a=("yes", "no")).answer_ids(_UnknownWordTokenizer())


@pytest.mark.parametrize("side", ["right", "left"])
def test_padding_on_either_side(family, side):
    """Each row is the pair's own encoding, padded with the pad id (else EOS) on ``side``."""
    _, tok, make = family
    prompt = make(TEMPLATE)
    batch = encode_prompts(tok, prompt, QUERIES, DOCUMENTS, max_length=512, padding_side=side)
    width = batch.input_ids.shape[1]
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    for i, (q, d) in enumerate(zip(QUERIES, DOCUMENTS)):
        ids, parts = _row(encode_prompts(tok, prompt, q, d, max_length=512))
        n = len(ids)
        real = slice(0, n) if side == "right" else slice(width - n, width)
        padding = slice(n, width) if side == "right" else slice(0, width - n)
        assert batch.input_ids[i, real].tolist() == ids
        assert batch.parts[i, real].tolist() == parts
        assert batch.attention_mask[i, real].all() and not batch.attention_mask[i, padding].any()
        assert (batch.input_ids[i, padding] == pad).all()
        assert (batch.parts[i, padding] == int(Part.PAD)).all()


def test_an_unknown_padding_side_is_refused(family, unchecked_shapes):
    _, tok, make = family
    with pytest.raises(ValueError, match="^padding_side must be 'right' or 'left', got 'top'$"):
        encode_prompts(tok, make(TEMPLATE), QUERIES, DOCUMENTS, max_length=512, padding_side="top")


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("Query: {query} Relevant:", "must hold {query} and {document} once each"),
        ("{query} {query} {document}", "must hold {query} and {document} once each"),
        ("{document} {query}", "{query} must come before {document}"),
        ("{query} {document} {foo}", "prompts have no {foo} slot"),
        ("{query} { {document}", "write {{ and }} for braces"),
    ],
)
def test_bad_templates_are_one_line_errors(family, template, message):
    _, _, make = family
    with pytest.raises(ValueError, match=re.escape(message)) as err:
        make(template)
    assert "\n" not in str(err.value)


def test_a_slow_tokenizer_is_refused(family):
    _, _, make = family
    slow = SimpleNamespace(is_fast=False)
    with pytest.raises(ValueError, match="is a slow tokenizer: .* needs a fast one"):
        encode_prompts(slow, make(TEMPLATE), "q", "d", max_length=512)
