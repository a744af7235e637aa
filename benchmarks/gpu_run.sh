#!/usr/bin/env bash
# One device call: versions, the kernel tests on CUDA, then the benchmarks. Logs go to $OUT.
set -u
export PYTHONPATH=$PWD TRITON_INTERPRET=0 PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/nrt-out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv
python3 -c "import sys, torch, triton; print(sys.version.split()[0], torch.__version__, triton.__version__)"
date -u
for step in "$@"; do
  echo "=== $step"; start=$(date +%s)
  bash -c "$step" 2>&1 | tee -a "$OUT/log.txt" | tail -n 40
  echo "=== $step took $(( $(date +%s) - start )) s"
done
