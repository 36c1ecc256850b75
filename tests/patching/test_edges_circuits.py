"""Circuits from edge scores (patching.edges.circuits): CPR/CMD, top-n faithfulness curves and the
greedy search, each checked against exact patching; the SVG drawing; EAP-IG sharded over two
processes equals one process."""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from patching.edges import edge_attribution, edge_graph
from patching.edges.circuits import (
    budget_edges,
    circuit_metric,
    cpr_cmd,
    faithfulness_curve,
    greedy_circuit,
    heads_in,
)
from patching.edges.drawing import circuit_svg
from patching.edges.reference import patch_edges_reference
from tests.distributed_helpers import free_port, library_inputs, torchrun_env

BUDGETS = (0.02, 0.05, 0.1, 0.2, 0.5)


def test_cpr_cmd_closed_forms():
    budgets = [0.1, 0.2, 0.5]
    cpr, cmd = cpr_cmd(budgets, [1.0, 1.0, 1.0])
    assert cpr == pytest.approx(0.9) and cmd == pytest.approx(0.0)
    # f = 0 up to 50%, then the 100% point (f = 1): one triangle of width 0.5
    cpr, cmd = cpr_cmd(budgets, [0.0, 0.0, 0.0])
    assert cpr == pytest.approx(0.25) and cmd == pytest.approx(0.4 + 0.25)
    # overshoot counts in CPR and against CMD
    cpr, cmd = cpr_cmd([0.5], [2.0])
    assert cpr == pytest.approx(0.75) and cmd == pytest.approx(0.25)
    with pytest.raises(ValueError, match="budgets must increase within"):
        cpr_cmd([0.5, 0.2], [0.0, 0.0])
    assert budget_edges(0.001, 7588) == 7 and budget_edges(0.5, 7588) == 3794
    assert budget_edges(0.001, 110) == 1


def test_top_n_curve_is_exact(model, pairs):
    """Every point of a curve equals the exact patching of the circuit's complement (engine and
    hook reference); the whole edge set gives f = 1."""
    g = edge_graph(model)
    scores = edge_attribution(model, pairs, method="eap_ig")
    curve = faithfulness_curve(model, pairs, scores=scores, budgets=BUDGETS)
    assert curve.n_edges == [budget_edges(b, g.n_edges) for b in BUDGETS]
    assert [len(c) for c in curve.circuits] == curve.n_edges
    direct = circuit_metric(model, pairs, circuits=curve.circuits)
    torch.testing.assert_close(curve.metric, direct, atol=1e-5, rtol=0)
    outside = torch.ones(g.n_edges, dtype=torch.bool)
    outside[curve.circuits[2]] = False
    ref = patch_edges_reference(model, pairs, edges=outside, graph=g)
    torch.testing.assert_close(curve.metric[2], ref, atol=1e-5, rtol=0)
    f_direct = (direct.mean(1) - curve.corrupted.mean()) / (
        curve.clean.mean() - curve.corrupted.mean()
    )
    torch.testing.assert_close(curve.faithfulness, f_direct, atol=1e-5, rtol=0)
    everything = faithfulness_curve(model, pairs, scores=scores, budgets=(0.5, 1.0))
    assert float(everything.faithfulness[1]) == pytest.approx(1.0, abs=1e-5)
    torch.testing.assert_close(curve.clean, model.score(pairs.clean), atol=1e-5, rtol=0)
    torch.testing.assert_close(curve.corrupted, model.score(pairs.corrupted), atol=1e-5, rtol=0)
    cpr, cmd = cpr_cmd(list(BUDGETS), curve.faithfulness.tolist())
    assert (curve.cpr, curve.cmd) == (pytest.approx(cpr), pytest.approx(cmd))


def test_greedy_is_verified_and_nested(model, pairs):
    scores = edge_attribution(model, pairs, method="eap_ig")
    greedy = greedy_circuit(model, pairs, scores=scores, budgets=(0.02, 0.05, 0.1), step=2)
    assert greedy.n_edges == [2, 5, 11]
    for small, big in zip(greedy.circuits, greedy.circuits[1:]):
        assert set(small.tolist()) <= set(big.tolist())  # grown, never pruned
    exact = circuit_metric(model, pairs, circuits=greedy.circuits).mean(1)
    torch.testing.assert_close(greedy.metric[:, 0], exact, atol=1e-5, rtol=0)
    # the first round tried the window (8 best-ranked edges) and kept the 2 closest to f = 1
    ranking = scores.ranking()[:8]
    tried = circuit_metric(model, pairs, circuits=[[int(e)] for e in ranking]).mean(1)
    f = (tried - greedy.corrupted[0]) / (greedy.clean[0] - greedy.corrupted[0])
    best = ranking[torch.argsort((1 - f).abs(), stable=True)[:2]]
    assert set(greedy.circuits[0].tolist()) == set(best.tolist())
    assert greedy.meta["rows"] > 0 and greedy.label == "greedy-cmd(eap_ig)"


def test_circuit_svg_and_heads(model, pairs):
    g = edge_graph(model)
    scores = edge_attribution(model, pairs, method="eap")
    circuit = scores.top(12)
    svg = circuit_svg(g, circuit, scores, title="top 12")
    root = ET.fromstring(svg)
    ns = "{http://www.w3.org/2000/svg}"
    assert len(root.findall(f"{ns}path")) == 12
    titles = [p.find(f"{ns}title").text for p in root.findall(f"{ns}path")]
    assert titles[0].startswith(g.edge_label(int(circuit[0])))
    heads = heads_in(g, circuit)
    assert all(0 <= lay < 2 and 0 <= h < 4 for lay, h in heads)
    senders = {g.senders[int(s)] for s in g.edge_sender[circuit]}
    assert {(s.layer, s.head) for s in senders if s.kind == "head"} <= set(heads)


# ---------------------------------------------------------------------- two processes
def _edges_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(torchrun_env(rank, world, port))
    torch.set_num_threads(1)
    import tempfile

    from mechir import distributed

    distributed.init_from_env("cpu")
    with tempfile.TemporaryDirectory() as tmp:
        model, _, aligned = library_inputs(Path(tmp))
        out = {
            source or "token": edge_attribution(model, aligned, source, method="eap_ig", n_steps=4)
            for source in (None, "mean")
        }
    torch.save({k: (v.pair_scores, v.scores, v.error, v.clean, v.corrupted) for k, v in
                out.items()}, Path(out_dir) / f"rank{rank}.pt")  # fmt: skip
    import torch.distributed as dist

    dist.destroy_process_group()


@pytest.mark.slow
def test_sharded_eap_ig_equals_one_process(tmp_path):
    mp.spawn(_edges_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    model, _, aligned = library_inputs(tmp_path)
    for source in (None, "mean"):
        one = edge_attribution(model, aligned, source, method="eap_ig", n_steps=4)
        for res in ranks:
            pair_scores, scores, error, clean, corrupted = res[source or "token"]
            torch.testing.assert_close(pair_scores, one.pair_scores, atol=1e-5, rtol=0)
            torch.testing.assert_close(scores, one.scores, atol=1e-5, rtol=0)
            torch.testing.assert_close(error, one.error, atol=1e-5, rtol=0)
            torch.testing.assert_close(clean, one.clean, atol=1e-5, rtol=0)
            torch.testing.assert_close(corrupted, one.corrupted, atol=1e-5, rtol=0)
    assert np.isfinite(one.pair_scores.numpy()).all()
