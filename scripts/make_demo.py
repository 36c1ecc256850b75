"""Rebuild the embedded demo (package ``mechir_demo``) from the shared assets, and measure it.

    python scripts/make_demo.py                  # convert, copy, measure, write the model card
    python scripts/make_demo.py --skip-measure   # convert and copy only (card keeps its figures)
    python scripts/make_demo.py --format float32 # store the exact float32 weights (91 MB)

- ``mechir_demo/model/``: ``../shared/models/minilm-l6-ce-scifact`` with its weight matrices in
  :mod:`mechir.compact`'s block format (``model.blockint16.safetensors``, layout
  :data:`LAYOUT`; 1-D and small tensors float32), dequantized to a float32 Hugging Face directory
  on first use (:func:`mechir.demo.demo_model_dir`); its config, tokenizer files
  (``model_max_length`` set to the training length 160) and a model card (``README.md``) with
  the measured figures.
- ``mechir_demo/scifact-quick/``: the SciFact quick set (``queries.quick.tsv``,
  ``qrels.quick.txt``, ``run.bm25.quick.trec`` of ``../shared/data/scifact``, stored unsplit as
  ``queries.tsv``, ``qrels.txt``, ``run.bm25.trec``) and only the documents its 1,000 pairs use,
  with the data's licence and attribution in its README.

Measured (the dequantized demo against the float32 shared model, both through mechir,
max_length 160):
max |score difference| over the 1,000 pairs, and nDCG@10 of both reranked runs (ir_measures).
The figures go to ``mechir_demo/model/measured.json`` and into the model card.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import textwrap
from pathlib import Path

from safetensors.torch import load_file

from mechir.compact import save_compact
from mechir.demo import DEMO_WEIGHTS
from mechir.model_files import weights_fingerprint

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
SHARED_MODEL = SHARED / "models" / "minilm-l6-ce-scifact"
SHARED_DATA = SHARED / "data" / "scifact"
OUT = ROOT / "mechir_demo"
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "special_tokens_map.json")
MAX_LENGTH = 160
REFERENCE_NDCG = 0.7684  # ../shared/README.md: the float32 model, plain Hugging Face


#: Block layout of the demo's weight matrices, ``(block size G, code bits)``: the encoder's
#: matrices (and the pooler) at LAYOUT["default"], the embedding matrices as named. Chosen by
#: measurement (see the model card): finer codes where scores are most sensitive (the encoder
#: matrices), coarser where they are not (the 30,522-row word embeddings, half the parameters).
LAYOUT: dict[str, tuple[int, int]] = {
    "default": (16, 17),
    "bert.embeddings.word_embeddings.weight": (64, 16),
    "bert.embeddings.position_embeddings.weight": (16, 16),
}


def convert_model(src: Path, dst: Path, fmt: str = "compact") -> dict[str, int | str]:
    """The compact copy of the weights (``fmt="float32"``: every tensor kept exactly), the
    config, the tokenizer (``model_max_length`` = the training length)."""
    dst.mkdir(parents=True, exist_ok=True)
    for old in ("model.safetensors",):  # the earlier float16 copy
        (dst / old).unlink(missing_ok=True)
    state = load_file(src / "model.safetensors")
    options: dict = (
        {"min_numel": math.inf}
        if fmt == "float32"
        else {
            "group": LAYOUT["default"][0],
            "bits": LAYOUT["default"][1],
            "per_tensor": {k: v for k, v in LAYOUT.items() if k != "default"},
        }
    )
    meta = save_compact(
        dst / DEMO_WEIGHTS,
        state,
        metadata={"source": src.name, "source_fingerprint": str(weights_fingerprint(src))},
        **options,
    )
    config = json.loads((src / "config.json").read_text(encoding="utf-8"))
    config["dtype"] = "float32"
    (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    tok_config = json.loads((src / "tokenizer_config.json").read_text(encoding="utf-8"))
    tok_config["model_max_length"] = MAX_LENGTH  # the training length
    (dst / "tokenizer_config.json").write_text(
        json.dumps(tok_config, indent=2) + "\n", encoding="utf-8"
    )
    for name in (*TOKENIZER_FILES, "training_config.json"):
        shutil.copyfile(src / name, dst / name)
    layout = json.loads(meta["layout"])
    return {
        "source_mb": (src / "model.safetensors").stat().st_size / 1e6,
        "tensors": len(state),
        "parameters": sum(v.numel() for v in state.values()),
        "quantized_parameters": sum(state[k].numel() for k in layout),
        "weights_mb": (dst / DEMO_WEIGHTS).stat().st_size / 1e6,
        "state_sha256": meta["state_sha256"],
        "source_fingerprint": meta["source_fingerprint"],
    }


def copy_collection(src: Path, dst: Path) -> dict[str, int]:
    """The quick split, stored unsplit, with only the documents its run uses or its qrels judge
    (so that every judged document, e.g. for ``matching_pairs``, is in the collection)."""
    dst.mkdir(parents=True, exist_ok=True)
    run_lines = (src / "run.bm25.quick.trec").read_text(encoding="utf-8").splitlines()
    used = {line.split()[2] for line in run_lines if line.strip()}
    qrels = (src / "qrels.quick.txt").read_text(encoding="utf-8").splitlines()
    used |= {line.split()[2] for line in qrels if line.strip()}
    n_docs = 0
    with (
        open(src / "docs.tsv", encoding="utf-8") as fin,
        open(dst / "docs.tsv", "w", encoding="utf-8") as fout,
    ):
        for line in fin:
            if line.partition("\t")[0] in used:
                fout.write(line)
                n_docs += 1
    if n_docs != len(used):
        raise RuntimeError(f"{len(used) - n_docs} documents of the run/qrels are not in docs.tsv")
    shutil.copyfile(src / "queries.quick.tsv", dst / "queries.tsv")
    shutil.copyfile(src / "qrels.quick.txt", dst / "qrels.txt")
    shutil.copyfile(src / "run.bm25.quick.trec", dst / "run.bm25.trec")
    n_queries = len((dst / "queries.tsv").read_text(encoding="utf-8").splitlines())
    return {"queries": n_queries, "pairs": len(run_lines), "documents": n_docs}


def measure(batch_size: int = 32) -> dict[str, float | int]:
    """Score the quick set with the float32 shared model and the demo (mechir)."""
    from mechir import load_cross_encoder
    from mechir.data import load_collection
    from mechir.evaluation import evaluate, score_pairs

    col = load_collection("demo")
    pairs = col.candidates(depth=20)
    out: dict[str, float | int] = {"pairs": len(pairs)}
    scores = {}
    for name, source in (("float32", SHARED_MODEL), ("demo", "demo")):
        model = load_cross_encoder(source, device="cpu")
        scores[name] = score_pairs(model, pairs, batch_size=batch_size, max_length=MAX_LENGTH)
        run: dict[str, dict[str, float]] = {}
        for p, s in zip(pairs, scores[name].tolist()):
            run.setdefault(p.qid, {})[p.docid] = s
        out[f"ndcg10_{name}"] = evaluate(run, col.qrels, ["nDCG@10"]).aggregate["nDCG@10"]
    diff = (scores["demo"] - scores["float32"]).abs()
    out["max_abs_diff"] = float(diff.max())
    out["mean_abs_diff"] = float(diff.mean())
    return out


def size_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6


def layout_text(model_info: dict) -> str:
    """The card's sentence on how the weights are stored."""
    if model_info["quantized_parameters"] == 0:
        return "Every tensor is stored exactly, in float32."
    default = LAYOUT["default"]
    rest = "; ".join(
        f"`{k.removeprefix('bert.embeddings.')}`: G={g}, b={b}"
        for k, (g, b) in LAYOUT.items()
        if k != "default"
    )
    extra = default[1] - 16
    low = "one more low bit" if extra == 1 else f"{extra} more low bits"
    return (
        f"The {model_info['quantized_parameters']:,} parameters of the weight matrices are "
        "stored as block integer codes (`mechir.compact`, format `mechir.blockint16`): each row "
        "is cut into blocks of G consecutive weights with one bfloat16 block maximum m each "
        "(float16 in files of format version 1), a weight w is stored as the b-bit integer "
        "`q=round(w/s)`, `s=m/(2^(b-1)-1)`, and read as `q·s`, so it moves by at most `s/2` "
        "plus float32 rounding (about `m·1.5e-5` for b=16). The encoder's and the "
        f"pooler's matrices use G={default[0]}, b={default[1]} (int16 codes plus {low}, packed "
        f"apart); {rest}. The other "
        f"{model_info['parameters'] - model_info['quantized_parameters']:,} parameters "
        "(LayerNorm, biases, token-type embeddings, classifier) are kept in float32."
    )


def write_card(dst: Path, model_info: dict, figures: dict[str, float | int]) -> None:
    if figures["max_abs_diff"] <= 1e-3:
        precision = textwrap.fill(
            f"Every score is within 1e-3 of the float32 model's (largest difference "
            f"{figures['max_abs_diff']:.2e}), and nDCG@10 is within 0.002 of the reference.",
            width=100,
        )
    else:
        precision = (
            f"**Precision.** Single scores move by up to {figures['max_abs_diff']:.2e}, above "
            "the 1e-3 target; `python scripts/make_demo.py --format float32` stores the exact "
            "weights (91 MB)."
        )
    text = MODEL_CARD.format(
        **{**model_info, **figures},
        layout=textwrap.fill(
            "- Storage. " + layout_text(model_info), width=100, subsequent_indent="  "
        ),
        precision=precision,
        size=size_mb(dst),
        max_length=MAX_LENGTH,
        ref=REFERENCE_NDCG,
    )
    (dst / "README.md").write_text(text, encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--skip-measure", action="store_true", help="keep measured.json")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--format",
        choices=["compact", "float32"],
        default="compact",
        help="storage of the weights (float32: exact, twice the size)",
    )
    args = parser.parse_args()
    if not SHARED_MODEL.is_dir() or not SHARED_DATA.is_dir():
        raise SystemExit(f"{SHARED}: the shared assets are needed to rebuild the demo")
    model_info = convert_model(SHARED_MODEL, OUT / "model", args.format)
    data_info = copy_collection(SHARED_DATA, OUT / "scifact-quick")
    print(f"model: {model_info}; collection: {data_info}")
    measured = OUT / "model" / "measured.json"
    if args.skip_measure:
        figures = json.loads(measured.read_text(encoding="utf-8"))
    else:
        # a placeholder card and figures first: the demo directory copies them
        measured.write_text("{}\n", encoding="utf-8")
        (OUT / "model" / "README.md").touch()
        figures = measure(args.batch_size)
        figures["weights_mb"] = round(model_info["weights_mb"], 2)
        measured.write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(figures, indent=2))
    write_card(OUT / "model", model_info, figures)
    sizes = {p.name: round(size_mb(p), 2) for p in (OUT / "model", OUT / "scifact-quick")}
    print(f"sizes (MB): {sizes}; total {size_mb(OUT):.2f} MB")


MODEL_CARD = """\
# mechir demo model — MiniLM-L6 cross-encoder fine-tuned on SciFact (compact copy)

`[CLS] query [SEP] passage [SEP]` → one relevance logit (BertForSequenceClassification,
num_labels = 1; the score is the logit). Load it with `mechir.load_cross_encoder("demo")`.

## What it is
- A compact copy of the project's shared test model `minilm-l6-ce-scifact`: BERT, 6 layers,
  12 heads, hidden 384, FFN 1536, uncased WordPiece vocabulary 30,522, {parameters:,} parameters
  in {tensors} tensors, in `model.blockint16.safetensors` ({weights_mb:.1f} MB; the float32
  original is {source_mb:.1f} MB; this directory {size:.1f} MB).
{layout}
- Loading. On first use `mechir.demo.demo_model_dir()` dequantizes the weights once into a
  plain float32 Hugging Face directory in the cache (`$MECHIR_CACHE`, else
  `~/.cache/mechir`, `demo-model-<digest>/`), checked against the digest of the dequantized
  weights recorded in the file (`{state_sha256}`); `load_cross_encoder("demo")`, the CLI's
  `--model demo`, Hugging Face and sentence-transformers all read that directory.
  Source: `{source_fingerprint}` (`mechir.fingerprint` of the float32 checkpoint).
- Base model: `sentence-transformers/all-MiniLM-L6-v2` (licence Apache-2.0), fine-tuned
  MonoBERT-style on the SciFact train claims (759 queries / 864 positive pairs; BM25 and random
  negatives; pointwise BCE + listwise softmax loss; 3 epochs) — `training_config.json` holds every
  hyper-parameter. The classifier head was trained from scratch; the pooler is the base model's.
- Maximum length: trained with **max_length = {max_length}** and `truncation="only_second"`
  (`tokenizer_config.json` records `model_max_length: {max_length}`); pass the same when scoring.

## Measured quality of this copy (`python scripts/make_demo.py`)
Reranking the SciFact quick set (the demo collection: 50 test claims × BM25 top-20 = {pairs:,}
pairs), both models loaded with mechir on the CPU, max_length {max_length}:

| | value |
| --- | --- |
| max \\|demo score − float32 score\\| over the {pairs:,} pairs | {max_abs_diff:.2e} |
| mean \\|score difference\\| | {mean_abs_diff:.2e} |
| nDCG@10, demo copy | {ndcg10_demo:.4f} |
| nDCG@10, float32 model | {ndcg10_float32:.4f} |
| nDCG@10 reference (float32, plain Hugging Face, `../shared/README.md`) | {ref:.4f} |

{precision}

`tests/test_demo.py` (shared tier) re-measures both models and asserts nDCG@10 within 0.002 of
{ref:.4f} and every score within 1e-3 of the float32 model's. The full float32 model scores
nDCG@10 0.6600 on the 300 SciFact test claims (BM25 top-100; BM25 alone 0.6523) and 0.6257 on a
TREC DL-2019 passage subset.

## Limitations
A small model trained on a tiny set (864 positives) with a 160-token window: in domain it only
matches BM25, out of domain it is below BM25. It is a fixture for interpretability tooling and
the offline demo, not a production reranker.
"""


if __name__ == "__main__":
    main()
