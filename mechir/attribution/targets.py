"""What an attribution explains: the relevance score, or a class logit / probability.

A 1-label cross-encoder's logit ``z`` is read as the log-odds of relevance, i.e. as the two-class
logits ``[0, z]`` (class 1 = relevant, class 0 = non-relevant), so that ``prob`` and
``log_prob`` targets exist for both classes: ``p_relevant = sigmoid(z)``,
``p_non_relevant = sigmoid(-z)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
from jaxtyping import Float
from torch import Tensor

from mechir.interface import HookedReranker

TargetKind = Literal["score", "logit", "prob", "log_prob"]
TARGET_KINDS: tuple[str, ...] = ("score", "logit", "prob", "log_prob")
LabelLike = int | Literal["relevant", "non_relevant"]


@dataclass(frozen=True)
class AttributionTarget:
    """The scalar ``F`` an attribution explains (named apart from patching's ``PatchTarget``, which
    says *where* a patch goes; this says *what* is explained).

    Attributes:
        kind: ``"score"`` (the model's relevance score, as its ``score_type`` says), ``"logit"``,
            ``"prob"`` or ``"log_prob"`` of class ``label``.
        label: ``"relevant"`` (default), ``"non_relevant"`` or a class index (``kind != "score"``).
    """

    kind: TargetKind = "score"
    label: LabelLike = "relevant"

    def __str__(self) -> str:
        return self.kind if self.kind == "score" else f"{self.kind}:{self.label}"


def parse_target(target: AttributionTarget | str) -> AttributionTarget:
    """An :class:`AttributionTarget` from itself or a string ``"kind[:label]"``
    (``"prob:non_relevant"``)."""
    if isinstance(target, AttributionTarget):
        kind, label = target.kind, target.label
    elif isinstance(target, str):
        kind, _, label_text = target.strip().lower().partition(":")
        label_text = label_text.strip().replace("-", "_").replace("nonrelevant", "non_relevant")
        label = int(label_text) if label_text.isdigit() else (label_text or "relevant")
    else:
        raise ValueError(
            f"target must be an AttributionTarget or a string like 'prob:relevant', got {target!r}"
        )
    if kind not in TARGET_KINDS:
        raise ValueError(f"unknown target kind {kind!r}: choose one of {TARGET_KINDS}")
    if not isinstance(label, int) and label not in ("relevant", "non_relevant"):
        raise ValueError(
            f"unknown target label {label!r}: use 'relevant', 'non_relevant' or a class index"
        )
    if kind == "score" and label != "relevant":
        raise ValueError(
            "the 'score' target is the relevance score; for another class use 'logit:<label>', "
            "'prob:<label>' or 'log_prob:<label>'"
        )
    return AttributionTarget(kind, label)  # type: ignore[arg-type]


def _class_index(model: HookedReranker, label: LabelLike) -> int:
    n = model.num_labels
    n_classes = 2 if n == 1 else n
    relevant = 1 if n == 1 else model.relevant_label
    if label == "relevant":
        return relevant
    if label == "non_relevant":
        if n_classes != 2:
            raise ValueError(
                f"'non_relevant' is ambiguous for a {n}-label model: give the class index"
            )
        return 1 - relevant
    if not 0 <= label < n_classes:
        raise ValueError(f"class {label} out of range: the model has {n_classes} classes")
    return label


def check_target(model: HookedReranker, target: AttributionTarget | str) -> AttributionTarget:
    """Parse ``target`` and check it makes sense for ``model`` (raises ``ValueError``)."""
    t = parse_target(target)
    if t.kind != "score":
        index = _class_index(model, t.label)
        if model.num_labels == 1 and t.kind == "logit" and index == 0:
            raise ValueError(
                "a 1-label model has no non-relevant logit (it would be the constant 0); use "
                "'prob:non_relevant' or 'log_prob:non_relevant'"
            )
    return t


def target_from_logits(
    model: HookedReranker, logits: Float[Tensor, "batch n_labels"], target: AttributionTarget | str
) -> Float[Tensor, " batch"]:
    """``F`` for every row of ``logits`` (a 1-label model's logit ``z`` reads as ``[0, z]``)."""
    t = check_target(model, target)
    if t.kind == "score":
        return model.hook_score(model.scores_from_logits(logits))
    if model.num_labels == 1:
        logits = torch.cat([torch.zeros_like(logits), logits], dim=-1)
    index = _class_index(model, t.label)
    if t.kind == "logit":
        return logits[:, index]
    log_probs = nn.functional.log_softmax(logits.float(), dim=-1)[:, index]
    return log_probs if t.kind == "log_prob" else log_probs.exp()
