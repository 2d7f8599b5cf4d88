#!/usr/bin/env bash
# The prepared GPU check: everything a lent H200 should show, in one run of at most 8 minutes.
#
#   1. install the wheels loadtest/gpu_wheels.sh fetched (carry .whl; nothing downloads there);
#   2. the gpu and kernels tests: every Triton kernel against its reference op compiled on CUDA,
#      the engine against PEFT on CUDA (float32 exact tokens, both kernel backends), the server
#      on CUDA answering the openai SDK;
#   3. python -m loadtest.gpu_check on a Llama-3-8B shape with random weights: base only, N = 8
#      and 64 adapters, PEFT's mixed batch, a decode step against the bandwidth roofline.
# Everything lands under $OUT (the device tool's folder that comes back; default
# loadtest-results/gpu): gpu_check.md is the table for BENCHMARKS.md.
#
# From the device tool, in the repo root:  bash loadtest/gpu_check.sh   (carry: .whl)
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-loadtest-results/gpu}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/server:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.csv"
python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)' | tee -a "$out/gpu.csv"
# 2. the gpu and kernels tiers (named files: other test modules import what this machine lacks)
timeout 210 python3 -m pytest -q -m "gpu or kernels" -p no:cacheprovider --continue-on-collection-errors \
    tests/test_kernels_lora.py tests/test_kernels_attention.py tests/test_engine_matches_peft.py tests/test_gpu.py \
    2>&1 | tee "$out/gpu-tests.log"
tests=${PIPESTATUS[0]}
# 3. the benchmark
timeout 240 python3 -m loadtest.gpu_check --out "$out/gpu_check.md" --json "$out/gpu_check.json" 2>&1 | tee "$out/gpu_check.log"
bench=${PIPESTATUS[0]}
echo "gpu tests exit $tests, benchmark exit $bench"
exit $(( tests != 0 || bench != 0 ))
