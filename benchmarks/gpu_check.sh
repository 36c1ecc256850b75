#!/usr/bin/env bash
# One command for a CUDA machine: the CUDA-marked tests (GPU vs CPU parity of scores, hooks, NIG,
# patching; nccl with 2 GPUs), then the GPU benchmarks, JSON under benchmarks/results/:
#   gpu_check_tests.txt   pytest -m cuda output
#   gpu_cuda.json         scoring fp32/bf16 vs HF eager, NIG kernel vs naive vs captum, patching
#                         sweep vs per-cell, each against the CPU      (benchmarks/bench_gpu.py)
#   scoring_cuda.json     hooked vs HF eager throughput                (benchmarks/bench_scoring.py)
#   gpu_throughput_cuda.json pairs/s and TFLOP/s as a fraction of peak: MiniLM-L6, BERT-base,
#                         BERT-large, Qwen3-0.6B shapes x batch 64..2048 x bf16/fp32/tf32 x fused
#                         / explicit attention / direction ablation / HF eager / HF sdpa
#                         (benchmarks/bench_gpu_throughput.py, issue 34; rows past 300 s skipped)
#   nig_accuracy_cuda.json NIG time to 1% / 5% error: auto vs fixed rules, naive loop, captum
#                         (benchmarks/bench_nig_accuracy.py, issue 14)
#   guided_patching_cuda.json guided exact top-k patching vs the full sweep (miss rate), heads and
#                         heads x part, 20 pairs
#                         (benchmarks/bench_guided_patching.py, issue 14)
#   edges_cuda.json       all-edge EAP-IG vs exact per-edge patching (batched and naive loop),
#                         Spearman, top-1% faithfulness (benchmarks/bench_edges.py, issue 22),
#                         after the edge tests' GPU parity check (tests/patching/test_edges.py)
#   scoring_deberta-v3-base_cuda.json, scoring_monot5-base_cuda.json, decoder_cuda.json  the
#                         new families' scoring vs HF (random checkpoints of mxbai-rerank-base-v1's /
#                         monot5-base-msmarco's / Qwen3-Reranker-0.6B's shape)
#   distributed_cuda.json 1..N GPUs data-parallel rerank + NIG, when N > 1 GPUs are visible
# Sized for < 10 minutes on one H100/H200 (each step has its own time limit). Without CUDA it says
# so and exits 0.   Usage: bash benchmarks/gpu_check.sh   (from any directory)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1
PY=${PYTHON:-python}
if ! "$PY" -c "import torch" 2>/dev/null; then
    echo "gpu_check: '$PY' cannot import torch; activate the project's environment first." >&2
    exit 1
fi
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: no CUDA device visible; nothing to measure (GPU figures stay 'not measured')."
    exit 0
fi
GPUS=$("$PY" -c "import torch; print(torch.cuda.device_count())")
"$PY" -c "import torch; print('gpu_check:', torch.cuda.get_device_name(0), 'x', torch.cuda.device_count(), 'torch', torch.__version__)"
mkdir -p benchmarks/results
status=0
step() {  # step <seconds> <command...>: run with a time limit, keep going on failure
    local limit=$1; shift
    echo "== $*"
    local start=$SECONDS
    timeout "$limit" "$@" || { echo "gpu_check: FAILED ($?) $*"; status=1; }
    echo "   ($((SECONDS - start)) s)"
}
step 150 bash -c '"$0" -m pytest -q -rs -m cuda tests/test_cuda.py 2>&1 |
    tee benchmarks/results/gpu_check_tests.txt; exit "${PIPESTATUS[0]}"' "$PY"
step 150 "$PY" benchmarks/bench_gpu.py --device cuda
step 60 "$PY" benchmarks/bench_scoring.py --device cuda --pairs 1000 --batch-size 64 --repeats 3
step 360 "$PY" benchmarks/bench_gpu_throughput.py --device cuda --budget-s 300
step 240 "$PY" benchmarks/bench_nig_accuracy.py --device cuda
step 200 "$PY" benchmarks/bench_guided_patching.py --device cuda --pairs 20 \
    --targets heads "heads x part" --cache /tmp/mechir_guided_cuda
step 60 "$PY" -m pytest -q -rs -m cuda tests/patching/test_edges.py
step 240 "$PY" benchmarks/bench_edges.py --device cuda --pairs 2 --naive-sample 30
step 60 "$PY" -m pytest -q -rs tests/families -k "bf16 or cuda"
step 60 "$PY" benchmarks/bench_scoring.py --device cuda --shape deberta-v3-base --pairs 256 \
    --batch-size 32 --repeats 3
step 60 "$PY" benchmarks/bench_scoring.py --device cuda --shape monot5-base --pairs 256 \
    --batch-size 32 --repeats 3
step 150 "$PY" benchmarks/bench_decoder.py --device cuda --pairs 8 --batch-size 8 --repeats 3
if [ "$GPUS" -gt 1 ]; then
    procs=1; n=2
    while [ "$n" -le "$GPUS" ]; do procs="$procs,$n"; n=$((n * 2)); done
    step 120 "$PY" benchmarks/bench_distributed.py --device cuda --procs "$procs" \
        --batch-size 64 --nig-pairs 64 --nig-batch 4
else
    echo "== one GPU visible: multi-GPU scaling not measured"
fi
echo "gpu_check: done (status $status); results in benchmarks/results/"
exit $status
