"""How long an unreachable model or dataset id takes to fail, and how long its message is.

Each scenario runs in its own process (imports excluded from the timing) on this machine, where
the hub and the dataset hosts cannot be reached. mechir's loaders are compared with the direct
transformers / ir_datasets calls they replace. Writes ``results/fail_fast.json``.

    python benchmarks/bench_fail_fast.py [--skip-baselines]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCENARIOS = {
    "mechir: hub id, online, hub unreachable": (
        "from mechir import load_cross_encoder",
        "load_cross_encoder('castorini/monobert-large-msmarco')",
        {},
    ),
    "mechir: hub id, online, an HTTP 404 for every URL (HF_ENDPOINT=http://10.255.255.1)": (
        "from mechir import load_cross_encoder",
        "load_cross_encoder('castorini/monobert-large-msmarco')",
        {"HF_ENDPOINT": "http://10.255.255.1"},
    ),
    "mechir: hub id, HF_HUB_OFFLINE=1": (
        "from mechir import load_cross_encoder",
        "load_cross_encoder('castorini/monobert-large-msmarco')",
        {"HF_HUB_OFFLINE": "1"},
    ),
    "mechir: relative path that does not exist": (
        "from mechir import load_cross_encoder",
        "load_cross_encoder('./models/monobert')",
        {},
    ),
    "mechir: ir_datasets id, online, hosts unreachable": (
        "from mechir.data import load_collection",
        "load_collection('msmarco-passage/trec-dl-2019/judged')",
        {},
    ),
    "mechir: ir_datasets id, HF_HUB_OFFLINE=1": (
        "from mechir.data import load_collection",
        "load_collection('msmarco-passage/trec-dl-2019/judged')",
        {"HF_HUB_OFFLINE": "1"},
    ),
}
BASELINES = {
    "transformers: AutoConfig.from_pretrained(hub id), online": (
        "from transformers import AutoConfig",
        "AutoConfig.from_pretrained('castorini/monobert-large-msmarco')",
        {},
    ),
    "ir_datasets: load(id).queries_iter(), online": (
        "import ir_datasets",
        "list(ir_datasets.load('msmarco-passage/trec-dl-2019/judged').qrels_iter())",
        {},
    ),
}

PROBE = textwrap.dedent(
    """
    import json, time
    {setup}
    start = time.perf_counter()
    try:
        {call}
        error = None
    except BaseException as err:
        error = err
    elapsed = time.perf_counter() - start
    message = "" if error is None else str(error)
    print(json.dumps({{
        "seconds": round(elapsed, 3),
        "error": None if error is None else type(error).__name__,
        "message_lines": len(message.splitlines()),
        "message": message[:600],
    }}))
    """
)


def run(setup: str, call: str, env: dict[str, str]) -> dict:
    environment = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE",)}
    environment.update(env, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    code = PROBE.format(setup=setup, call=call)
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=environment, timeout=300
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-baselines", action="store_true", help="mechir scenarios only")
    args = parser.parse_args()
    scenarios = dict(SCENARIOS) | ({} if args.skip_baselines else BASELINES)
    rows = []
    for name, (setup, call, env) in scenarios.items():
        row = {"scenario": name, **run(setup, call, env)}
        rows.append(row)
        print(f"{row['seconds']:8.2f} s  {row['message_lines']:3d} lines  {name}", flush=True)
    out = ROOT / "benchmarks" / "results" / "fail_fast.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"load_avg": os.getloadavg(), "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
