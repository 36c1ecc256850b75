"""Decoder rerankers' prompt defaults, as data: Qwen3-Reranker's and RankLLaMA's templates, the
default instruction and answers, and the prompt style (the prompt machinery of every
prompt-based reranker is :mod:`mechir.models.prompt`).
"""

from __future__ import annotations

from dataclasses import replace

from mechir.models.prompt import Prompt, PromptStyle

#: Qwen3-Reranker's prompt (system prompt, instruction, query, document, and the assistant turn
#: with the empty think block), as its model card builds it.
QWEN3_RERANKER_TEMPLATE = (
    "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query "
    'and the Instruct provided. Note that the answer can only be "yes" or "no".<|im_end|>\n'
    "<|im_start|>user\n<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {document}"
    "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
)
#: Qwen3-Reranker's default instruction.
DEFAULT_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"
#: The default prompt of ``*ForSequenceClassification`` decoders (RankLLaMA's input format).
RANKLLAMA_TEMPLATE = "{bos}query: {query} document: {document}{eos}"
#: The default answers of yes/no rerankers: (relevant, non-relevant).
DEFAULT_ANSWERS = ("yes", "no")
#: Decoder templates may hold every field (``{instruction}``, ``{bos}``, ``{eos}`` too) and
#: write their special tokens themselves (the tokenizer adds none); an answer is the vocabulary
#: entry of its word where there is one (Qwen3-Reranker's ``convert_tokens_to_ids("yes")``).
#: Batches are right-padded unless the model's ``padding_side`` says left.
DECODER_STYLE = PromptStyle(
    "decoder rerankers", add_special_tokens=False, answers_from_vocabulary=True
)


def decoder_prompt(
    template: str,
    instruction: str | None = None,
    answer_tokens: tuple[str, str] | None = None,
    family: str | None = None,
) -> Prompt:
    """A decoder reranker's :class:`~mechir.models.prompt.Prompt` (``family`` names it in
    messages; answers None for a classifier head).

    Raises:
        ValueError: a template that breaks the rules of :class:`~mechir.models.prompt.Prompt`,
            an instruction without its field or a field without its instruction (one line).
    """
    style = DECODER_STYLE if family is None else replace(DECODER_STYLE, family=family)
    return Prompt(template, instruction, answer_tokens, style)


__all__ = [
    "DECODER_STYLE",
    "DEFAULT_ANSWERS",
    "DEFAULT_INSTRUCTION",
    "QWEN3_RERANKER_TEMPLATE",
    "RANKLLAMA_TEMPLATE",
    "decoder_prompt",
]
