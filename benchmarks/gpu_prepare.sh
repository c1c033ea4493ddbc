#!/usr/bin/env bash
# Run HERE (not on the GPU machine) before benchmarks/gpu_checks.sh: fills .gpu/ (git-ignored),
# which the device tool carries (`carry: [".gpu"]`):
#   .gpu/site/bitsandbytes   bitsandbytes (the version installed here), trimmed to its Python files
#                            and its CUDA 13.0 and CPU libraries (~5 MB instead of 129 MB)
#   .gpu/trace-p0.jsonl      the shared HumanEval problem-0 decode trace in the engine's format
#                            (the shared traces sit outside the checkout and do not travel)
set -euo pipefail
cd "$(dirname "$0")/.."
version="$(python -c 'import importlib.metadata as m; print(m.version("bitsandbytes"))')"
rm -rf .gpu/site .gpu/wheel && mkdir -p .gpu/site .gpu/wheel
python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    -d .gpu/wheel "bitsandbytes==$version"
python - <<'PY'
import glob, zipfile
wheel = glob.glob(".gpu/wheel/bitsandbytes-*.whl")[0]
with zipfile.ZipFile(wheel) as z:
    keep = [n for n in z.namelist() if n.startswith("bitsandbytes/") and (
        n.endswith(".py") or n.endswith("py.typed") or n.endswith(("_cuda130.so", "_cpu.so")))]
    z.extractall(".gpu/site", keep)
print(f"{wheel}: kept {len(keep)} files")
PY
rm -rf .gpu/wheel
python -m cli trace convert ../shared/traces/mixtral-8x7b-instruct/humaneval_p0_p1_decode.jsonl \
    .gpu/trace-p0.jsonl --problem 0 --force
du -sh .gpu
