#!/usr/bin/env bash
# The prepared check for a session with a GPU: one device call, its steps capped at 510 s in all (not yet run).
#
#   run tool: command "bash benchmarks/device_check.sh", timeout_s 560
#
# Most important first, each step under its own time limit, so a slow step cannot starve the next:
#   1. the fused V1/V2 kernels against the reference on CUDA (every weight combination, fp64/fp32/fp16, the
#      SDX shape), their tile sweep (loop stages included), and the V1/V2 table (eager and CUDA-graph ms, GB/s,
#      extra memory, launch plans) with the issue 5 verdict;
#   2. the Triton test files on CUDA (TRITON_INTERPRET=0: compiled kernels; NRT_TEST_IMPLS=triton: no C++ or
#      CUDA library build in this step), four processes;
#   3. the MixIT kernels alone (graph replay), their launch plan and tile sweep, into $OUT/tune_mixit.json;
#   4. the report CLI at the SDX shape for MixIT M=4, V1 and V2 (loop, torch.compile, Triton), CSV + plot.
# Everything printed is also in $OUT/log.txt; the report's files in $OUT/report.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/nrt-out}
mkdir -p "$OUT/report"
exec bash benchmarks/gpu_run.sh \
  "timeout 150 python3 benchmarks/noise_robust_gpu.py --check --tune --no-compile" \
  "NRT_TEST_IMPLS=triton timeout 120 python3 -m pytest -q -p no:cacheprovider -n 4 tests/test_noise_robust.py tests/test_mixit_l1.py" \
  "timeout 90 python3 benchmarks/tune_mixit_gpu.py --tune --json $OUT/tune_mixit.json" \
  "timeout 150 python3 -m nrt_kernels.bench --shape sdx --cases mixit-4-generalized,v1,v2 --impl pytorch,compile,triton --out $OUT/report"
