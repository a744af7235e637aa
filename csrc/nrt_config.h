// Constants that nrt_kernels/build_config.py passes to every compiled source as -D macros (one source for
// Python, C++ and CUDA). A build that forgets them fails here instead of silently using other values.
#pragma once

#if !defined(NRT_ABI_VERSION) || !defined(NRT_MAX_SOURCES) || !defined(NRT_GRAM_MAX_SOURCES) || \
    !defined(NRT_DTYPE_FLOAT32) || \
    !defined(NRT_DTYPE_BFLOAT16) || !defined(NRT_DTYPE_FLOAT16) || !defined(NRT_METRIC_SISDR) || \
    !defined(NRT_METRIC_SDSDR) || !defined(NRT_METRIC_SNR) || !defined(NRT_METRIC_MSE) || !defined(NRT_METRIC_LOG_MSE)
#error "build with the -D flags of nrt_kernels/build_config.py (setup.py, nrt_kernels/_native.py and _cuda_lib.py do)"
#endif

#if !defined(NRT_PIT_MAX_SOURCES) || !defined(NRT_PIT_MAX_EXHAUSTIVE_SOURCES) || !defined(NRT_PIT_NUM_COEFFS) || \
    !defined(NRT_PIT_METRIC_SISDR) || !defined(NRT_PIT_METRIC_SDSDR) || !defined(NRT_PIT_METRIC_SNR) || \
    !defined(NRT_PIT_METRIC_MSE) || !defined(NRT_PIT_METRIC_L1) || !defined(NRT_PIT_METRIC_LOG_MSE)
#error "build with the -D flags of nrt_kernels/build_config.py (the PIT constants are missing)"
#endif
