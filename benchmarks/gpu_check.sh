#!/usr/bin/env bash
# GPU readiness check, one command (<= 8 minutes on a single-GPU machine):
#   1. the tests marked `gpu` (tests/conftest.py skips them cleanly where CUDA or enough GPUs are missing);
#   2. reference == pipebd (one worker) on the device at fp32 and bf16, bitwise (benchmarks/gpu_check.py);
#   3. the workloads of benchmarks/executors.py profiled at fp32, bf16 and channels_last, with the planners'
#      W = 2/4/8 predictions and the link model they assume, printed and written as JSON
#      (benchmarks/results-gpu-<date>.json on CUDA).
# Without CUDA it runs the same steps on CPU at small sizes and says so on every summary line.
#
#   benchmarks/gpu_check.sh [--quick] [--json PATH] [--measure-links auto|yes|no]
#   GPU_CHECK_QUICK=1 benchmarks/gpu_check.sh      # same as --quick: CPU, smallest sizes (CI proves the script)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"      # this checkout's package, also in spawned workers
export CUBLAS_WORKSPACE_CONFIG="${CUBLAS_WORKSPACE_CONFIG:-:4096:8}"   # deterministic cuBLAS (before first use)
PYTHON="${PYTHON:-python3}"
args=("$@")
if [[ "${GPU_CHECK_QUICK:-0}" == "1" && ! " $* " =~ " --quick " ]]; then args+=("--quick"); fi
start=$(date +%s)
device=$("$PYTHON" -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")
gpus=$("$PYTHON" -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)")
note=""
if [[ $device == cpu ]]; then note=" -- no CUDA: the GPU tests skip, the rest runs on CPU"; fi
echo "gpu_check.sh: device ${device} (${gpus} GPUs visible)${note}"

echo "== 1/3 tests marked gpu"
mapfile -t files < <(grep -rl --include='test_*.py' "pytest.mark.gpu" tests | sort)
"$PYTHON" -m pytest -q -m gpu -rs -p no:cacheprovider "${files[@]}"
tests=$?
if [[ $tests -ne 0 ]]; then echo "gpu_check.sh: the gpu tests FAILED (pytest exit $tests)"; fi

echo "== 2/3 and 3/3: equivalence and profiles"
"$PYTHON" benchmarks/gpu_check.py "${args[@]}"
check=$?

elapsed=$(( $(date +%s) - start ))
if [[ $tests -eq 0 && $check -eq 0 ]]; then verdict=OK; else verdict=FAILED; fi
echo "gpu_check.sh: ${verdict} on ${device} in ${elapsed} s (tests exit ${tests}, checks exit ${check})"
[[ $verdict == OK ]]
