"""GPU vs CPU parity (``cuda`` marker; skipped without CUDA, run by benchmarks/gpu_check.sh):
scores, hooks, NIG, patching sweeps and streaming means computed on the GPU equal the CPU ones,
and the library calls under a 2-GPU nccl group equal one process on the CPU."""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp

from mechir import load_cross_encoder
from tests.helpers import DOCUMENTS, QUERIES, SCIFACT, SHARED_MODEL, requires_shared, tiny_hf_model

pytestmark = pytest.mark.cuda
CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="no CUDA device")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    if not CUDA:
        pytest.skip("no CUDA device")
    from tests.helpers import tiny_tokenizer

    tok = tiny_tokenizer(tmp_path_factory.mktemp("cuda_tok"))
    cpu = load_cross_encoder(tiny_hf_model(0), tokenizer=tok, device="cpu")
    gpu = load_cross_encoder(tiny_hf_model(0), tokenizer=tok, device="cuda")
    return cpu, gpu, tok


@needs_cuda
def test_scores_and_head_knockout_match_cpu(models):
    from mechir.hooks import head_knockout_hooks

    cpu, gpu, _ = models
    batch = cpu.encode(QUERIES, DOCUMENTS, max_length=64)
    torch.testing.assert_close(gpu.score(batch).cpu(), cpu.score(batch), atol=1e-5, rtol=1e-5)
    assert str(gpu.cfg.device).startswith("cuda")
    hooks_cpu = head_knockout_hooks(cpu, heads=["0/1", "1/2"], mode="zero")
    hooks_gpu = head_knockout_hooks(gpu, heads=["0/1", "1/2"], mode="zero")
    torch.testing.assert_close(
        gpu.score(batch, hooks=hooks_gpu).cpu(),
        cpu.score(batch, hooks=hooks_cpu),
        atol=1e-5,
        rtol=1e-5,
    )


@needs_cuda
def test_nig_and_streaming_means_match_cpu(models):
    from mechir.attribution import StreamingMean, neuron_integrated_gradients

    cpu, gpu, _ = models
    batch = cpu.encode(QUERIES, DOCUMENTS, max_length=64)
    for path in ("input", "activation"):
        a = neuron_integrated_gradients(cpu, batch, path=path, n_steps=4)
        b = neuron_integrated_gradients(gpu, batch.to("cuda"), path=path, n_steps=4)
        torch.testing.assert_close(b.attributions.cpu(), a.attributions, atol=1e-4, rtol=1e-4)
    acc = StreamingMean()
    acc.update(b.attributions)  # CUDA values accumulate on the CPU in float64
    torch.testing.assert_close(acc.mean, b.attributions.cpu().mean(0), atol=1e-6, rtol=1e-5)


@needs_cuda
def test_patch_sweep_matches_cpu(models):
    from patching import AlignedPairs, PairBuilder, head_target, patch_sweep, resid_target

    cpu, gpu, tok = models
    builder = PairBuilder(tok, max_length=64, choose="first")
    built = [
        builder.tfc1(q, d, pair_id=f"p{i}") for i, (q, d) in enumerate(zip(QUERIES, DOCUMENTS))
    ]
    pairs = AlignedPairs.from_pairs(built, tok)
    for target in (head_target(by="position"), resid_target(by="part")):
        a = patch_sweep(cpu, pairs, target)
        b = patch_sweep(gpu, pairs.to("cuda"), target)
        torch.testing.assert_close(b.patched, a.patched, atol=1e-5, rtol=1e-5, equal_nan=True)


def _real_model_and_pairs(source: str) -> tuple:
    """The shared SciFact model and quick set, or their embedded demo copies (no ../shared)."""
    from mechir.data import load_collection

    if source == "shared":
        requires_shared()
        return SHARED_MODEL, load_collection(SCIFACT, split="quick").candidates(depth=20)[:64]
    return "demo", load_collection("demo").candidates(depth=20)[:64]


@needs_cuda
@pytest.mark.parametrize("source", [pytest.param("shared", marks=pytest.mark.shared), "demo"])
def test_real_model_scores_match_cpu_in_fp32_and_bf16(source):
    from mechir.evaluation import score_pairs

    model_name, pairs = _real_model_and_pairs(source)
    kw = dict(batch_size=32, max_length=160, progress=False)
    ref = score_pairs(load_cross_encoder(model_name, device="cpu"), pairs, **kw)
    fp32 = score_pairs(load_cross_encoder(model_name, device="cuda"), pairs, **kw)
    torch.testing.assert_close(fp32, ref, atol=1e-4, rtol=1e-4)
    bf16_model = load_cross_encoder(model_name, device="cuda", dtype=torch.bfloat16)
    bf16 = score_pairs(bf16_model, pairs, **kw)
    assert (bf16 - ref).abs().max() < 0.1  # bf16: 8 mantissa bits
    assert torch.corrcoef(torch.stack([bf16, ref]))[0, 1] > 0.999


@pytest.mark.skipif(not CUDA or torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
def test_two_gpus_with_nccl_equal_one_cpu_process(tmp_path):
    from tests.distributed_helpers import (
        free_port,
        library_inputs,
        library_results,
        library_worker,
    )

    mp.spawn(library_worker, args=(2, free_port(), str(tmp_path), "cuda"), nprocs=2, join=True)
    ref = library_results(*library_inputs(tmp_path))
    for r in range(2):
        got = torch.load(tmp_path / f"rank{r}.pt", weights_only=False)
        assert got["device"] == f"cuda:{r}"
        torch.testing.assert_close(got["scores"], ref["scores"], atol=1e-5, rtol=1e-5)
        for k in ref["nig"]["keys"]:
            torch.testing.assert_close(
                got["nig"]["means"][k], ref["nig"]["means"][k], atol=1e-4, rtol=1e-4
            )
        torch.testing.assert_close(
            got["heads_by_position"]["patched"],
            ref["heads_by_position"]["patched"],
            atol=1e-5,
            rtol=1e-5,
            equal_nan=True,
        )
