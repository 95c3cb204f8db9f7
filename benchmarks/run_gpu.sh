#!/usr/bin/env bash
# Every GPU case of the DUO step benchmark in one invocation, then the memory estimate beside each measured peak (about 3-5 minutes on an H100; the script
# stops starting new cases after --time_budget_s, 420 s by default).
#
#   bash benchmarks/run_gpu.sh                 # JSON and log into $OUT if set, else benchmarks/results/
#   bash benchmarks/run_gpu.sh --measure_steps 4
#
# A machine without internet access may lack diffusers (and bitsandbytes for 8-bit Adam): put their
# wheels in .whl/ at the repository root and they are installed first (see benchmarks/README.md).
set -euo pipefail
cd "$(dirname "$0")/.."

if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/duo-site .whl/*.whl
  export PYTHONPATH="/tmp/duo-site${PYTHONPATH:+:$PYTHONPATH}"
fi

out_dir="${OUT:-benchmarks/results}"
mkdir -p "$out_dir"
stamp="$(date -u +%F)"
if command -v nvidia-smi > /dev/null; then
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv > "$out_dir/gpu-$stamp-nvidia-smi.csv" || true
fi

export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python3 benchmarks/benchmark_step.py --suite gpu --output "$out_dir/gpu-$stamp.json" "$@" 2>&1 | tee "$out_dir/gpu-$stamp.log"

# The estimate (duo_plugin.memory, fake tensors) beside every measured max_memory_allocated: the first GPU
# run validates the estimator.
python3 benchmarks/memory_estimates.py --compare "$out_dir/gpu-$stamp.json" 2>&1 | tee -a "$out_dir/gpu-$stamp.log"
