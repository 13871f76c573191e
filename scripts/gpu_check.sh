#!/usr/bin/env bash
# The GPU check: everything boftlab claims about CUDA, run on one GPU in at most 8 minutes (an H200's budget), results
# under $OUT (default ./gpu-check). Offline: uses the installed packages, installs nothing.
#
#   OUT=/tmp/gpu scripts/gpu_check.sh
#
# 1. environment: nvidia-smi, versions, torch.cuda, Triton                                     (stops here without CUDA)
# 2. CUDA tests: the fused kernel against the PyTorch path (tests/test_kernels.py, compiled on CUDA), every family
#    forward/backward/merge on CUDA in fp32/bf16/fp16 against the CPU, BOFT on every path and kernel (tests/test_cuda.py)
# 3. benchmarks: python -m boftlab.bench layers models llama (fused-kernel rows, kernel bandwidth, Llama 1.1B)
# 4. notebooks 00 and 07, executed with the ci profile on CUDA (outputs kept)
# Each stage has its own time limit and the next one runs whatever happened; $OUT/summary.txt lists every stage's exit
# status and wall time. Exit status: 0 if every stage passed, 2 without a CUDA device, 1 otherwise.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu-check}"
mkdir -p "$OUT/notebooks"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
export MPLBACKEND=Agg BOFTLAB_PROFILE=ci
unset TRITON_INTERPRET BOFTLAB_KERNEL

# the test files stage 2 runs (tests/test_gpu_check.py checks on CPU that they are collected and skip cleanly)
CUDA_TESTS=(tests/test_cuda.py tests/test_kernels.py)
# seconds per stage: 15 + 150 + 180 + 2 × 65 = 475 s ≤ 8 minutes
LIMIT_ENV=15 LIMIT_TESTS=150 LIMIT_BENCH=180 LIMIT_NOTEBOOK=65

failed=0
stage() {  # stage NAME LIMIT COMMAND...: run with a time limit, log to $OUT/NAME.log, record status and time
    local name=$1 limit=$2 start status
    shift 2
    start=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
    status=$?
    echo "$name: exit $status, $(($(date +%s) - start)) s (limit $limit s)" | tee -a "$OUT/summary.txt"
    [ "$status" -eq 0 ] || failed=1
    return "$status"
}

: >"$OUT/summary.txt"
stage environment "$LIMIT_ENV" python - <<'EOF'
import shutil, subprocess, sys
import torch
if shutil.which("nvidia-smi"):
    print(subprocess.run(["nvidia-smi"], capture_output=True, text=True).stdout)
else:
    print("nvidia-smi: not found")
print("python", sys.version.split()[0], "| torch", torch.__version__, "| CUDA", torch.version.cuda)
try:
    import triton
    print("triton", triton.__version__)
except ImportError:
    print("triton: not installed (the fused kernel cannot run; its tests skip)")
if not torch.cuda.is_available():
    sys.exit("no CUDA device is visible to torch: nothing here can be checked")
print("device", torch.cuda.get_device_name(), "capability", torch.cuda.get_device_capability())
EOF
if [ $? -ne 0 ]; then
    cat "$OUT/environment.log"
    exit 2
fi

stage cuda-tests "$LIMIT_TESTS" python -m pytest -q -p no:cacheprovider -rs "${CUDA_TESTS[@]}" \
    -k "not compile_ahead" --junitxml="$OUT/cuda-tests.xml"
stage bench "$LIMIT_BENCH" python -m boftlab.bench layers models llama --budget 4 --out "$OUT/bench-gpu.md"
for notebook in 00_quickstart 07_vit_finetuning; do
    stage "notebook-${notebook%%_*}" "$LIMIT_NOTEBOOK" jupyter nbconvert --to notebook --execute \
        --ExecutePreprocessor.timeout="$LIMIT_NOTEBOOK" --output-dir "$OUT/notebooks" "notebooks/$notebook.ipynb"
done

cat "$OUT/summary.txt"
exit "$failed"
