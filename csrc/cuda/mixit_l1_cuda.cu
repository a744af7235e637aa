// Hand-written CUDA kernels of the fused MixIT L1 (impl="cuda"); the algorithm and the semantics are
// those of nrt_kernels/ops/mixit_l1.py and nrt_kernels/reference.py.
//
// This file includes no torch header on purpose: it is compiled by plain nvcc into a shared library
// (cudart linked statically) and driven through ctypes by nrt_kernels/_cuda_lib.py, which owns every
// allocation and passes raw pointers, sizes, a dtype code and the caller's stream.  Building it takes
// seconds and needs no torch CUDA headers.
//
// Forward, per batch row b (est (B, M, D), mixtures (B, N, D), both contiguous, one dtype):
//   1. subset_l1_partials_kernel: a block owns (row, chunk of D, block of mixtures, `high` subset
//      bits).  Every thread streams 16-byte vectors of the sources and mixtures, forms the sums of
//      all 2**LOW subsets of the low sources in registers (plus the fixed sum of the block's high
//      sources) and accumulates |subset_sum - mix_n| in float32.  The block's totals are written to
//      partials[row, chunk, n, mask]: no float atomics, so the result is bitwise reproducible.
//   2. select_best_kernel: one block per row adds the chunks in a fixed order, scores every candidate
//      of nrt_kernels.assignments from its N (mixture, subset) errors and keeps the first minimum,
//      NaN ranking first (torch.min semantics).
// Backward: mixit_l1_backward_kernel recomputes each mixture's error under the row's best candidate
// and writes grad_est = grad_row / (N * D) * sign(err) (and -that for the mixtures).

#include "../nrt_config.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>
#include <cstring>
#include <initializer_list>

namespace {

// 256 threads: 8 warps is enough to keep 16-byte loads in flight for the memory-bound common case
// while the block-level reduction of up to 64 accumulators stays a 2 KB shared array.
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr unsigned kFullMask = 0xffffffffu;
// Mixtures handled by one forward block; larger N is split into groups of this many.
constexpr int kMaxMixtureBlock = 4;
constexpr int kMaxSources = NRT_MAX_SOURCES;
constexpr int kMaxCachedDevices = 64;

enum DTypeCode : int { kFloat32 = NRT_DTYPE_FLOAT32, kBFloat16 = NRT_DTYPE_BFLOAT16, kFloat16 = NRT_DTYPE_FLOAT16 };

// ------------------------------------------------------------------------------------------------
// 16-byte vector loads and stores, converted to / from float32
// ------------------------------------------------------------------------------------------------

template <typename T>
struct VecWidth {
  static constexpr int value = 16 / sizeof(T);
};

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }

// Unpacks one 16-byte word into float32 lanes.
__device__ __forceinline__ void unpack(const uint4& raw, float (&out)[4]) {
  out[0] = __uint_as_float(raw.x);
  out[1] = __uint_as_float(raw.y);
  out[2] = __uint_as_float(raw.z);
  out[3] = __uint_as_float(raw.w);
}

__device__ __forceinline__ void unpack_pair(unsigned word, float& lo, float& hi, __nv_bfloat16) {
  // bfloat16 is the upper half of a float32: widening is a shift, exact.
  lo = __uint_as_float(word << 16);
  hi = __uint_as_float(word & 0xffff0000u);
}

__device__ __forceinline__ void unpack_pair(unsigned word, float& lo, float& hi, __half) {
  __half2 pair;
  memcpy(&pair, &word, sizeof(word));
  const float2 wide = __half22float2(pair);
  lo = wide.x;
  hi = wide.y;
}

template <typename T>
__device__ __forceinline__ void unpack(const uint4& raw, float (&out)[8]) {
  unpack_pair(raw.x, out[0], out[1], T{});
  unpack_pair(raw.y, out[2], out[3], T{});
  unpack_pair(raw.z, out[4], out[5], T{});
  unpack_pair(raw.w, out[6], out[7], T{});
}

// Loads elements [e, e + V) of one row of length `length`; elements past the end read as 0, which
// adds exactly 0 to every |subset_sum - mix| term.  `aligned` (rows 16-byte aligned) is uniform over
// the grid, so the branch never diverges.
template <typename T>
__device__ __forceinline__ void load_vec(const T* __restrict__ row, int64_t e, int64_t length, bool aligned,
                                         float (&out)[VecWidth<T>::value]) {
  constexpr int V = VecWidth<T>::value;
  if (aligned && e + V <= length) {
    const uint4 raw = __ldg(reinterpret_cast<const uint4*>(row + e));
    if constexpr (V == 4) {
      unpack(raw, out);
    } else {
      unpack<T>(raw, out);
    }
  } else {
#pragma unroll
    for (int i = 0; i < V; ++i) out[i] = e + i < length ? to_float(row[e + i]) : 0.0f;
  }
}

template <typename T>
__device__ __forceinline__ void store_vec(T* __restrict__ row, int64_t e, int64_t length, bool aligned,
                                          const float (&values)[VecWidth<T>::value]) {
  constexpr int V = VecWidth<T>::value;
  if (aligned && e + V <= length) {
    T packed[V];
#pragma unroll
    for (int i = 0; i < V; ++i) packed[i] = from_float<T>(values[i]);
    uint4 raw;
    memcpy(&raw, packed, sizeof(raw));
    *reinterpret_cast<uint4*>(row + e) = raw;
  } else {
#pragma unroll
    for (int i = 0; i < V; ++i) {
      if (e + i < length) row[e + i] = from_float<T>(values[i]);
    }
  }
}

__host__ __device__ constexpr int lowest_bit(int mask) { return (mask & 1) ? 0 : 1 + lowest_bit(mask >> 1); }

// ------------------------------------------------------------------------------------------------
// Kernel 1: per (row, chunk, mixture block, high bits) partial errors of every subset
// ------------------------------------------------------------------------------------------------

// Warp reduce-scatter of Count groups of NB accumulators: at each level a lane sends the half of its
// groups that its partner keeps, so summing G groups costs about G * NB shuffles instead of
// 5 * G * NB.  After the levels where Count >= 2 a lane holds only the groups named by its lane
// bits (see group_of); once a single group is left the remaining levels are a plain butterfly.
template <int NB, int G, int Count, int Offset>
__device__ __forceinline__ void warp_reduce_scatter(float (&acc)[NB][G], int lane) {
  if constexpr (Offset > 0) {
    if constexpr (Count >= 2) {
      constexpr int kHalf = Count / 2;
      const bool upper = (lane & Offset) != 0;
#pragma unroll
      for (int g = 0; g < kHalf; ++g) {
#pragma unroll
        for (int n = 0; n < NB; ++n) {
          const float send = upper ? acc[n][g] : acc[n][g + kHalf];
          const float keep = upper ? acc[n][g + kHalf] : acc[n][g];
          acc[n][g] = keep + __shfl_xor_sync(kFullMask, send, Offset);
        }
      }
      warp_reduce_scatter<NB, G, kHalf, Offset / 2>(acc, lane);
    } else {
#pragma unroll
      for (int n = 0; n < NB; ++n) acc[n][0] += __shfl_xor_sync(kFullMask, acc[n][0], Offset);
      warp_reduce_scatter<NB, G, 1, Offset / 2>(acc, lane);
    }
  }
}

template <int G>
struct ScatterLayout {
  static constexpr int levels = lowest_bit(G) < 5 ? lowest_bit(G) : 5;  // log2(G) capped at log2(32)
  static constexpr int held = G >> levels;                               // groups a lane holds after
  static constexpr int writer_mask = (1 << (5 - levels)) - 1;            // lanes with these bits 0 write
  // Group index of acc[.][i] on `lane` after warp_reduce_scatter: level l kept the upper half of the
  // then-current groups when lane bit (4 - l) was set.
  __device__ static __forceinline__ int group_of(int i, int lane) {
    int g = i;
#pragma unroll
    for (int l = 0; l < levels; ++l) g += ((lane >> (4 - l)) & 1) * (G >> (l + 1));
    return g;
  }
};

template <typename T, int NB, int LOW>
__global__ void __launch_bounds__(kThreads) subset_l1_partials_kernel(
    const T* __restrict__ est, const T* __restrict__ mix, float* __restrict__ partials, int num_sources,
    int num_mixtures, int64_t length, int64_t chunk_len, int num_chunks, int num_highs, int num_groups,
    bool aligned) {
  constexpr int V = VecWidth<T>::value;
  constexpr int G = 1 << LOW;
  using Layout = ScatterLayout<G>;
  __shared__ float warp_totals[kWarps][NB * G];

  // High bits vary fastest so that the blocks reading the same chunk run together and share L2.
  int64_t block = blockIdx.x;
  const int high = static_cast<int>(block % num_highs);
  block /= num_highs;
  const int group = static_cast<int>(block % num_groups);
  block /= num_groups;
  const int chunk = static_cast<int>(block % num_chunks);
  const int64_t row = block / num_chunks;
  const int first_mixture = group * NB;

  const T* est_row = est + row * num_sources * length;
  const T* mix_row = mix + (row * num_mixtures + first_mixture) * length;
  const int64_t begin = static_cast<int64_t>(chunk) * chunk_len;
  const int64_t end = begin + chunk_len < length ? begin + chunk_len : length;

  float acc[NB][G];
#pragma unroll
  for (int n = 0; n < NB; ++n) {
#pragma unroll
    for (int g = 0; g < G; ++g) acc[n][g] = 0.0f;
  }

  for (int64_t e = begin + static_cast<int64_t>(threadIdx.x) * V; e < end; e += kThreads * V) {
    // Every load of the iteration is issued before the first use.
    float low[LOW][V];
    float mixture[NB][V];
#pragma unroll
    for (int s = 0; s < LOW; ++s) load_vec(est_row + s * length, e, length, aligned, low[s]);
#pragma unroll
    for (int n = 0; n < NB; ++n) {
      if (first_mixture + n < num_mixtures) {
        load_vec(mix_row + n * length, e, length, aligned, mixture[n]);
      } else {
#pragma unroll
        for (int i = 0; i < V; ++i) mixture[n][i] = 0.0f;
      }
    }
    float base[V];
#pragma unroll
    for (int i = 0; i < V; ++i) base[i] = 0.0f;
    // Sources above LOW enter only as the block's fixed `high` subset: load just the chosen ones.
    for (int s = LOW; s < num_sources; ++s) {
      if ((high >> (s - LOW)) & 1) {
        float x[V];
        load_vec(est_row + s * length, e, length, aligned, x);
#pragma unroll
        for (int i = 0; i < V; ++i) base[i] += x[i];
      }
    }
#pragma unroll
    for (int i = 0; i < V; ++i) {
      // sums[g] = base + the low sources in g, built from g minus its lowest source: one add each.
      float sums[G];
      sums[0] = base[i];
#pragma unroll
      for (int g = 1; g < G; ++g) sums[g] = sums[g & (g - 1)] + low[lowest_bit(g)][i];
#pragma unroll
      for (int n = 0; n < NB; ++n) {
#pragma unroll
        for (int g = 0; g < G; ++g) acc[n][g] += fabsf(sums[g] - mixture[n][i]);
      }
    }
  }

  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  warp_reduce_scatter<NB, G, G, 16>(acc, lane);
  if ((lane & Layout::writer_mask) == 0) {
#pragma unroll
    for (int i = 0; i < Layout::held; ++i) {
      const int g = Layout::group_of(i, lane);
#pragma unroll
      for (int n = 0; n < NB; ++n) warp_totals[warp][n * G + g] = acc[n][i];
    }
  }
  __syncthreads();
  const int num_masks = 1 << num_sources;
  for (int t = threadIdx.x; t < NB * G; t += kThreads) {
    const int n = t / G;
    const int g = t % G;
    if (first_mixture + n >= num_mixtures) continue;
    float total = 0.0f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) total += warp_totals[w][t];
    partials[((row * num_chunks + chunk) * num_mixtures + first_mixture + n) * num_masks + high * G + g] = total;
  }
}

// ------------------------------------------------------------------------------------------------
// Kernel 2: per row, chunk totals and the first best candidate
// ------------------------------------------------------------------------------------------------

__global__ void __launch_bounds__(kThreads) select_best_kernel(
    const float* __restrict__ partials, const int* __restrict__ masks, float* __restrict__ row_loss,
    int64_t* __restrict__ best, int num_mixtures, int num_masks, int num_chunks, int num_candidates,
    float count) {
  extern __shared__ float errors[];  // (N, 2**M): this row's error of every (mixture, subset)
  __shared__ float warp_key[kWarps];
  __shared__ int warp_cand[kWarps];
  const int64_t row = blockIdx.x;
  const int entries = num_mixtures * num_masks;
  const float* row_partials = partials + row * num_chunks * entries;
  for (int t = threadIdx.x; t < entries; t += kThreads) {
    float total = 0.0f;
    for (int c = 0; c < num_chunks; ++c) total += row_partials[static_cast<int64_t>(c) * entries + t];
    errors[t] = total;
  }
  __syncthreads();

  // Losses are >= 0, so key -1 ranks NaN before every number; a thread sees its candidates in
  // increasing order and keeps the first minimum (its first candidate counts even at +inf).
  float best_key = INFINITY;
  int best_cand = INT_MAX;
  for (int c = threadIdx.x; c < num_candidates; c += kThreads) {
    float total = 0.0f;
    for (int n = 0; n < num_mixtures; ++n) total += errors[n * num_masks + masks[c * num_mixtures + n]];
    const float key = isnan(total) ? -1.0f : total;
    if (best_cand == INT_MAX || key < best_key) {
      best_key = key;
      best_cand = c;
    }
  }
  // Merge by (key, candidate): the smallest key, then the earliest candidate.
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    const float other_key = __shfl_xor_sync(kFullMask, best_key, offset);
    const int other_cand = __shfl_xor_sync(kFullMask, best_cand, offset);
    if (other_key < best_key || (other_key == best_key && other_cand < best_cand)) {
      best_key = other_key;
      best_cand = other_cand;
    }
  }
  if (lane == 0) {
    warp_key[warp] = best_key;
    warp_cand[warp] = best_cand;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < kWarps; ++w) {
      if (warp_key[w] < best_key || (warp_key[w] == best_key && warp_cand[w] < best_cand)) {
        best_key = warp_key[w];
        best_cand = warp_cand[w];
      }
    }
    row_loss[row] = (best_key < 0.0f ? NAN : best_key) / count;
    best[row] = best_cand;
  }
}

// ------------------------------------------------------------------------------------------------
// Backward
// ------------------------------------------------------------------------------------------------

template <typename T, int M>
__global__ void __launch_bounds__(kThreads) mixit_l1_backward_kernel(
    const float* __restrict__ grad_rows, const T* __restrict__ est, const T* __restrict__ mix,
    const int* __restrict__ masks, const int64_t* __restrict__ best, T* __restrict__ grad_est,
    T* __restrict__ grad_mix, int num_mixtures, int64_t length, int blocks_per_row, float count, bool aligned) {
  constexpr int V = VecWidth<T>::value;
  __shared__ int source_mixture[M];
  const int64_t row = blockIdx.x / blocks_per_row;
  const int64_t e = (static_cast<int64_t>(blockIdx.x % blocks_per_row) * kThreads + threadIdx.x) * V;

  const int64_t candidate = best[row];
  for (int n = threadIdx.x; n < num_mixtures; n += kThreads) {
    const int mask = masks[candidate * num_mixtures + n];
#pragma unroll
    for (int s = 0; s < M; ++s) {
      if ((mask >> s) & 1) source_mixture[s] = n;
    }
  }
  __syncthreads();
  if (e >= length) return;

  const float scale = grad_rows[row] / count;
  int assigned[M];
  float x[M][V];
#pragma unroll
  for (int s = 0; s < M; ++s) {
    assigned[s] = source_mixture[s];
    load_vec(est + (row * M + s) * length, e, length, aligned, x[s]);
  }
  const T* mix_row = mix + row * num_mixtures * length;
  for (int first = 0; first < num_mixtures; first += kMaxMixtureBlock) {
    float mixture[kMaxMixtureBlock][V];
#pragma unroll
    for (int j = 0; j < kMaxMixtureBlock; ++j) {
      if (first + j < num_mixtures) load_vec(mix_row + (first + j) * length, e, length, aligned, mixture[j]);
    }
#pragma unroll
    for (int j = 0; j < kMaxMixtureBlock; ++j) {
      const int n = first + j;
      if (n >= num_mixtures) break;
      float sign[V];
#pragma unroll
      for (int i = 0; i < V; ++i) {
        float sum = 0.0f;
#pragma unroll
        for (int s = 0; s < M; ++s) sum += assigned[s] == n ? x[s][i] : 0.0f;
        const float err = sum - mixture[j][i];
        // sign(0) = sign(NaN) = 0, like autograd's abs backward.
        sign[i] = scale * static_cast<float>((err > 0.0f) - (err < 0.0f));
      }
#pragma unroll
      for (int s = 0; s < M; ++s) {
        if (assigned[s] == n) store_vec(grad_est + (row * M + s) * length, e, length, aligned, sign);
      }
      if (grad_mix != nullptr) {
#pragma unroll
        for (int i = 0; i < V; ++i) sign[i] = -sign[i];
        store_vec(grad_mix + (row * num_mixtures + n) * length, e, length, aligned, sign);
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Host side: launch plans and template dispatch
// ------------------------------------------------------------------------------------------------

int vec_width(int dtype) { return dtype == kFloat32 ? 4 : 8; }

// Low sources enumerated in registers per mixture block: NB * 2**LOW accumulators stay <= 64 so
// every instance runs without spilling.
int low_sources_for(int mixture_block) {
  switch (mixture_block) {
    case 1: return 6;
    case 2: return 5;
    default: return 4;
  }
}

struct ForwardPlan {
  int mixture_block;
  int low_sources;
  int num_highs;
  int num_groups;
  int num_chunks;
  int64_t chunk_len;
  int64_t workspace_floats;
};

template <typename T, int NB, int LOW>
cudaError_t launch_partials(const void* est, const void* mix, float* partials, int M, int N, int64_t D,
                            const ForwardPlan& plan, int64_t num_blocks, bool aligned, cudaStream_t stream) {
  subset_l1_partials_kernel<T, NB, LOW><<<static_cast<unsigned>(num_blocks), kThreads, 0, stream>>>(
      static_cast<const T*>(est), static_cast<const T*>(mix), partials, M, N, D, plan.chunk_len, plan.num_chunks,
      plan.num_highs, plan.num_groups, aligned);
  return cudaGetLastError();
}

// Functors run by with_partials_instance for the instance that matches the runtime sizes.
struct OccupancyQuery {
  int* blocks_per_sm;
  template <typename T, int NB, int LOW>
  cudaError_t run() const {
    return cudaOccupancyMaxActiveBlocksPerMultiprocessor(blocks_per_sm, subset_l1_partials_kernel<T, NB, LOW>,
                                                         kThreads, 0);
  }
};

struct PartialsLaunch {
  const void* est;
  const void* mix;
  float* partials;
  int M;
  int N;
  int64_t D;
  const ForwardPlan* plan;
  int64_t num_blocks;
  bool aligned;
  cudaStream_t stream;
  template <typename T, int NB, int LOW>
  cudaError_t run() const {
    return launch_partials<T, NB, LOW>(est, mix, partials, M, N, D, *plan, num_blocks, aligned, stream);
  }
};

// Calls fn.template run<T, NB, LOW>() for the runtime (dtype, NB, LOW).
template <typename T, int NB, typename Fn>
cudaError_t with_low(int low, const Fn& fn) {
  switch (low) {
    case 1: return fn.template run<T, NB, 1>();
    case 2: return fn.template run<T, NB, 2>();
    case 3: return fn.template run<T, NB, 3>();
    case 4: return fn.template run<T, NB, 4>();
    case 5:
      if constexpr (NB <= 2) return fn.template run<T, NB, 5>();
      break;
    case 6:
      if constexpr (NB == 1) return fn.template run<T, NB, 6>();
      break;
  }
  return cudaErrorInvalidValue;
}

template <typename T, typename Fn>
cudaError_t with_block(int mixture_block, int low, const Fn& fn) {
  switch (mixture_block) {
    case 1: return with_low<T, 1>(low, fn);
    case 2: return with_low<T, 2>(low, fn);
    case 3: return with_low<T, 3>(low, fn);
    case 4: return with_low<T, 4>(low, fn);
  }
  return cudaErrorInvalidValue;
}

template <typename Fn>
cudaError_t with_partials_instance(int dtype, int mixture_block, int low, const Fn& fn) {
  switch (dtype) {
    case kFloat32: return with_block<float>(mixture_block, low, fn);
    case kBFloat16: return with_block<__nv_bfloat16>(mixture_block, low, fn);
    case kFloat16: return with_block<__half>(mixture_block, low, fn);
  }
  return cudaErrorInvalidValue;
}

bool valid_sizes(int64_t B, int M, int N, int64_t D, int dtype) {
  return B > 0 && M > 0 && M <= kMaxSources && N > 0 && D > 0 &&
         (dtype == kFloat32 || dtype == kBFloat16 || dtype == kFloat16);
}

cudaError_t make_plan(int64_t B, int M, int N, int64_t D, int dtype, ForwardPlan* plan) {
  if (!valid_sizes(B, M, N, D, dtype)) return cudaErrorInvalidValue;
  plan->mixture_block = N < kMaxMixtureBlock ? N : kMaxMixtureBlock;
  const int low_max = low_sources_for(plan->mixture_block);
  plan->low_sources = M < low_max ? M : low_max;
  plan->num_highs = 1 << (M - plan->low_sources);
  plan->num_groups = (N + plan->mixture_block - 1) / plan->mixture_block;

  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  // Resident slots of this instance on this device, queried once: the plan runs on every call.
  // Concurrent first calls store the same value, so the race is benign.
  static int slots_cache[kMaxCachedDevices][3][kMaxMixtureBlock][7];
  int slots_per_device = 0;
  int* cached = device < kMaxCachedDevices
                    ? &slots_cache[device][dtype][plan->mixture_block - 1][plan->low_sources] : &slots_per_device;
  if (*cached == 0) {
    int num_sms = 0;
    int blocks_per_sm = 0;
    err = cudaDeviceGetAttribute(&num_sms, cudaDevAttrMultiProcessorCount, device);
    if (err == cudaSuccess) {
      err = with_partials_instance(dtype, plan->mixture_block, plan->low_sources, OccupancyQuery{&blocks_per_sm});
    }
    if (err != cudaSuccess) return err;
    *cached = num_sms * (blocks_per_sm > 0 ? blocks_per_sm : 1);
  }

  // One wave of equally long blocks: every resident slot streams one contiguous chunk, so the
  // blocks finish together and the per-block reduction is paid once per slot.  Rows x highs x
  // groups beyond one wave simply run as more waves with one chunk each.
  const int64_t step = static_cast<int64_t>(kThreads) * vec_width(dtype);
  const int64_t max_chunks = (D + step - 1) / step;
  const int64_t slots = *cached;
  const int64_t per_chunk = B * plan->num_highs * plan->num_groups;
  int64_t chunks = slots / per_chunk;
  if (chunks < 1) chunks = 1;
  if (chunks > max_chunks) chunks = max_chunks;
  const int64_t iters = (max_chunks + chunks - 1) / chunks;
  plan->chunk_len = iters * step;
  plan->num_chunks = static_cast<int>((D + plan->chunk_len - 1) / plan->chunk_len);
  plan->workspace_floats = B * plan->num_chunks * N * (int64_t{1} << M);
  return cudaSuccess;
}

bool rows_aligned(std::initializer_list<const void*> pointers, int64_t D, int dtype) {
  for (const void* p : pointers) {
    if (p != nullptr && reinterpret_cast<uintptr_t>(p) % 16 != 0) return false;
  }
  return D % vec_width(dtype) == 0;
}

template <typename T, int M>
cudaError_t launch_backward(const float* grad_rows, const void* est, const void* mix, const int* masks,
                            const int64_t* best, void* grad_est, void* grad_mix, int64_t B, int N, int64_t D,
                            bool aligned, cudaStream_t stream) {
  const int64_t step = static_cast<int64_t>(kThreads) * VecWidth<T>::value;
  const int64_t blocks_per_row = (D + step - 1) / step;
  const int64_t num_blocks = B * blocks_per_row;
  if (blocks_per_row > INT_MAX || num_blocks > INT_MAX) return cudaErrorInvalidConfiguration;
  mixit_l1_backward_kernel<T, M><<<static_cast<unsigned>(num_blocks), kThreads, 0, stream>>>(
      grad_rows, static_cast<const T*>(est), static_cast<const T*>(mix), masks, best, static_cast<T*>(grad_est),
      static_cast<T*>(grad_mix), N, D, static_cast<int>(blocks_per_row), static_cast<float>(N * D), aligned);
  return cudaGetLastError();
}

template <typename T>
cudaError_t backward_for_sources(int M, const float* grad_rows, const void* est, const void* mix, const int* masks,
                                 const int64_t* best, void* grad_est, void* grad_mix, int64_t B, int N, int64_t D,
                                 bool aligned, cudaStream_t stream) {
  static_assert(kMaxSources == 12, "one case per source count up to NRT_MAX_SOURCES");
#define NRT_BACKWARD_CASE(m) \
  case m: return launch_backward<T, m>(grad_rows, est, mix, masks, best, grad_est, grad_mix, B, N, D, aligned, stream);
  switch (M) {
    NRT_BACKWARD_CASE(1)
    NRT_BACKWARD_CASE(2)
    NRT_BACKWARD_CASE(3)
    NRT_BACKWARD_CASE(4)
    NRT_BACKWARD_CASE(5)
    NRT_BACKWARD_CASE(6)
    NRT_BACKWARD_CASE(7)
    NRT_BACKWARD_CASE(8)
    NRT_BACKWARD_CASE(9)
    NRT_BACKWARD_CASE(10)
    NRT_BACKWARD_CASE(11)
    NRT_BACKWARD_CASE(12)
  }
#undef NRT_BACKWARD_CASE
  return cudaErrorInvalidValue;
}

}  // namespace

// ------------------------------------------------------------------------------------------------
// C interface (nrt_kernels/_cuda_lib.py).  Every function returns a cudaError_t; dtype codes are
// nrt_kernels/build_config.py's CUDA_DTYPE_CODES.  All pointers are device pointers of contiguous tensors.
// ------------------------------------------------------------------------------------------------

#define NRT_EXPORT extern "C" __attribute__((visibility("default")))

// build_config.CUDA_ABI_VERSION: the loader refuses a library of another version.
NRT_EXPORT int nrt_cuda_abi_version() { return NRT_ABI_VERSION; }

NRT_EXPORT const char* nrt_cuda_error_string(int code) {
  return cudaGetErrorString(static_cast<cudaError_t>(code));
}

// Float32 scratch that nrt_mixit_l1_forward needs for these sizes, on the current device.
NRT_EXPORT int nrt_mixit_l1_forward_workspace(int64_t B, int M, int N, int64_t D, int dtype,
                                              int64_t* workspace_floats) {
  ForwardPlan plan;
  const cudaError_t err = make_plan(B, M, N, D, dtype, &plan);
  if (err == cudaSuccess) *workspace_floats = plan.workspace_floats;
  return err;
}

// est (B, M, D), mix (B, N, D); masks (P, N) int32; writes row_loss (B,) float32 and best (B,) int64.
NRT_EXPORT int nrt_mixit_l1_forward(const void* est, const void* mix, const int* masks, float* workspace,
                                    int64_t workspace_floats, float* row_loss, int64_t* best, int64_t B, int M,
                                    int N, int64_t D, int num_candidates, int dtype, void* stream_handle) {
  cudaStream_t stream = static_cast<cudaStream_t>(stream_handle);
  ForwardPlan plan;
  cudaError_t err = make_plan(B, M, N, D, dtype, &plan);
  if (err != cudaSuccess) return err;
  if (workspace_floats < plan.workspace_floats || num_candidates <= 0) return cudaErrorInvalidValue;
  const int64_t num_blocks = B * plan.num_chunks * plan.num_groups * plan.num_highs;
  if (num_blocks > INT_MAX) return cudaErrorInvalidConfiguration;
  const bool aligned = rows_aligned({est, mix}, D, dtype);
  err = with_partials_instance(dtype, plan.mixture_block, plan.low_sources,
                               PartialsLaunch{est, mix, workspace, M, N, D, &plan, num_blocks, aligned, stream});
  if (err != cudaSuccess) return err;

  const int num_masks = 1 << M;
  const size_t shared_bytes = static_cast<size_t>(N) * num_masks * sizeof(float);
  if (shared_bytes > 48 * 1024 || B > INT_MAX) return cudaErrorInvalidConfiguration;
  select_best_kernel<<<static_cast<unsigned>(B), kThreads, shared_bytes, stream>>>(
      workspace, masks, row_loss, best, N, num_masks, plan.num_chunks, num_candidates, static_cast<float>(N * D));
  return cudaGetLastError();
}

// grad_rows (B,) float32; best (B,) int64 from the forward.  Writes grad_est (B, M, D) and, when
// grad_mix is not null, grad_mix (B, N, D), both in the input dtype.
NRT_EXPORT int nrt_mixit_l1_backward(const float* grad_rows, const void* est, const void* mix, const int* masks,
                                     const int64_t* best, void* grad_est, void* grad_mix, int64_t B, int M, int N,
                                     int64_t D, int dtype, void* stream_handle) {
  if (!valid_sizes(B, M, N, D, dtype)) return cudaErrorInvalidValue;
  cudaStream_t stream = static_cast<cudaStream_t>(stream_handle);
  const bool aligned = rows_aligned({est, mix, grad_est, grad_mix}, D, dtype);
  switch (dtype) {
    case kFloat32:
      return backward_for_sources<float>(M, grad_rows, est, mix, masks, best, grad_est, grad_mix, B, N, D, aligned,
                                         stream);
    case kBFloat16:
      return backward_for_sources<__nv_bfloat16>(M, grad_rows, est, mix, masks, best, grad_est, grad_mix, B, N, D,
                                                 aligned, stream);
    case kFloat16:
      return backward_for_sources<__half>(M, grad_rows, est, mix, masks, best, grad_est, grad_mix, B, N, D, aligned,
                                          stream);
  }
  return cudaErrorInvalidValue;
}
