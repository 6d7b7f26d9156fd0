// The register kernels behind herd's CPU ops, shared by cpu_gemv.cpp (one matmul per op) and
// decode_block.cpp (a whole transformer block per op). Everything here is a template or inline,
// so both translation units compile their own copies and the extension links as one library.
//
// Small-M matmuls for CPU decoding: y (M, N) = x (M, K) @ W (N, K)^T with M <= 16 (batched
// decode; the register kernels take 4 activation rows at a time, see gemv_rows in gemv.h).
//
// Decode at batch 1 is a matrix-vector product per layer, bound by how fast the weights stream
// from memory. These kernels do nothing clever with the arithmetic: they read each weight row
// once, in order, with independent FMA chains so the loads never wait on the adder, and split
// the rows across threads with ATen's parallel_for (the same OpenMP pool as the rest of torch,
// so torch.set_num_threads applies and no second runtime competes for the cores; the build needs
// -fopenmp for that, see parallel_threads in cpu_gemv.cpp). This file needs no ATen (fp16 values
// are their uint16_t bits), so the kernels also build in a plain C++ microbenchmark.
//
// Three weight formats, all with fp32 activations and fp32 accumulation:
//   f32:  W float32 (N, K).
//   int8: W int8 (N, K), one fp32 scale per output row:  w = q * scale[n].
//   int4: W packed (N, K/2) bytes, fp16 scale and min per group of G inputs:  w = q * s + m,
//         q in [0, 15]. Each run of 32 inputs is 16 bytes = four little-endian int32 words;
//         nibble i (bits 4i..4i+3) of word l holds input 4*i + l. One 128-bit load broadcast to
//         both halves of a 256-bit register and shifted by (8j, 8j, 8j, 8j, 8j+4, ...) gives
//         inputs 8j .. 8j+7 in order, so x is read contiguously.
// The int4 sum is regrouped as  sum_g s_g * (q . x)_g + m_g * (sum x)_g : the scale multiplies
// a whole group's partial sum, and the min only needs the group sums of x, computed once.
// This row layout is the checkpoint's; decode reads a repacked copy in tiles of 8 rows when the
// module has one (int4_tiles.h), and the row kernels here serve the rest.
//
// This file holds the register kernels only; gemv.h is how they are called.

#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace herd_kernels {

constexpr int64_t kMaxM = 16;  // rows per call (the ops' limit)
constexpr int64_t kGroupM = 4;  // rows per register kernel pass
// Weight rows are contiguous, so one row per pass is a single sequential stream that the hardware
// prefetcher follows across rows; several rows per pass start that many short streams every few
// rows (at K = 2048 an int8 row is only 32 cache lines, an int4 row 16). A software prefetch 2 KiB
// ahead helps further. The x loads one row per pass no longer shares are L1 hits. Measured with
// benchmarks/gemv.py (weights from DRAM, one core): +10-60% for the K = 2048 shapes.
constexpr int64_t kPrefetchBytes = 2048;

inline float hsum(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v);
  __m128 hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
  return _mm_cvtss_f32(lo);
}

// Rows per thread chunk: enough weight bytes per chunk that the fork/join (~1.5 us with the
// threads awake) is small next to streaming them (128 KiB: ~6 us on one core). 256 KiB left
// SmolLM2's int4 wo (576 x 576, 207 KB) on one thread.
inline int64_t grain_rows(int64_t K, int64_t bytes_per_weight_x2) {
  const int64_t row_bytes = K * bytes_per_weight_x2 / 2;
  return std::max<int64_t>(8, (128 * 1024) / std::max<int64_t>(row_bytes, 1));
}

// ---- fp32 ---------------------------------------------------------------------------------

// R weight rows at a time (rows_per_pass). A accumulators per (activation row, weight
// row) pair keep A * R * M independent FMA chains in flight to cover the FMA latency (4 cycles):
// at M = R = 1 two chains left the int8 kernel waiting on its adds.
template <int M, int R>
constexpr int chains() { return M * R == 1 ? 4 : 2; }

// Weight rows per pass. One row per pass is one sequential stream; several rows start that many
// streams thousands of bytes apart, which this machine's prefetchers followed poorly: fp32 at
// K = 576 streamed 12 GB/s from DRAM with 4 rows per pass and 22-24 with one (a streaming sum
// reaches ~22), and 2 activation rows 21 GB/s with one weight row per pass, 9 with two. From 3
// activation rows on the kernels are compute-bound and two weight rows share the x loads.
template <int M>
constexpr int rows_per_pass() { return M <= 2 ? 1 : 2; }

template <int M, int R>
void f32_rows(const float* x, int64_t K, const float* w, int64_t n0, float* y, int64_t N) {
  constexpr int A = chains<M, R>();
  __m256 acc[M][R][A];
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < A; ++j) acc[m][r][j] = _mm256_setzero_ps();
  const float* wr[R];
  for (int r = 0; r < R; ++r) wr[r] = w + (n0 + r) * K;
  int64_t k = 0;
  for (; k + 8 * A <= K; k += 8 * A) {
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
#pragma GCC unroll 4
      for (int j = 0; j < A; ++j) {
        const __m256 wv = _mm256_loadu_ps(wr[r] + k + 8 * j);
#pragma GCC unroll 4
        for (int m = 0; m < M; ++m) acc[m][r][j] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + m * K + k + 8 * j), acc[m][r][j]);
      }
    }
  }
  for (; k + 8 <= K; k += 8)
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < M; ++m)
        acc[m][r][0] = _mm256_fmadd_ps(_mm256_loadu_ps(wr[r] + k), _mm256_loadu_ps(x + m * K + k), acc[m][r][0]);
  for (int m = 0; m < M; ++m) {
    for (int r = 0; r < R; ++r) {
      __m256 t = acc[m][r][0];
      for (int j = 1; j < A; ++j) t = _mm256_add_ps(t, acc[m][r][j]);
      float s = hsum(t);
      for (int64_t kk = k; kk < K; ++kk) s += wr[r][kk] * x[m * K + kk];
      y[m * N + n0 + r] = s;
    }
  }
}

template <int M>
void f32_range(const float* x, int64_t K, const float* w, int64_t begin, int64_t end, float* y, int64_t N) {
  constexpr int R = rows_per_pass<M>();
  int64_t n = begin;
  for (; n + R <= end; n += R) f32_rows<M, R>(x, K, w, n, y, N);
  for (; n < end; ++n) f32_rows<M, 1>(x, K, w, n, y, N);
}

// ---- int8 ---------------------------------------------------------------------------------

template <int M, int R>
void i8_rows(const float* x, int64_t K, const int8_t* w, const float* scale, int64_t n0, float* y, int64_t N) {
  constexpr int A = chains<M, R>();
  __m256 acc[M][R][A];
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < A; ++j) acc[m][r][j] = _mm256_setzero_ps();
  const int8_t* wr[R];
  for (int r = 0; r < R; ++r) wr[r] = w + (n0 + r) * K;
  // 8 int8 -> 8 int32 -> 8 float; exact, so the only rounding is the FMA's.
  auto load8 = [](const int8_t* p) __attribute__((always_inline)) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p)));
  };
  int64_t k = 0;
  for (; k + 8 * A <= K; k += 8 * A) {
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      _mm_prefetch((const char*)(wr[r] + k + kPrefetchBytes), _MM_HINT_T0);
#pragma GCC unroll 4
      for (int j = 0; j < A; ++j) {
        const __m256 wv = load8(wr[r] + k + 8 * j);
#pragma GCC unroll 4
        for (int m = 0; m < M; ++m) acc[m][r][j] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + m * K + k + 8 * j), acc[m][r][j]);
      }
    }
  }
  for (; k + 8 <= K; k += 8)
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < M; ++m) acc[m][r][0] = _mm256_fmadd_ps(load8(wr[r] + k), _mm256_loadu_ps(x + m * K + k), acc[m][r][0]);
  for (int m = 0; m < M; ++m) {
    for (int r = 0; r < R; ++r) {
      __m256 t = acc[m][r][0];
      for (int j = 1; j < A; ++j) t = _mm256_add_ps(t, acc[m][r][j]);
      float s = hsum(t);
      for (int64_t kk = k; kk < K; ++kk) s += float(wr[r][kk]) * x[m * K + kk];
      y[m * N + n0 + r] = s * scale[n0 + r];
    }
  }
}

template <int M>
void i8_range(const float* x, int64_t K, const int8_t* w, const float* scale, int64_t begin, int64_t end, float* y,
              int64_t N) {
  constexpr int R = rows_per_pass<M>();
  int64_t n = begin;
  for (; n + R <= end; n += R) i8_rows<M, R>(x, K, w, scale, n, y, N);
  for (; n < end; ++n) i8_rows<M, 1>(x, K, w, scale, n, y, N);
}

// ---- int4 ---------------------------------------------------------------------------------

// R weight rows at a time. Per 32-input unit: one 16-byte load per row, four shift+mask+convert
// steps, and four FMAs per (row, activation row) into four separate group accumulators.
template <int M, int R>
void i4_rows(const float* x, const float* xsum, int64_t K, int64_t G, const uint8_t* w, const uint16_t* scale,
             const uint16_t* minv, int64_t n0, float* y, int64_t N) {
  const int64_t units_per_group = G / 32, n_groups = K / G;
  const __m256i mask = _mm256_set1_epi32(0xF);
  const __m256i sh0 = _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4);
  const __m256i sh8 = _mm256_set1_epi32(8);
  __m256 acc[M][R];
  float macc[M][R];
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < R; ++r) {
      acc[m][r] = _mm256_setzero_ps();
      macc[m][r] = 0.f;
    }
  const uint8_t* wr[R];
  const uint16_t* sr[R];
  const uint16_t* mr[R];
  for (int r = 0; r < R; ++r) {
    wr[r] = w + (n0 + r) * (K / 2);
    sr[r] = scale + (n0 + r) * n_groups;
    mr[r] = minv + (n0 + r) * n_groups;
  }
  for (int64_t g = 0; g < n_groups; ++g) {
    __m256 gacc[M][R][4];
    for (int m = 0; m < M; ++m)
      for (int r = 0; r < R; ++r)
        for (int j = 0; j < 4; ++j) gacc[m][r][j] = _mm256_setzero_ps();
    for (int64_t u = g * units_per_group; u < (g + 1) * units_per_group; ++u) {
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) {
        const __m256i packed = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i*)(wr[r] + u * 16)));
        __m256i sh = sh0;
#pragma GCC unroll 4
        for (int j = 0; j < 4; ++j) {
          const __m256 q = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srlv_epi32(packed, sh), mask));
          sh = _mm256_add_epi32(sh, sh8);
#pragma GCC unroll 4
          for (int m = 0; m < M; ++m)
            gacc[m][r][j] = _mm256_fmadd_ps(q, _mm256_loadu_ps(x + m * K + u * 32 + j * 8), gacc[m][r][j]);
        }
      }
    }
    for (int r = 0; r < R; ++r) {
      const float s = _cvtsh_ss(sr[r][g]);  // F16C: one instruction, not c10's bit twiddling
      const float mn = _cvtsh_ss(mr[r][g]);
      const __m256 sv = _mm256_set1_ps(s);
      for (int m = 0; m < M; ++m) {
        const __m256 part = _mm256_add_ps(_mm256_add_ps(gacc[m][r][0], gacc[m][r][1]),
                                          _mm256_add_ps(gacc[m][r][2], gacc[m][r][3]));
        acc[m][r] = _mm256_fmadd_ps(part, sv, acc[m][r]);
        macc[m][r] += mn * xsum[m * n_groups + g];
      }
    }
  }
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < R; ++r) y[m * N + n0 + r] = hsum(acc[m][r]) + macc[m][r];
}

template <int M>
void i4_range(const float* x, const float* xsum, int64_t K, int64_t G, const uint8_t* w, const uint16_t* s,
              const uint16_t* mn, int64_t begin, int64_t end, float* y, int64_t N) {
  constexpr int R = M == 1 ? 2 : 1;
  int64_t n = begin;
  for (; n + R <= end; n += R) i4_rows<M, R>(x, xsum, K, G, w, s, mn, n, y, N);
  for (; n < end; ++n) i4_rows<M, 1>(x, xsum, K, G, w, s, mn, n, y, N);
}

// ---- int8 activations (the "a8" kernels) ---------------------------------------------------
//
// An explicit, opt-in mode (herd.quant's `activations="int8"`): the activation rows are quantized
// once per call to int8, symmetric, one fp32 scale d = amax / 127 per block of 32 inputs (llama.cpp's
// Q8_0 for activations), and the weights meet them in integer dot products: AVX2's maddubs
// (u8 x s8 -> pairs summed to s16) and madd (s16 pairs -> s32). That is 6 vector ops per 32 weights
// instead of ~16 with fp32 conversion (int4: ~5 per 32 weights, two units per 32-byte load), which
// takes the kernels from compute-bound to near the memory stream. Integer products and sums are
// exact; the only new error is the activation rounding, at most d/2 per input, so
//   |y - y_exact| <= sum_k d_b(k) / 2 * |w_k - c_k|   (+ fp32 rounding of the per-block sums)
// with c = 0 for int8 and c = m_g + 7.5 s_g for int4 (the codes are centred, see i4a8_rows).
// tests/unit/quant/test_kernels.py checks this bound and the definition itself.
//
// Saturation cannot happen: |xq| <= 127, int8 |w| <= 127 (so maddubs pairs <= 2 * 127 * 127 < 2^15),
// int4 q <= 15; each 32-input block sums to < 2^21 in int32.

constexpr int64_t kBlock = 32;
// One weight row per pass with a prefetch (see kPrefetchBytes); these measured best.
constexpr int kRowsI8 = 1, kUnrollI8 = 4;  // int8: 4 blocks (4 accumulators) per step
constexpr int kRowsI4 = 1;

// The int4 kernel unpacks weights in nibble order, not input order; the quantized activations are
// permuted once per call to match, which keeps the stored weight layout (and checkpoints) unchanged.
// In pack_int4's layout, byte 4l + c of a 32-input unit holds inputs 8c + l (low nibble) and
// 8c + 4 + l (high nibble). Units are unpacked in pairs (one 32-byte load, two units): the "low"
// vector holds unit u's low nibbles then unit u+1's, the "high" vector their high nibbles. A single
// unit (group sizes that are an odd number of units) is the same with one unit per vector half.
// kInt4Order.pair[p] is the input (0..63) that position p of a pair's 64 activation bytes holds;
// kInt4Order.single[p] the input (0..31) for position p of a single unit's 32.
struct Int4Order {
  int8_t single[kBlock];
  int8_t pair[2 * kBlock];
  constexpr Int4Order() : single(), pair() {
    for (int p = 0; p < 16; ++p) {
      const int lo = 8 * (p % 4) + p / 4, hi = lo + 4;  // inputs in byte p's low and high nibble
      single[p] = int8_t(lo);
      single[16 + p] = int8_t(hi);
      pair[p] = int8_t(lo);
      pair[16 + p] = int8_t(32 + lo);
      pair[32 + p] = int8_t(hi);
      pair[48 + p] = int8_t(32 + hi);
    }
  }
};
constexpr Int4Order kInt4Order;

// (M, K) codes in input order -> the kernel's order: pairs of units, or single units.
inline void permute_for_int4(const int8_t* q, int64_t M, int64_t K, bool pairs, int8_t* out) {
  const int64_t span = pairs ? 2 * kBlock : kBlock;
  const int8_t* src = pairs ? kInt4Order.pair : kInt4Order.single;
  for (int64_t i = 0; i < M * K; i += span)
    for (int64_t p = 0; p < span; ++p) out[i + p] = q[i + src[p]];
}

// x (M, K) fp32 -> q (M, nb * 32) int8, zero padded, and d (M, nb) fp32, nb = ceil(K / 32).
// When qsum is given, it gets each block's sum of codes (M, nb).
inline void quantize_activations(const float* x, int64_t M, int64_t K, int8_t* q, float* d, int32_t* qsum) {
  const int64_t nb = (K + kBlock - 1) / kBlock;
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);  // undoes packs' lane interleave
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t b = 0; b < nb; ++b) {
      const float* xb = x + m * K + b * kBlock;
      const int64_t len = std::min<int64_t>(kBlock, K - b * kBlock);
      alignas(32) int8_t tmp[kBlock] = {};
      float amax = 0.f;
      if (len == kBlock) {
        __m256 v[4];
        __m256 mx = _mm256_setzero_ps();
        for (int j = 0; j < 4; ++j) {
          v[j] = _mm256_loadu_ps(xb + 8 * j);
          mx = _mm256_max_ps(mx, _mm256_and_ps(v[j], abs_mask));
        }
        __m128 h = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
        h = _mm_max_ps(h, _mm_movehl_ps(h, h));
        amax = _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)));
        const __m256 inv = _mm256_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
        __m256i i[4];  // cvtps rounds half to even (the default MXCSR mode), like torch.round
        for (int j = 0; j < 4; ++j) i[j] = _mm256_cvtps_epi32(_mm256_mul_ps(v[j], inv));
        const __m256i packed = _mm256_packs_epi16(_mm256_packs_epi32(i[0], i[1]), _mm256_packs_epi32(i[2], i[3]));
        _mm256_store_si256((__m256i*)tmp, _mm256_permutevar8x32_epi32(packed, order));
      } else {  // the partial last block of an int8 row (int4 rows are whole units)
        for (int64_t k = 0; k < len; ++k) amax = std::max(amax, std::fabs(xb[k]));
        const float inv = amax > 0.f ? 127.f / amax : 0.f;
        for (int64_t k = 0; k < len; ++k)
          tmp[k] = int8_t(std::max(-127.f, std::min(127.f, std::nearbyint(xb[k] * inv))));
      }
      std::memcpy(q + m * nb * kBlock + b * kBlock, tmp, kBlock);
      if (qsum != nullptr) {
        int32_t t = 0;
        for (int k = 0; k < kBlock; ++k) t += tmp[k];
        qsum[m * nb + b] = t;
      }
      d[m * nb + b] = amax / 127.f;
    }
  }
}

// R weight rows per pass share the activation loads; U blocks per step, each with its own
// accumulator, keep U * R * M FMA chains in flight.
template <int M, int R, int U>
void i8a8_rows(const int8_t* xq, const float* xd, int64_t K, const int8_t* w, const float* scale, int64_t n0,
               float* y, int64_t N) {
  const int64_t nb = (K + kBlock - 1) / kBlock, full = K / kBlock;
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[M][R][U];
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < U; ++j) acc[m][r][j] = _mm256_setzero_ps();
  const int8_t* wr[R];
  for (int r = 0; r < R; ++r) wr[r] = w + (n0 + r) * K;
  auto step = [&](int64_t b, int j) __attribute__((always_inline)) {
    __m256i xv[M];
    __m256 dv[M];
    for (int m = 0; m < M; ++m) {
      xv[m] = _mm256_loadu_si256((const __m256i*)(xq + m * nb * kBlock + b * kBlock));
      dv[m] = _mm256_broadcast_ss(xd + m * nb + b);
    }
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      _mm_prefetch((const char*)(wr[r] + b * kBlock + kPrefetchBytes), _MM_HINT_T0);
      const __m256i wv = _mm256_loadu_si256((const __m256i*)(wr[r] + b * kBlock));
      const __m256i aw = _mm256_abs_epi8(wv);  // maddubs wants one unsigned operand: |w| * (x sign w)
#pragma GCC unroll 4
      for (int m = 0; m < M; ++m) {
        const __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(aw, _mm256_sign_epi8(xv[m], wv)), ones);
        acc[m][r][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), dv[m], acc[m][r][j]);
      }
    }
  };
  int64_t b = 0;
  for (; b + U <= full; b += U) {
#pragma GCC unroll 4
    for (int j = 0; j < U; ++j) step(b + j, j);
  }
  for (; b < full; ++b) step(b, 0);
  for (int m = 0; m < M; ++m) {
    for (int r = 0; r < R; ++r) {
      for (int j = 1; j < U; ++j) acc[m][r][0] = _mm256_add_ps(acc[m][r][0], acc[m][r][j]);
      float s = hsum(acc[m][r][0]);
      if (full < nb) {  // a partial last block: K % 32 inputs, scalar
        int32_t t = 0;
        for (int64_t k = full * kBlock; k < K; ++k) t += int32_t(wr[r][k]) * int32_t(xq[m * nb * kBlock + k]);
        s += float(t) * xd[m * nb + full];
      }
      y[m * N + n0 + r] = s * scale[n0 + r];
    }
  }
}

template <int M>
void i8a8_range(const int8_t* xq, const float* xd, int64_t K, const int8_t* w, const float* scale, int64_t begin,
                int64_t end, float* y, int64_t N) {
  constexpr int R = kRowsI8;  // one stream per pass at every M (see rows_per_pass)
  constexpr int U = R == 1 ? kUnrollI8 : 1;
  int64_t n = begin;
  for (; n + R <= end; n += R) i8a8_rows<M, R, U>(xq, xd, K, w, scale, n, y, N);
  for (; n < end; ++n) i8a8_rows<M, 1, U>(xq, xd, K, w, scale, n, y, N);
}

// int4 weights: a unit of 32 inputs is one 16-byte load broadcast to both halves, the high half
// shifted right by 4, masked to nibbles: 32 unsigned bytes in Int4Order, straight into maddubs.
// Per group: sum_u d_u (q . xq)_u, times the group's scale. The min term uses the exact fp32 group
// sums of x (as in the fp32 kernel), and the codes are centred on 7.5 through a per-call
// correction (see prepare_acts), so the activation rounding error is weighted by |q - 7.5| <= 7.5
// rather than by q <= 15.
template <int M, int R, bool Pair>
void i4a8_rows(const int8_t* xq, const float* xd, const float* xd2, const float* xsum, const float* xcorr, int64_t K,
               int64_t G,
               const uint8_t* w, const uint16_t* scale, const uint16_t* minv, int64_t n0, float* y, int64_t N) {
  const int64_t units_per_group = G / kBlock, n_groups = K / G, nu = K / kBlock;
  const __m256i nib = _mm256_set1_epi8(0x0F);
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[M][R][2];  // two chains, alternating groups, so the scale FMAs overlap
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < R; ++r) acc[m][r][0] = acc[m][r][1] = _mm256_setzero_ps();
  const uint8_t* wr[R];
  const uint16_t* sr[R];
  for (int r = 0; r < R; ++r) {
    wr[r] = w + (n0 + r) * (K / 2);
    sr[r] = scale + (n0 + r) * n_groups;
  }
  for (int64_t g = 0; g < n_groups; ++g) {
    __m256 gacc[M][R];
    for (int m = 0; m < M; ++m)
      for (int r = 0; r < R; ++r) gacc[m][r] = _mm256_setzero_ps();
    if constexpr (Pair) {
      // Two units per step: one 32-byte load, mask and shift, two maddubs added in 16 bits (each
      // pair sum <= 2 * 15 * 127, so two fit), one madd; vector half h then holds unit u + h, which
      // dv2 scales by d_{u+h}.
      for (int64_t u = g * units_per_group; u < (g + 1) * units_per_group; u += 2) {
        __m256i xlo[M], xhi[M];
        __m256 dv[M];
        for (int m = 0; m < M; ++m) {
          xlo[m] = _mm256_loadu_si256((const __m256i*)(xq + m * K + u * kBlock));
          xhi[m] = _mm256_loadu_si256((const __m256i*)(xq + m * K + u * kBlock + kBlock));
          dv[m] = _mm256_loadu_ps(xd2 + (m * nu + u) * 4);
        }
#pragma GCC unroll 4
        for (int r = 0; r < R; ++r) {
          _mm_prefetch((const char*)(wr[r] + u * 16 + kPrefetchBytes), _MM_HINT_T0);
          const __m256i v = _mm256_loadu_si256((const __m256i*)(wr[r] + u * 16));
          const __m256i lo = _mm256_and_si256(v, nib);
          const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), nib);
#pragma GCC unroll 4
          for (int m = 0; m < M; ++m) {
            const __m256i p16 = _mm256_add_epi16(_mm256_maddubs_epi16(lo, xlo[m]), _mm256_maddubs_epi16(hi, xhi[m]));
            gacc[m][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(p16, ones)), dv[m], gacc[m][r]);
          }
        }
      }
    } else {
      for (int64_t u = g * units_per_group; u < (g + 1) * units_per_group; ++u) {
        __m256i xv[M];
        __m256 dv[M];
        for (int m = 0; m < M; ++m) {
          xv[m] = _mm256_loadu_si256((const __m256i*)(xq + m * K + u * kBlock));
          dv[m] = _mm256_broadcast_ss(xd + m * nu + u);
        }
#pragma GCC unroll 4
        for (int r = 0; r < R; ++r) {
          const __m256i packed = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i*)(wr[r] + u * 16)));
          const __m256i q = _mm256_and_si256(_mm256_blend_epi32(packed, _mm256_srli_epi16(packed, 4), 0xF0), nib);
#pragma GCC unroll 4
          for (int m = 0; m < M; ++m) {
            const __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(q, xv[m]), ones);
            gacc[m][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), dv[m], gacc[m][r]);
          }
        }
      }
    }
    for (int r = 0; r < R; ++r) {
      const __m256 sv = _mm256_set1_ps(_cvtsh_ss(sr[r][g]));
      for (int m = 0; m < M; ++m) acc[m][r][g & 1] = _mm256_fmadd_ps(gacc[m][r], sv, acc[m][r][g & 1]);
    }
  }
  for (int r = 0; r < R; ++r) {
    const uint16_t* mr = minv + (n0 + r) * n_groups;
    for (int m = 0; m < M; ++m) {
      // sum_g m_g * (sum x)_g + s_g * corr_g, eight groups at a time (F16C converts the halves).
      __m256 mv = _mm256_setzero_ps();
      int64_t g = 0;
      for (; g + 8 <= n_groups; g += 8) {
        mv = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(mr + g))),
                             _mm256_loadu_ps(xsum + m * n_groups + g), mv);
        mv = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(sr[r] + g))),
                             _mm256_loadu_ps(xcorr + m * n_groups + g), mv);
      }
      float s = hsum(_mm256_add_ps(acc[m][r][0], acc[m][r][1])) + hsum(mv);
      for (; g < n_groups; ++g)
        s += _cvtsh_ss(mr[g]) * xsum[m * n_groups + g] + _cvtsh_ss(sr[r][g]) * xcorr[m * n_groups + g];
      y[m * N + n0 + r] = s;
    }
  }
}

// The M = 1, paired-unit case (decode at batch 1, even units per group): one weight row per call,
// the group's scale folded into the two units' activation scales (one multiply instead of a
// second accumulator and FMA per group), the row's scales converted from fp16 eight at a time.
// PPG: pairs of units per group as a compile-time constant (1 for G = 64, 2 for G = 128; 0: read
// from G), which removes the inner loop: with the weights in DRAM (huge pages, one core) 16 GB/s
// with the loop, 18.5 without.
template <int PPG>
inline void i4a8_row(const int8_t* xq, const float* xd2, const float* xsum, const float* xcorr, int64_t K, int64_t G,
                     const uint8_t* wr, const uint16_t* sr, const uint16_t* mr, float* y) {
  const int64_t ng = K / G, ppg = PPG > 0 ? PPG : G / (2 * kBlock);
  const __m256i nib = _mm256_set1_epi8(0x0F);
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps(), mv = _mm256_setzero_ps();
  auto pair = [&](int64_t u, __m256 sv, __m256& a) __attribute__((always_inline)) {
    _mm_prefetch((const char*)(wr + u * 16 + kPrefetchBytes), _MM_HINT_T0);
    const __m256i v = _mm256_loadu_si256((const __m256i*)(wr + u * 16));
    const __m256i lo = _mm256_and_si256(v, nib);
    const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), nib);
    const __m256i p16 = _mm256_add_epi16(_mm256_maddubs_epi16(lo, _mm256_loadu_si256((const __m256i*)(xq + u * kBlock))),
                                         _mm256_maddubs_epi16(hi, _mm256_loadu_si256((const __m256i*)(xq + (u + 1) * kBlock))));
    const __m256 dv = _mm256_mul_ps(_mm256_loadu_ps(xd2 + u * 4), sv);
    a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(p16, ones)), dv, a);
  };
  int64_t g = 0;
  for (; g + 8 <= ng; g += 8) {
    // sum_g m_g * (sum x)_g + s_g * corr_g for these eight groups, alongside (see i4a8_rows).
    const __m256 s8 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(sr + g)));
    mv = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(mr + g))), _mm256_loadu_ps(xsum + g), mv);
    mv = _mm256_fmadd_ps(s8, _mm256_loadu_ps(xcorr + g), mv);
#pragma GCC unroll 8
    for (int j = 0; j < 8; ++j) {
      const __m256 sv = _mm256_permutevar8x32_ps(s8, _mm256_set1_epi32(j));  // s_{g+j} in every lane
#pragma GCC unroll 4
      for (int64_t p = 0; p < ppg; ++p) pair(2 * ((g + j) * ppg + p), sv, (j & 1) ? acc1 : acc0);
    }
  }
  float tail = 0.f;
  for (; g < ng; ++g) {
    const float s = _cvtsh_ss(sr[g]);
    for (int64_t p = 0; p < ppg; ++p) pair(2 * (g * ppg + p), _mm256_set1_ps(s), (g & 1) ? acc1 : acc0);
    tail += _cvtsh_ss(mr[g]) * xsum[g] + s * xcorr[g];
  }
  *y = hsum(_mm256_add_ps(_mm256_add_ps(acc0, acc1), mv)) + tail;
}

template <int PPG>
void i4a8_row_range(const int8_t* xq, const float* xd2, const float* xsum, const float* xcorr, int64_t K, int64_t G,
                    const uint8_t* w, const uint16_t* s, const uint16_t* mn, int64_t begin, int64_t end, float* y) {
  for (int64_t n = begin; n < end; ++n)
    i4a8_row<PPG>(xq, xd2, xsum, xcorr, K, G, w + n * (K / 2), s + n * (K / G), mn + n * (K / G), y + n);
}

template <int M, bool Pair>
void i4a8_range(const int8_t* xq, const float* xd, const float* xd2, const float* xsum, const float* xcorr, int64_t K,
                int64_t G,
                const uint8_t* w, const uint16_t* s, const uint16_t* mn, int64_t begin, int64_t end, float* y,
                int64_t N) {
  if constexpr (M == 1 && Pair) {
    switch (G) {
      case 64: i4a8_row_range<1>(xq, xd2, xsum, xcorr, K, G, w, s, mn, begin, end, y); break;
      case 128: i4a8_row_range<2>(xq, xd2, xsum, xcorr, K, G, w, s, mn, begin, end, y); break;
      default: i4a8_row_range<0>(xq, xd2, xsum, xcorr, K, G, w, s, mn, begin, end, y); break;
    }
    return;
  }
  constexpr int R = kRowsI4;
  int64_t n = begin;
  for (; n + R <= end; n += R) i4a8_rows<M, R, Pair>(xq, xd, xd2, xsum, xcorr, K, G, w, s, mn, n, y, N);
  for (; n < end; ++n) i4a8_rows<M, 1, Pair>(xq, xd, xd2, xsum, xcorr, K, G, w, s, mn, n, y, N);
}

}  // namespace herd_kernels
