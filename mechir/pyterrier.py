"""PyTerrier integration: rerank a PyTerrier result frame with a mechir model and any hooks.

Needs the optional extra ``pyterrier`` (``pip install "mechir[pyterrier]"``, i.e.
``python-terrier``); reranking needs no Java. Interventions become pipeline stages that
``pt.Experiment`` compares with its own significance tests::

    import pyterrier as pt
    from mechir import load_cross_encoder
    from mechir.hooks import head_knockout_hooks
    from mechir.pyterrier import MechirReranker

    model = load_cross_encoder("demo")
    plain = MechirReranker(model, max_length=160)
    knocked = MechirReranker(model, hooks=head_knockout_hooks(model, heads=["2/9"]),
                             max_length=160, name="2/9 knocked out")
    pt.Experiment([bm25 >> plain, bm25 >> knocked], topics, qrels, ["nDCG@10"], baseline=0)

``bm25`` is any transformer yielding ``qid, query, docno, text`` rows (e.g. a Terrier retriever
followed by ``pt.text.get_text``, or ``pt.Transformer.from_df`` of a stored run with texts).
"""

from __future__ import annotations

import pandas as pd

from mechir.data import Pair
from mechir.interface import HookedReranker
from mechir.models.hooked import HooksArg

try:
    import pyterrier as pt
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "mechir.pyterrier needs PyTerrier: pip install 'mechir[pyterrier]' (python-terrier)"
    ) from err

REQUIRED_COLUMNS = ("qid", "query", "docno")


class MechirReranker(pt.Transformer):
    """A PyTerrier transformer that scores every ``(query, text)`` row with a mechir model.

    ``transform`` maps a frame with ``qid, query, docno`` and the document text column to the
    same rows with ``score`` = the model's relevance score (``model.score``, hooks applied)
    and ``rank`` (0-based, by descending score within each query, as ``pt.model.add_ranks``);
    the scores equal those of :func:`mechir.evaluation.rerank` on the same pairs.

    Args:
        model: the cross-encoder.
        hooks: a hook list, built once (a part-dependent hook reads the running batch's parts),
            or a function ``sub_batch -> hooks``; applied to every forward pass.
        batch_size: pairs per forward pass.
        max_length: tokens per pair (default: the model's maximum).
        text_field: the column holding the document text.
        name: shown by ``repr`` and usable as a system name in ``pt.Experiment``.
        progress: show a progress bar while scoring.
    """

    def __init__(
        self,
        model: HookedReranker,
        *,
        hooks: HooksArg = None,
        batch_size: int = 32,
        max_length: int | None = None,
        text_field: str = "text",
        name: str | None = None,
        progress: bool = False,
    ) -> None:
        self.model = model
        self.hooks = hooks
        self.batch_size = batch_size
        self.max_length = max_length
        self.text_field = text_field
        self.name = name
        self.progress = progress

    def __repr__(self) -> str:
        label = self.name or ("hooked" if self.hooks else "plain")
        return f"MechirReranker({label!r}, max_length={self.max_length})"

    def transform(self, inp: pd.DataFrame) -> pd.DataFrame:
        """Score the rows of ``inp`` (``qid, query, docno, <text_field>``); add score and rank.

        Raises:
            ValueError: a required column is missing.
        """
        from mechir.evaluation import score_pairs

        missing = [c for c in (*REQUIRED_COLUMNS, self.text_field) if c not in inp.columns]
        if missing:
            hint = (
                "; add the document text first, e.g. bm25 >> pt.text.get_text(dataset, "
                f"'{self.text_field}') >> reranker"
                if self.text_field in missing
                else ""
            )
            raise ValueError(
                f"MechirReranker needs the columns {[*REQUIRED_COLUMNS, self.text_field]}; "
                f"missing {missing} (the frame has {list(inp.columns)}){hint}"
            )
        out = inp.drop(columns=[c for c in ("score", "rank") if c in inp.columns]).copy()
        if not len(out):
            out["score"] = pd.Series(dtype="float64")
            out["rank"] = pd.Series(dtype="int64")
            return out
        pairs = [
            Pair(str(q), str(d), str(qt), str(t))
            for q, d, qt, t in zip(out.qid, out.docno, out["query"], out[self.text_field])
        ]
        scores = score_pairs(
            self.model,
            pairs,
            hooks=self.hooks,
            batch_size=self.batch_size,
            max_length=self.max_length,
            progress=self.progress,
            desc="reranking",
        )
        out["score"] = scores.double().numpy()
        return pt.model.add_ranks(out)
