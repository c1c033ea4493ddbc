#!/usr/bin/env bash
# The checks that need a CUDA GPU, as one script for a lent GPU machine (see the device tool):
# the GPU-marked tests, then transfer bandwidth and engine speed on cuda. Everything it prints
# goes to $OUT (or ./gpu-checks) as well as the terminal.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu-checks}"
mkdir -p "$out"
export PYTHONPATH="$PWD:${PYTHONPATH:-}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python -m pytest -q -m gpu 2>&1 | tail -20 | tee "$out/gpu-tests.txt"
python benchmarks/bench_transfer.py --device cuda --mib 336 --reps 10 2>&1 | tee "$out/transfer-bf16-expert.txt"
python benchmarks/bench_transfer.py --device cuda --mib 94.5 --reps 10 2>&1 | tee "$out/transfer-nf4-expert.txt"
python benchmarks/bench_engine.py --device cuda --dtype bfloat16 --shape medium 2>&1 | tail -15 | tee "$out/engine-cuda.txt"
python benchmarks/bench_quant.py --device cuda --formats bf16,int8,nf4,nf4-dq 2>&1 | tail -15 | tee "$out/quant-cuda.txt"
python benchmarks/bench_cache.py --part speed --device cuda 2>&1 | tail -20 | tee "$out/cache-cuda.txt"
python -m cli bench offload/demo/model -p 256 -n 64 -r 3 --experts-per-layer 4 --policy lru,combined --device cuda 2>&1 | tee "$out/policy-cuda.md"
python benchmarks/bench_policies.py --device cuda --ram 0 --depths 1,2 2>&1 | tail -12 | tee "$out/policies-cuda-disk.md"
python benchmarks/bench_policies.py --device cuda --depths 1,2 2>&1 | tail -12 | tee "$out/policies-cuda-ram.md"
python -m cli profile --device cuda --out "$out/this-gpu.toml" 2>&1 | tail -12 | tee "$out/profile-cuda.txt"
python -m cli bench offload/demo/model -p 256 -n 64 -r 3 --profile "$out/this-gpu.toml" --device cuda 2>&1 | tee "$out/bench-profile-cuda.md"
