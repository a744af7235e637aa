// Runtime ISA dispatch of the CPU kernels, one definition for all of them.  The module is built without -march, so
// that it runs on any x86-64 / aarch64 CPU; its hot loops are compiled for AVX-512, AVX2 and the baseline and the
// best the CPU has runs:
//  - NRT_ISA_CLONES (function multiversioning: one body, a clone per ISA, an ifunc resolver picks one at load time)
//    where the same code suits every ISA;
//  - NRT_TARGET_AVX512 / NRT_TARGET_AVX2 and native_isa() where the body differs per ISA (a wider vector on
//    AVX-512 than AVX2 can hold in its registers): the kernel instantiates one function per ISA and picks one.
// Every variant performs the same IEEE operations in the same order (the build's -ffp-contract=off fuses no
// multiply-add), hence results are bitwise identical across CPUs.  Helpers are always inlined into a variant, so
// they are compiled for its ISA; out of line, a function is compiled for the baseline.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <stdexcept>
#include <string>

#if defined(__x86_64__) && defined(__linux__) && (defined(__GNUC__) || defined(__clang__))
#define NRT_ISA_DISPATCH 1
#define NRT_ISA_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#define NRT_TARGET_AVX512 __attribute__((target("avx512f")))
#define NRT_TARGET_AVX2 __attribute__((target("avx2")))
#else
#define NRT_ISA_DISPATCH 0
#define NRT_ISA_CLONES
#define NRT_TARGET_AVX512
#define NRT_TARGET_AVX2
#endif

#if defined(__GNUC__) || defined(__clang__)
#define NRT_ALWAYS_INLINE inline __attribute__((always_inline))
// For a lambda inside an ISA variant: one left out of line is compiled for the baseline ISA.
#define NRT_INLINE_LAMBDA __attribute__((always_inline))
#else
#define NRT_ALWAYS_INLINE inline
#define NRT_INLINE_LAMBDA
#endif

namespace nrt_kernels {

enum class Isa { kBaseline, kAvx2, kAvx512 };

// The widest ISA this CPU runs, by the test NRT_ISA_CLONES' resolver makes (so both kinds of dispatch agree), capped
// by the environment variable NRT_CPU_ISA ("default", "avx2" or "avx512f", the clones' names) where it is set:
// tests/test_cpu_extension.py runs every variant on one CPU with it.  Read at each call (a few nanoseconds).
inline Isa native_isa() {
  Isa isa = Isa::kBaseline;
#if NRT_ISA_DISPATCH
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) {
    isa = Isa::kAvx512;
  } else if (__builtin_cpu_supports("avx2")) {
    isa = Isa::kAvx2;
  }
#endif
  if (const char* cap = std::getenv("NRT_CPU_ISA")) {
    const std::string name = cap;
    Isa limit;
    if (name == "default") {
      limit = Isa::kBaseline;
    } else if (name == "avx2") {
      limit = Isa::kAvx2;
    } else if (name == "avx512f") {
      limit = Isa::kAvx512;
    } else {
      throw std::invalid_argument("NRT_CPU_ISA must be default, avx2 or avx512f, got " + name);
    }
    isa = std::min(isa, limit);
  }
  return isa;
}

}  // namespace nrt_kernels
