"""Neuron integrated gradients: batched kernel vs naive loop vs captum, on the same inputs/steps.

Both path families are measured:

* input path (neuron conductance): ``neuron_integrated_gradients(path="input",
  method="riemann_left")`` vs ``neuron_integrated_gradients_reference`` vs captum
  ``LayerConductance(method="riemann_trapezoid")`` looped over layers (captum's conductance takes
  gradients at the left end of each of its ``n_steps`` intervals, which is our ``riemann_left``).
* activation path: ``neuron_integrated_gradients(path="activation", activation_baseline="input",
  method="riemann_right")`` vs the reference vs captum ``LayerIntegratedGradients`` on
  ``blocks.{l}.mlp.hook_post`` (it interpolates the layer output between the baseline input's
  and the input's activation), looped over layers.

Every measurement runs in its own subprocess (peak memory = the largest resident set sampled
during the call minus the one before it). Shapes: the shared cross-encoder (6 layers, SciFact
pairs at max_length 160) and a random BERT-large-shaped cross-encoder (24 layers, 16 heads,
d_model 1024, 256 tokens). Where a full naive/captum run would take too long, it runs on a
subset of layers and its time is extrapolated linearly to all layers; the JSON says so.

    python benchmarks/bench_nig.py [--threads 1] [--skip-large] [--skip-shared]
        [--out benchmarks/results/nig_cpu.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from assets import SHARED_MODEL  # benchmarks/ is on the path of a script run

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SETTINGS = {
    "shared": {"pairs": 4, "max_length": 160, "n_steps": 8, "subset": None},
    "large": {"pairs": 1, "max_length": 256, "n_steps": 4, "subset": [0, 12, 23]},
}
# Rows per forward of the batched kernel (None: from the default 2 GiB budget). A BERT-large row
# of 256 tokens holds ~1 GiB of activations for the backward pass.
MAX_BATCH = {"shared": {"input": None, "activation": None}, "large": {"input": 4, "activation": 5}}
# The activation path costs one row per (layer, step) above its layer on every implementation;
# on the large model all three run on the same 3 layers (no extrapolation needed there).
ACTIVATION_LAYERS = {"shared": None, "large": [0, 12, 23]}
ACTIVATION_STEPS = {"shared": 8, "large": 3}


# ---------------------------------------------------------------------- worker side
class PeakRSS:
    """Largest resident set size (bytes) sampled every 5 ms while active."""

    def __init__(self) -> None:
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.peak = self.start = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(0.005)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())


def build(shape: str, device: str = "cpu"):
    """Model, batch and [PAD] baseline of a setting, on ``device`` (the shared model: its demo
    copy where ../shared is absent)."""
    import torch
    from assets import default_model, quick_set

    from mechir import cross_encoder_batch_from_tokens, load_cross_encoder
    from mechir.attribution import baseline_batch
    from mechir.models.encoder import hooked_cross_encoder_from_hf

    if shape == "shared":
        model = load_cross_encoder(default_model(), device=device)
        pairs = quick_set().candidates(depth=20)
        pairs = pairs[:: 20 // SETTINGS[shape]["pairs"]][: SETTINGS[shape]["pairs"]]
        batch = model.encode(
            [p.query for p in pairs],
            [p.document for p in pairs],
            max_length=SETTINGS[shape]["max_length"],
        )
        return model, batch, baseline_batch(model, batch, "pad")
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(
        hidden_size=1024,
        num_hidden_layers=24,
        num_attention_heads=16,
        intermediate_size=4096,
        max_position_embeddings=512,
        num_labels=1,
        architectures=["BertForSequenceClassification"],
    )
    hf = BertForSequenceClassification(cfg).eval()
    model = hooked_cross_encoder_from_hf(hf, None, device=device)
    del hf
    gen = torch.Generator().manual_seed(0)
    n = SETTINGS[shape]["max_length"]
    q = torch.randint(1000, 30000, (1, 12), generator=gen).tolist()
    d = torch.randint(1000, 30000, (1, n - 15), generator=gen).tolist()
    batch = cross_encoder_batch_from_tokens(
        q, d, cls_token_id=101, sep_token_id=102, pad_token_id=0, max_length=n
    )
    content = batch.mask(["query", "document"])
    base = type(batch)(
        batch.input_ids.masked_fill(content, 0),
        batch.token_type_ids,
        batch.attention_mask,
        batch.parts,
    )
    return model, batch, base


def captum_conductance(
    model, batch, base, layers, n_steps, method="riemann_trapezoid", internal_batch_size=None
):
    """captum ``LayerConductance`` per layer, summed over positions (``method=None``: captum's
    default rule, Gauss-Legendre)."""
    import torch
    from captum.attr import LayerConductance

    def embeddings(b):
        box = {}
        with torch.no_grad():
            model.run_with_hooks(
                b, fwd_hooks=[("hook_full_embed", lambda a, hook: box.setdefault("e", a))]
            )
        return box["e"]

    def forward(emb, input_ids, token_type_ids, attention_mask):
        with model.hooks(fwd_hooks=[("hook_full_embed", lambda a, hook: emb)]):
            return model(input_ids, token_type_ids, attention_mask)

    e, e0 = embeddings(batch), embeddings(base)
    out = []
    for layer in layers:
        lc = LayerConductance(forward, model.blocks[layer].mlp.hook_post)
        attr = lc.attribute(
            e,
            baselines=e0,
            additional_forward_args=(batch.input_ids, batch.token_type_ids, batch.attention_mask),
            n_steps=n_steps,
            internal_batch_size=internal_batch_size,
            **({} if method is None else {"method": method}),
        )
        out.append(attr.detach().sum(1))
    return torch.stack(out, 1)


def captum_layer_ig(model, batch, base, layers, n_steps):
    import torch
    from captum.attr import LayerIntegratedGradients

    def forward(input_ids, token_type_ids, attention_mask):
        return model(input_ids, token_type_ids, attention_mask)

    out = []
    for layer in layers:
        lig = LayerIntegratedGradients(forward, model.blocks[layer].mlp.hook_post)
        attr = lig.attribute(
            batch.input_ids,
            baselines=base.input_ids,
            additional_forward_args=(batch.token_type_ids, batch.attention_mask),
            n_steps=n_steps,
            method="riemann_right",
        )
        out.append(attr.detach().sum(1))
    return torch.stack(out, 1)


def worker(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    from mechir.attribution import (
        neuron_integrated_gradients,
        neuron_integrated_gradients_reference,
    )

    model, batch, base = build(spec["shape"])
    layers, n_steps, path = spec["layers"], spec["n_steps"], spec["path"]
    method = "riemann_left" if path == "input" else "riemann_right"
    kwargs = dict(
        path=path, layers=layers, baseline=base, method=method, n_steps=n_steps,
        activation_baseline="input",
    )  # fmt: skip
    impl = spec["impl"]
    info: dict = {}
    with torch.no_grad():  # warm-up: one clean forward (allocator, thread pool)
        model(batch)
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        if impl == "batched":
            r = neuron_integrated_gradients(model, batch, max_batch=spec.get("max_batch"), **kwargs)
            attr = r.per_neuron()
            info["completeness_error"] = r.completeness_error()
        elif impl == "naive":
            r = neuron_integrated_gradients_reference(model, batch, **kwargs)
            attr = r.per_neuron()
        elif path == "input":
            attr = captum_conductance(
                model, batch, base, layers or range(model.cfg.n_layers), n_steps
            )
        else:
            attr = captum_layer_ig(model, batch, base, layers or range(model.cfg.n_layers), n_steps)
        seconds = time.perf_counter() - t0
    torch.save(attr.float().cpu(), spec["out"])
    return {
        "seconds": seconds,
        "peak_mib": (mem.peak - mem.start) / 2**20,
        "seq_len": int(batch.input_ids.shape[1]),
        "examples": len(batch),
        **info,
    }


# ---------------------------------------------------------------------- orchestration
def run_worker(spec: dict) -> dict:
    cmd = [sys.executable, __file__, "--worker", json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"worker failed: {spec}\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def rel_diff(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


def bench_shape(
    shape: str, path: str, threads: int, has_captum: bool, tmp: Path, repeats: int = 1
) -> dict:
    """Time every implementation ``repeats`` times, interleaved (batched, naive, captum, batched,
    ...), so that load from other processes hits all alike; ``seconds`` is the fastest run."""
    import torch

    n_layers = 6 if shape == "shared" else 24
    if path == "input":
        layers, n_steps, subset = None, SETTINGS[shape]["n_steps"], SETTINGS[shape]["subset"]
    else:
        layers, n_steps, subset = ACTIVATION_LAYERS[shape], ACTIVATION_STEPS[shape], None
    measured: dict[str, dict] = {}
    impls = ["batched", "naive"] + (["captum"] if has_captum else [])
    for _ in range(repeats):
        for impl in impls:
            run_layers = subset if (impl != "batched" and subset) else layers
            spec = {
                "shape": shape, "path": path, "impl": impl, "threads": threads,
                "layers": run_layers, "n_steps": n_steps,
                "out": str(tmp / f"{shape}_{path}_{impl}.pt"), "max_batch": MAX_BATCH[shape][path],
            }  # fmt: skip
            print(f"[{shape} {path}] {impl} layers={run_layers} n_steps={n_steps} ...", flush=True)
            res = run_worker(spec)
            n_run = len(run_layers) if run_layers else n_layers
            n_all = len(layers) if layers else n_layers
            res["layers_measured"] = run_layers or list(range(n_layers))
            if n_run != n_all:
                res["measured_seconds"] = res["seconds"]
                res["seconds"] = res["seconds"] * n_all / n_run
                res["extrapolated"] = (
                    f"measured on layers {run_layers} ({n_run} of {n_all}); time scaled "
                    f"linearly by {n_all}/{n_run}"
                )
            print(f"    {res['seconds']:.1f} s", flush=True)
            times = measured.get(impl, {}).get("all_seconds", []) + [res["seconds"]]
            if impl not in measured or res["seconds"] < measured[impl]["seconds"]:
                measured[impl] = res
            measured[impl]["all_seconds"] = times
            measured[impl]["examples_per_second"] = res["examples"] / measured[impl]["seconds"]
    batched = torch.load(tmp / f"{shape}_{path}_batched.pt")
    for impl in impls[1:]:
        other = torch.load(tmp / f"{shape}_{path}_{impl}.pt")
        rows = measured[impl]["layers_measured"]
        all_rows = layers or list(range(n_layers))
        ref = batched[:, [all_rows.index(r) for r in rows]]
        measured[impl]["max_rel_diff_vs_batched"] = rel_diff(other, ref)
        measured[impl]["batched_speedup"] = (
            measured[impl]["seconds"] / measured["batched"]["seconds"]
        )
    return {
        "shape": shape,
        "path": path,
        "n_steps": n_steps,
        "layers": layers or list(range(n_layers)),
        "method": "riemann_left" if path == "input" else "riemann_right",
        "repeats": repeats,
        "results": measured,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=1, help="interleaved runs; fastest reported")
    ap.add_argument("--skip-large", action="store_true")
    ap.add_argument("--skip-shared", action="store_true")
    ap.add_argument("--paths", default="input,activation")
    ap.add_argument(
        "--update", action="store_true", help="replace only the re-measured runs in --out"
    )
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "nig_cpu.json"))
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    try:
        import captum

        has_captum, captum_version = True, captum.__version__
    except ImportError:
        has_captum, captum_version = False, None
        print("captum not installed: skipping the captum comparison (pip install captum)")
    import torch

    shapes = [s for s in ("shared", "large") if not getattr(args, f"skip_{s}")]
    if "shared" in shapes and not SHARED_MODEL.exists():
        print(f"{SHARED_MODEL} not found: skipping the shared cross-encoder")
        shapes.remove("shared")
    load_before = os.getloadavg()
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for shape in shapes:
            for path in args.paths.split(","):
                runs.append(
                    bench_shape(shape, path, args.threads, has_captum, Path(tmp), args.repeats)
                )
    report = {
        "benchmark": "neuron integrated gradients: batched vs naive loop vs captum",
        "device": "cpu",
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": args.threads,
        "repeats": "per run (runs[].repeats; the fastest of the interleaved runs is reported)",
        "torch": torch.__version__,
        "captum": captum_version or "not installed (comparison skipped)",
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "note": (
            "Wall times on a machine shared with other jobs (see load averages); every run in "
            "its own process with the same thread count. peak_mib: largest resident set during "
            "the call minus the one before it. max_rel_diff_vs_batched: max |x - batched| / "
            "max |batched| over per-neuron attributions (summed over positions)."
        ),
        "settings": {
            "input": SETTINGS,
            "activation_layers": ACTIVATION_LAYERS,
            "activation_steps": ACTIVATION_STEPS,
            "batched_max_batch": MAX_BATCH,
        },
        "runs": runs,
        "gpu": "not available in this environment",
    }
    out = Path(args.out)
    if args.update and out.exists():
        old = json.loads(out.read_text())
        fresh = {(r["shape"], r["path"]) for r in runs}
        kept = [r for r in old["runs"] if (r["shape"], r["path"]) not in fresh]
        for r in runs:
            r["load_average_before"], r["load_average_after"] = load_before, os.getloadavg()
        runs = kept + runs
        report["runs"] = runs
        report["load_average_before"] = old.get("load_average_before")
        report["note"] += " Runs with their own load averages were re-measured later (--update)."
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    for r in runs:
        res = r["results"]
        line = f"{r['shape']:7s} {r['path']:10s} batched {res['batched']['seconds']:8.1f} s"
        for impl in ("naive", "captum"):
            if impl in res:
                line += (
                    f" | {impl} {res[impl]['seconds']:8.1f} s (x{res[impl]['batched_speedup']:.1f},"
                    f" diff {res[impl]['max_rel_diff_vs_batched']:.1e})"
                )
        print(line)


if __name__ == "__main__":
    main()
