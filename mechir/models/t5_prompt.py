"""MonoT5's prompt defaults, as data: its template, answers, input length and prompt style (the
prompt machinery of every prompt-based reranker is :mod:`mechir.models.prompt`)."""

from __future__ import annotations

from dataclasses import replace

from mechir.models.prompt import Prompt, PromptStyle

#: MonoT5's prompt (Nogueira et al. 2020); ``{query}`` and ``{document}`` are filled in.
DEFAULT_TEMPLATE = "Query: {query} Document: {document} Relevant:"
#: The relevant and the non-relevant answer: the score is ``logit(true) - logit(false)``.
DEFAULT_ANSWERS: tuple[str, str] = ("true", "false")
#: The input length MonoT5 was trained with (T5 has no position table to bound it).
DEFAULT_MAX_LENGTH = 512
#: MonoT5 templates hold the query and the document only; the tokenizer appends ``</s>``; an
#: answer is the tokenizer's encoding of the word (``"▁true"``). Padding is on the right.
MONOT5_STYLE = PromptStyle(
    "MonoT5", fields=("query", "document"), add_special_tokens=True, answers_from_vocabulary=False
)


def monot5_prompt(
    template: str = DEFAULT_TEMPLATE,
    answer_tokens: tuple[str, str] = DEFAULT_ANSWERS,
    family: str = "MonoT5",
) -> Prompt:
    """MonoT5's :class:`~mechir.models.prompt.Prompt` (``family`` names it in messages).

    Raises:
        ValueError: a template without exactly one ``{query}`` before exactly one
            ``{document}``, or with another field (one line).
    """
    style = replace(MONOT5_STYLE, family=family)
    return Prompt(template, None, tuple(answer_tokens), style)  # type: ignore[arg-type]


__all__ = [
    "DEFAULT_ANSWERS",
    "DEFAULT_MAX_LENGTH",
    "DEFAULT_TEMPLATE",
    "MONOT5_STYLE",
    "monot5_prompt",
]
