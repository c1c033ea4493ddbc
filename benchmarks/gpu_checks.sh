#!/usr/bin/env bash
# The checks that need a CUDA GPU, as one script for a lent GPU machine (the device tool), in
# under 8 minutes, every step under `timeout`, all output in two files under $OUT:
#   gpu_checks.log    every step's output, each headed "== step (limit s)" and ended "-> rc N, S s"
#   gpu_results.json  the true-size numbers (benchmarks/gpu_bench.py --json)
#
# Before: `bash benchmarks/gpu_prepare.sh` here (bitsandbytes trimmed to CUDA 13 + CPU, and the
# HumanEval trace in the engine's format, under .gpu/). Then, with the device tool:
#   run(command="bash benchmarks/gpu_checks.sh", carry=[".gpu"], timeout_s=540)
#
# Steps: the environment; the gpu-marked tests; a plain pinned copy of one 4-bit Mixtral expert
# against the cache's load path; a synthetic 4-bit Mixtral-8x7B pack of $LAYERS layers (nf4, for
# CUDA); and gpu_bench.py on it with the real routing replayed, under memory caps emulating 12
# and 24 GiB cards with --cpu-experts off, auto and all (decode tok/s, share of expert uses on the
# CPU, stall, MiB/token, link GB/s, overlap, peak vs plan, exactness), and the gpu-marked tests'
# CPU-vs-GPU tolerance checks of experts and logits.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu-checks}"
mkdir -p "$out"
log="$out/gpu_checks.log"
: >"$log"
export PYTHONPATH="$PWD/.gpu/site:$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
LAYERS="${LAYERS:-8}"    # of 32; the trace has 25 aligned layers
PACK="${PACK:-/tmp/offload-synth-$LAYERS}"
TRACE="${TRACE:-.gpu/trace-p0.jsonl}"
PY="${PYTHON:-python3}"

step() {  # step NAME LIMIT_SECONDS COMMAND...
    local name="$1" limit="$2"
    shift 2
    echo "== $name ($limit s)" >>"$log"
    local start=$SECONDS
    timeout --kill-after=5 "$limit" "$@" >>"$log" 2>&1
    local rc=$?
    echo "-> rc $rc, $((SECONDS - start)) s" >>"$log"
    return 0
}

step environment 20 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; \
    $PY -c 'import sys, torch, bitsandbytes; print(sys.version.split()[0], torch.__version__, torch.version.cuda, \
    torch.cuda.get_device_name(), \"bitsandbytes\", bitsandbytes.__version__)'; nproc; free -g; df -h /tmp"
step gpu-tests 100 "$PY" -m pytest -q -m gpu -p no:cacheprovider --timeout 60 tests
step transfer 25 "$PY" benchmarks/bench_transfer.py --device cuda --mib 94.5 --reps 10
step synth 70 "$PY" -m cli synth mixtral-8x7b "$PACK" --layers "$LAYERS" --expert-format nf4 --force
step true-size 230 "$PY" -m benchmarks.gpu_bench --pack "$PACK" --trace "$TRACE" --cards 12,24 \
    --policies history --cpu-experts off,auto,all --reps 2 --json "$out/gpu_results.json"
rm -rf "$PACK"
echo "== done" >>"$log"
