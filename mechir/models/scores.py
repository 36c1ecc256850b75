"""What a reranker's score is: the score types every family offers, from its logits.

``"binary_logit"`` (default) the log-odds of relevance: the logit for one label,
``z_rel - logsumexp(z_other)`` for several (``z1 - z0`` for MonoBERT, ``logit(true) -
logit(false)`` for MonoT5, ``logit(yes) - logit(no)`` for yes/no LLM rerankers); ``"logit"`` the
relevant logit alone; ``"log_prob"`` its log-softmax (log-sigmoid for one label); ``"prob"`` its
softmax (sigmoid).
"""

from __future__ import annotations

from typing import Literal

ScoreType = Literal["binary_logit", "logit", "log_prob", "prob"]

SCORE_TYPES: tuple[str, ...] = ("binary_logit", "logit", "log_prob", "prob")
#: The default score: the log-odds of relevance. For one label it is the logit; for two or more it
#: is ``z_rel - logsumexp(z_other)`` (``z1 - z0`` for MonoBERT), which ranks exactly like the
#: softmax probability and, for two labels, is linear in the classifier.
DEFAULT_SCORE_TYPE: ScoreType = "binary_logit"


def check_score_type(value: object) -> ScoreType:
    """``value`` when it is a score type.

    Raises:
        ValueError: anything else (the message lists the score types).
    """
    if value not in SCORE_TYPES:
        raise ValueError(f"unknown score_type {value!r}: choose one of {SCORE_TYPES}")
    return value  # type: ignore[return-value]


__all__ = ["DEFAULT_SCORE_TYPE", "SCORE_TYPES", "ScoreType", "check_score_type"]
