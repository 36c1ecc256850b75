"""Why a replay of guided patching departs from the real run: redo one target's default run and
replay it twice, on the sweep's effects and on the run's own exact values at its verified cells.

Reads the sweep and estimates that ``bench_guided_patching.py`` cached (``--cache``), on the same
pairs; prints, per departing pair, the cells that differ and their two effect values.

    python benchmarks/check_guided_replay.py --target "pattern x query position" --pairs 20 \
        --cache /tmp/guided_cache_pos
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from assets import default_model  # benchmarks/ is on the path of a script run
from bench_guided_patching import study_pairs, sweep_and_estimates, targets


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", default="pattern x query position", choices=sorted(targets()))
    ap.add_argument("--pairs", type=int, default=20)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--cache", default="/tmp/guided_cache_pos")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from mechir import load_cross_encoder
    from patching import patch_top_cells, simulate_top_cells

    model = load_cross_encoder(default_model(), device="cpu")
    pairs = study_pairs(model, args.pairs, 160, 5, 0)
    target, _ = targets()[args.target]
    data = sweep_and_estimates(model, pairs, args.target, target, Path(args.cache))
    effects, n = data["effects"], len(pairs)
    run = patch_top_cells(model, pairs, target, k=args.k, progress=False)
    done, exact = run.verified.reshape(n, -1), run.exact.reshape(n, -1).double()
    estimate, width = run.estimate.reshape(n, -1), run.uncertainty.reshape(n, -1)
    on_sweep = simulate_top_cells(effects, estimate, width, args.k)
    on_run = simulate_top_cells(effects.where(~done, exact), estimate, width, args.k)
    for p in range(n):
        if on_sweep.verified[p].tolist() != done[p].tolist():
            cells = (done[p] ^ on_sweep.verified[p]).nonzero()[:, 0].tolist()
            print(f"pair {p}: cells {cells} sweep {effects[p, cells].tolist()} "
                  f"run {exact[p, cells].tolist()}; same with the run's values: "
                  f"{on_run.verified[p].tolist() == done[p].tolist()}")  # fmt: skip
    for name, sim in (("sweep's effects", on_sweep), ("run's values", on_run)):
        same = sim.verified.tolist() == done.tolist() and sim.top.tolist() == run.top.tolist()
        print(f"replay on the {name}: same verified cells and top k as the run: {same}")


if __name__ == "__main__":
    main()
