// A fixed number of values as one GCC / clang vector, lowered to the registers of the ISA it is compiled for (each
// target clone): what the CPU kernels use where sums must stay in registers (plain local arrays stay on the stack or
// are vectorised unreliably).  Shared by the Gram kernel (mixit_gram_cpu.cpp) and the fused noise-robust backward.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "isa.h"

namespace nrt_kernels {

template <typename T, int64_t kWidth>
struct LaneVector {
  typedef T type __attribute__((vector_size(kWidth * sizeof(T))));
};

// `count` (<= kWidth) elements of `src` converted to T, zero past `count`.  float and double sources load a whole
// vector at once (then convert lane by lane in registers); other dtypes (Half, BFloat16) convert element by element.
// Always inlined: out of line, a function is compiled for the baseline ISA, not for the clone that calls it.
template <typename T, int64_t kWidth, typename scalar_t>
NRT_ALWAYS_INLINE typename LaneVector<T, kWidth>::type load_vector(const scalar_t* src, int64_t count) {
  if constexpr (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, double>) {
    typename LaneVector<scalar_t, kWidth>::type v = {};
    if (count == kWidth) {
      std::memcpy(&v, src, sizeof(v));  // one vector load
    } else {
      for (int64_t l = 0; l < count; ++l) v[l] = src[l];
    }
    return __builtin_convertvector(v, typename LaneVector<T, kWidth>::type);
  } else {
    typename LaneVector<T, kWidth>::type v = {};
    for (int64_t l = 0; l < count; ++l) v[l] = static_cast<T>(src[l]);
    return v;
  }
}

}  // namespace nrt_kernels
