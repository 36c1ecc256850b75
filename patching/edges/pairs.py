"""Clean/corrupted pairs whose *query* is corrupted: its content words replaced by filler tokens.

:class:`patching.PerturbedPair` perturbs documents (its query is shared by the clean and the
corrupted input); edge circuits of relevance also need the other direction, "query words
replaced": every word piece of the query's content words (the words
:meth:`patching.PairBuilder.candidate_terms` accepts: not stopwords, at least two characters with
a letter) becomes the filler token, so the corrupted input has the same length, parts and token
types as the clean one (aligned token for token) and keeps only the query's function words.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from mechir.parts import cross_encoder_batch_from_tokens, pair_layout_of
from patching.perturbations import STOPWORDS, AlignedPairs, PairBuilder, is_content_word


def replace_query_words(
    tokenizer: Any,
    items: Iterable[Any],
    *,
    max_length: int = 512,
    filler: str | int = "a",
    stopwords: frozenset[str] = STOPWORDS,
    qrels: Mapping[str, Mapping[str, int]] | None = None,
) -> tuple[AlignedPairs, dict[str, str]]:
    """``(pairs, skipped)``: the candidates with their query's content words replaced.

    Args:
        tokenizer: a fast Hugging Face tokenizer (offsets map word pieces to words).
        items: ``Pair``-like objects (``qid``, ``docid``, ``query``, ``document``), e.g.
            ``collection.candidates()``; pair ids are ``"qid:docid"``.
        max_length: the model input length (documents are cut to fit).
        filler: the replacement token (a one-token word or a token id).
        qrels: relevance judgments for the grades (0 when unjudged).

    Returns:
        Aligned pairs (clean = the real query) and, per skipped pair id, why (a query without a
        content word, or an empty document).
    """
    builder = PairBuilder(tokenizer, max_length=max_length, filler=filler, stopwords=stopwords)
    filler_id = builder.filler_id
    layout = pair_layout_of(tokenizer)
    queries, clean_q, corrupted_q, docs, ids, grades = [], [], [], [], [], []
    skipped: dict[str, str] = {}
    for item in items:
        pair_id = f"{item.qid}:{item.docid}"
        enc = tokenizer(item.query, add_special_tokens=False, return_offsets_mapping=True)
        q_ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
        spans = [
            m.span()
            for m in re.finditer(r"\w+", item.query)
            if m.group().lower() not in stopwords and is_content_word(m.group().lower())
        ]
        replaced = [
            filler_id if any(a < e and s < b for a, b in spans) else t
            for t, (s, e) in zip(q_ids, offsets)
        ]
        doc = list(tokenizer(item.document, add_special_tokens=False)["input_ids"])
        room = max_length - layout.n_special - len(q_ids)
        if replaced == q_ids:
            skipped[pair_id] = f"the query {item.query!r} has no content word to replace"
            continue
        if not doc or room < 1:
            skipped[pair_id] = "empty document, or no room for it next to the query"
            continue
        queries.append(item.query)
        clean_q.append(q_ids)
        corrupted_q.append(replaced)
        docs.append(doc[:room])
        ids.append(pair_id)
        grade = None if qrels is None else int(qrels.get(str(item.qid), {}).get(str(item.docid), 0))
        grades.append(grade)
    if not ids:
        raise ValueError(
            f"no pair could be built ({len(skipped)} skipped, e.g. "
            f"{next(iter(skipped.values()), 'no candidates given')})"
        )
    common = dict(
        cls_token_id=tokenizer.cls_token_id,
        sep_token_id=tokenizer.sep_token_id,
        pad_token_id=tokenizer.pad_token_id,
        layout=layout,
        max_length=max(len(q) + len(d) for q, d in zip(clean_q, docs)) + layout.n_special,
    )
    clean = cross_encoder_batch_from_tokens(clean_q, docs, **common)
    corrupted = cross_encoder_batch_from_tokens(corrupted_q, docs, **common)
    return AlignedPairs(clean, corrupted, ids, grades), skipped


__all__ = ["replace_query_words"]
