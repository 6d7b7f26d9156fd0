// int4 weights repacked at load time into tiles of 8 rows, and the decode kernels that read them.
//
// Why: the row layout of herd's checkpoints (gemv_kernels.h: one row's codes, then its scales and
// mins in separate arrays) makes a decode GEMV spend most of its work per group, per row: at the
// default group size of 32, every 32 weights need the group's scale and min converted from fp16,
// broadcast, and an FMA of their own, and the int8-activation kernel reached ~12 GB/s of weights
// on this project's machines, compute-bound where int8 streams at ~22. llama.cpp's REPACK does the
// same thing for Q4_0 (interleaved rows, converted at load): here, 8 rows sit in the 8 lanes of a
// 256-bit register, so a group's scales and mins for all 8 rows are one 16-byte load and one
// conversion each, and the dot products land in lanes with no horizontal sums.
//
// The layout, for a weight (N, K) with groups of G inputs (G % 32 == 0): tile t holds rows
// 8t .. 8t + 7 (rows past N are zero), its K / G group blocks one after another, tiles one after
// another, so each thread's share is one sequential stream. A group block is 32 + 4 G bytes:
//   bytes 0..15   the 8 rows' fp16 scales, 16..31 their fp16 mins,
//   then per 32-input unit of the group, 128 bytes in 4 chunks of 32; in chunk j, bytes 4r .. 4r+3
//   (32-bit lane r) hold row r's inputs 4j + i in their low nibbles and 16 + 4j + i in their high
//   nibbles (i = 0..3).
// A chunk's low nibbles are thus one vector of 8 rows x 4 consecutive inputs, which meets the 4
// activation codes of those inputs broadcast to every lane in one u8 x s8 dot product (vpdpbusd,
// or maddubs + madd on AVX2), the activations read in input order. The bytes per weight are the
// row layout's (5 bits at G = 32: codes, fp16 scale and min), plus zero rows up to a multiple of 8.
//
// Numerics: the same sums as the row-layout kernels (gemv_kernels.h), summed in another order:
// fp32 activations: sum_g s_g (q . x)_g + m_g (sum x)_g, equal to F.linear on the dequantized
// weight to fp32 reassociation; int8 activations: the integer dot products per 32 inputs are exact
// and the rest is the row kernel's arithmetic (the same d, codes, centring correction), so the
// documented a8 error bound holds unchanged.
//
// Instruction sets: the kernels are compiled for AVX2 and for AVX-512 (F, VL, BW, VNNI) and
// chosen at run time per call (`tiles_isa`): the AVX-512 copy where the CPU has those features,
// unless HERD_CPU_ISA=avx2 or set_max_isa(Isa::AVX2) asks for the AVX2 copy (the tests run both).

#pragma once

#include "gemv_kernels.h"

#include <atomic>
#include <cstdlib>
#include <cstring>

namespace herd_kernels {

constexpr int64_t kTileRows = 8;

inline int64_t tile_group_bytes(int64_t G) { return 32 + 4 * G; }  // scales, mins, 8 rows x G / 2
inline int64_t n_tiles(int64_t N) { return (N + kTileRows - 1) / kTileRows; }

// Writes the 8 outputs of tile t into y[8t ..], only those below N.
inline void store_tile(__m256 v, float* y, int64_t t, int64_t N) {
  if ((t + 1) * kTileRows <= N) {
    _mm256_storeu_ps(y + t * kTileRows, v);
    return;
  }
  alignas(32) float tmp[kTileRows];
  _mm256_store_ps(tmp, v);
  for (int64_t r = 0; t * kTileRows + r < N; ++r) y[t * kTileRows + r] = tmp[r];
}

// Tile t of the row-layout weight (w (N, K/2), s16 and m16 (N, K/G)) into out (K / G group blocks).
inline void repack_tile(const uint8_t* w, const uint16_t* s16, const uint16_t* m16, int64_t N, int64_t K, int64_t G,
                        int64_t t, uint8_t* out) {
  const int64_t ng = K / G, upg = G / kBlock, gb = tile_group_bytes(G);
  std::memset(out, 0, ng * gb);
  for (int64_t r = 0; r < kTileRows && t * kTileRows + r < N; ++r) {
    const int64_t n = t * kTileRows + r;
    for (int64_t g = 0; g < ng; ++g) {
      uint8_t* blk = out + g * gb;
      std::memcpy(blk + 2 * r, s16 + n * ng + g, 2);
      std::memcpy(blk + 16 + 2 * r, m16 + n * ng + g, 2);
      for (int64_t uu = 0; uu < upg; ++uu) {
        // The row layout (pack_int4): byte 4l + c of a unit holds input 8c + l in its low nibble
        // and 8c + 4 + l in its high nibble.
        const uint8_t* src = w + n * (K / 2) + (g * upg + uu) * 16;
        uint8_t q[kBlock];
        for (int k = 0; k < kBlock; ++k) q[k] = (src[4 * (k % 4) + k / 8] >> (4 * ((k / 4) % 2))) & 0xF;
        uint8_t* c = blk + 32 + 128 * uu;
        for (int j = 0; j < 4; ++j)
          for (int i = 0; i < 4; ++i) c[32 * j + 4 * r + i] = uint8_t(q[4 * j + i] | (q[16 + 4 * j + i] << 4));
      }
    }
  }
}

enum class Isa : int { AVX2 = 0, AVX512 = 1 };

// The best copy this CPU runs (AVX-512 needs F, VL, BW and VNNI), lowered by HERD_CPU_ISA=avx2.
inline Isa detected_isa() {
  static const Isa isa = [] {
    const char* env = std::getenv("HERD_CPU_ISA");
    if (env != nullptr && std::strcmp(env, "avx2") == 0) return Isa::AVX2;
    __builtin_cpu_init();
    const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
                        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vnni");
    return avx512 ? Isa::AVX512 : Isa::AVX2;
  }();
  return isa;
}

inline std::atomic<int>& max_isa() {  // a cap the tests lower to reach the AVX2 copy
  static std::atomic<int> cap{int(Isa::AVX512)};
  return cap;
}

inline Isa tiles_isa() { return Isa(std::min(int(detected_isa()), max_isa().load(std::memory_order_relaxed))); }

namespace tiles_avx2 {
#define HERD_TILES_AVX512 0
#include "int4_tiles_body.h"
#undef HERD_TILES_AVX512
}  // namespace tiles_avx2

#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512vnni")
namespace tiles_avx512 {
#define HERD_TILES_AVX512 1
#include "int4_tiles_body.h"
#undef HERD_TILES_AVX512
}  // namespace tiles_avx512
#pragma GCC pop_options

// y rows for tiles t0 .. t1 - 1, M activation rows (1..4), through the chosen instruction set.
template <int M>
void a8_tiles(Isa isa, const int8_t* xq, const float* xd, const float* xsum, const float* xcorr, int64_t K, int64_t G,
              const uint8_t* tiles, int64_t t0, int64_t t1, float* y, int64_t N) {
  const bool g32 = G == kBlock;
  if (isa == Isa::AVX512) {
    if (g32) tiles_avx512::a8_tiles<M, 1>(xq, xd, xsum, xcorr, K, G, tiles, t0, t1, y, N);
    else tiles_avx512::a8_tiles<M, 0>(xq, xd, xsum, xcorr, K, G, tiles, t0, t1, y, N);
  } else {
    if (g32) tiles_avx2::a8_tiles<M, 1>(xq, xd, xsum, xcorr, K, G, tiles, t0, t1, y, N);
    else tiles_avx2::a8_tiles<M, 0>(xq, xd, xsum, xcorr, K, G, tiles, t0, t1, y, N);
  }
}

template <int M>
void f32_tiles(Isa isa, const float* x, const float* xsum, int64_t K, int64_t G, const uint8_t* tiles, int64_t t0,
               int64_t t1, float* y, int64_t N) {
  const bool g32 = G == kBlock;
  if (isa == Isa::AVX512) {
    if (g32) tiles_avx512::f32_tiles<M, 1>(x, xsum, K, G, tiles, t0, t1, y, N);
    else tiles_avx512::f32_tiles<M, 0>(x, xsum, K, G, tiles, t0, t1, y, N);
  } else {
    if (g32) tiles_avx2::f32_tiles<M, 1>(x, xsum, K, G, tiles, t0, t1, y, N);
    else tiles_avx2::f32_tiles<M, 0>(x, xsum, K, G, tiles, t0, t1, y, N);
  }
}

}  // namespace herd_kernels
