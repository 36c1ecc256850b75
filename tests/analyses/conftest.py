"""Fixtures of the study tests: a tiny random cross-encoder saved to disk and a tiny collection."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from tests.helpers import WORDS, tiny_hf_model, tiny_tokenizer


def write_tiny_collection(
    root: Path, *, n_queries: int = 6, n_docs: int = 40, depth: int = 6, seed: int = 0
) -> Path:
    """A local collection of random word documents with graded judgments and a first-stage run
    (``test`` split): every query has ``depth`` candidates, with 1-3 relevant among them."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    docs = {f"d{i}": " ".join(rng.choices(WORDS, k=rng.randint(4, 14))) for i in range(n_docs)}
    queries = {f"q{i}": " ".join(rng.choices(WORDS, k=rng.randint(2, 4))) for i in range(n_queries)}
    qrels, run = [], []
    for qid in queries:
        cands = rng.sample(sorted(docs), depth)
        for rank, did in enumerate(cands, 1):
            run.append(f"{qid} Q0 {did} {rank} {depth - rank + 0.5} bm25")
        for did in cands[: rng.randint(1, 3)]:
            qrels.append(f"{qid} 0 {did} {rng.randint(1, 3)}")
        qrels.append(f"{qid} 0 {cands[-1]} 0")
    (root / "docs.tsv").write_text("".join(f"{k}\t{v}\n" for k, v in docs.items()))
    (root / "queries.test.tsv").write_text("".join(f"{k}\t{v}\n" for k, v in queries.items()))
    (root / "qrels.test.txt").write_text("\n".join(qrels) + "\n")
    (root / "run.bm25.test.trec").write_text("\n".join(run) + "\n")
    return root


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random 1-label BERT cross-encoder saved as a local model directory."""
    path = tmp_path_factory.mktemp("tiny_model")
    tiny_hf_model().save_pretrained(path)
    tiny_tokenizer(path).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_collection_dir(tmp_path_factory) -> Path:
    return write_tiny_collection(tmp_path_factory.mktemp("tiny_collection"))


def common_options(model_dir: Path, collection_dir: Path) -> list[str]:
    """Options every study test passes: the tiny model and collection on the CPU."""
    return [
        "--model",
        str(model_dir),
        "--dataset",
        str(collection_dir),
        "--split",
        "test",
        "--depth",
        "6",
        "--max-length",
        "48",
        "--device",
        "cpu",
        "--batch-size",
        "8",
        "--no-progress",
    ]


@pytest.fixture()
def common_argv(tiny_model_dir, tiny_collection_dir) -> list[str]:
    return common_options(tiny_model_dir, tiny_collection_dir)


#: 4 conditions x the ranges 0, 0-1 and 1 (window 0 == cumulative 0), + the baseline: 13 units
DIRECTION_ABLATION_WORK = [
    "--conditions",
    "no_interaction",
    "cls_reads_nothing",
    "query_to_document",
    "QUERY->CLS",
    "--layers",
    "cumulative",
    "window:1",
]


def run_the_five_studies(
    argv: list[str], collection_dir: Path, out_root: Path, direction_ablation: list[str]
) -> dict[str, Path]:
    """Each bundled study on small settings (``direction_ablation``: that study's own options),
    asserting that it exits 0 and stores results; ``{short name: output directory}``."""
    from analyses import direction_ablation as da
    from analyses import matching_heads, neuron_attribution, patching_tfc1, qk_svd

    runs = {
        "da": (da, [*direction_ablation, "--random-shuffles", "5"]),
        "mh": (matching_heads, ["--no-correct-only", "--threshold", "0.01", "--random-shuffles",
                                "5", "--knockout-top", "1", "--knockout-random", "1"]),
        "na": (neuron_attribution, ["--pairs-per-class", "4", "--per-query", "1", "--n-steps",
                                    "4", "--unit-pairs", "3", "--prune-seeds", "1", "--percents",
                                    "10", "--attribution-datasets", f"{collection_dir}@test"]),
        "tfc1": (patching_tfc1, ["--unit-pairs", "10"]),
        "qk": (qk_svd, ["--top-heads", "2", "--directions", "2", "--tokens", "4",
                        "--cosine-pairs", "12"]),
    }  # fmt: skip
    outputs = {}
    for name, (study, extra) in runs.items():
        out = outputs[name] = out_root / name
        assert study.main([*argv, *extra, "--output", str(out)]) == 0, name
        assert (out / "results.jsonl").read_text().strip(), name
    return outputs


def run_direction_ablation(argv: list[str]) -> int:
    from analyses import direction_ablation

    return direction_ablation.main([*argv, "--random-shuffles", "20"])


@pytest.fixture(scope="session")
def direction_ablation_run(tiny_model_dir, tiny_collection_dir, tmp_path_factory) -> Path:
    """An uninterrupted direction-ablation run of DIRECTION_ABLATION_WORK (its output dir)."""
    out = tmp_path_factory.mktemp("results") / "direction_ablation" / "tiny"
    argv = common_options(tiny_model_dir, tiny_collection_dir)
    assert run_direction_ablation([*argv, *DIRECTION_ABLATION_WORK, "--output", str(out)]) == 0
    return out


#: Every pair (the tiny random model classifies few correctly), a low threshold so that the
#: tiny model has matching heads, and the knockout follow-up of the top 2 heads.
MATCHING_HEADS_WORK = [
    "--no-correct-only",
    "--threshold",
    "0.01",
    "--random-shuffles",
    "20",
    "--knockout-top",
    "2",
    "--knockout-random",
    "1",
]


@pytest.fixture(scope="session")
def matching_heads_run(tiny_model_dir, tiny_collection_dir, tmp_path_factory) -> Path:
    """An uninterrupted matching-heads run of MATCHING_HEADS_WORK (its output dir)."""
    from analyses import matching_heads

    out = tmp_path_factory.mktemp("results") / "matching_heads" / "tiny"
    argv = common_options(tiny_model_dir, tiny_collection_dir)
    assert matching_heads.main([*argv, *MATCHING_HEADS_WORK, "--output", str(out)]) == 0
    return out
