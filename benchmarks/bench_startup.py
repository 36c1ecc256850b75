"""Start-up latency of the command line: ``import mechir``, ``mechir --help``, ``mechir rerank
--help``, every study's ``--help``, the report's, and argument errors, each in a fresh Python
process.

Each command runs in a new interpreter (what a user waits for), interleaved across the measured
trees so machine load affects them alike; the median of ``--repeats`` runs is reported, plus
whether the process imported torch / transformers / transformer_lens (``-X importtime``).
Give ``--before DIR`` (a checkout of the tree before the change, e.g. ``main``) to measure it
side by side. Writes ``benchmarks/results/startup_cpu.json``.

    python benchmarks/bench_startup.py [--before ../main] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

STUDIES = (
    "direction_ablation",
    "neuron_attribution",
    "patching_tfc1",
    "matching_heads",
    "qk_svd",
    "reranking",
    "demo",
)
COMMANDS: dict[str, list[str]] = {
    "import mechir": ["-c", "import mechir"],
    "mechir --help": ["-m", "mechir.cli", "--help"],
    "mechir rerank --help": ["-m", "mechir.cli", "rerank", "--help"],
    "mechir rerank --batch-size 0 (argument error)": [
        "-m",
        "mechir.cli",
        "rerank",
        "--model",
        "m",
        "--dataset",
        "d",
        "--output",
        "o",
        "--batch-size",
        "0",
    ],  # fmt: skip
    "mechir demo --help": ["-m", "mechir.cli", "demo", "--help"],
    **{
        f"python -m analyses.{study} --help": ["-m", f"analyses.{study}", "--help"]
        for study in STUDIES
    },
    "python -m analyses.direction_ablation --mode bogus (argument error)": [
        "-m",
        "analyses.direction_ablation",
        "--mode",
        "bogus",
    ],  # fmt: skip
    "python -m analyses.report --help": ["-m", "analyses.report", "--help"],
}
HEAVY = ("torch", "transformers", "transformer_lens", "pandas", "matplotlib")


def run_once(tree: Path, args: list[str]) -> tuple[float, int]:
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, *args], cwd=tree, env=env, capture_output=True, text=True
    )
    return time.perf_counter() - start, proc.returncode


def heavy_imports(tree: Path, args: list[str]) -> list[str]:
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", *args], cwd=tree, env=env, capture_output=True,
        text=True,
    )  # fmt: skip
    names = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if "|" in line}
    return [m for m in HEAVY if m in names]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", type=Path, default=None, help="tree before the change")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    trees = {"after": ROOT}
    if args.before is not None:
        trees = {"before": args.before.resolve(), **trees}
    times: dict[str, dict[str, list[float]]] = {t: {c: [] for c in COMMANDS} for t in trees}
    codes: dict[str, dict[str, int]] = {t: {} for t in trees}
    for _ in range(args.repeats):
        for name, cmd in COMMANDS.items():
            for tree_name, tree in trees.items():
                seconds, rc = run_once(tree, cmd)
                times[tree_name][name].append(seconds)
                codes[tree_name][name] = rc
    baseline = run_once(ROOT, ["-c", "pass"])[0]
    rows = []
    for name, cmd in COMMANDS.items():
        row = {"command": name}
        for tree_name, tree in trees.items():
            row[f"{tree_name}_median_s"] = round(statistics.median(times[tree_name][name]), 3)
            row[f"{tree_name}_exit_status"] = codes[tree_name][name]
            row[f"{tree_name}_heavy_imports"] = heavy_imports(tree, cmd)
        if "before" in trees:
            row["speed_up"] = round(row["before_median_s"] / row["after_median_s"], 1)
        rows.append(row)
        print(json.dumps(row))
    result = {
        "benchmark": "command-line start-up",
        "python": sys.version.split()[0],
        "cpu": platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg(),
        "repeats": args.repeats,
        "bare_python_s": round(baseline, 3),
        "trees": {k: str(v) for k, v in trees.items()},
        "rows": rows,
    }
    out = ROOT / "benchmarks" / "results" / "startup_cpu.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(out)


if __name__ == "__main__":
    main()
