// How herd's register kernels (gemv_kernels.h) are called, by cpu_gemv.cpp (one matmul per op)
// and decode_block.cpp (a whole transformer block per op): a `Weight` describes one stored matrix,
// `Acts` holds the activation rows prepared once for every weight that reads them (group sums, or
// the int8 quantization of the a8 mode), `gemv_rows` computes all M output rows for a range of
// weight rows on the calling thread, and `gemv` / `gemv_multi` split the rows of one or several
// weights across torch's threads. Everything is inline or a template, so both translation units
// compile their own copies and the extension links as one library.

#pragma once

#include "gemv_kernels.h"
#include "int4_tiles.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

namespace herd_kernels {

// ---- the calling convention ----------------------------------------------------------------

// The Python side passes these numbers. I4T: int4 repacked into tiles of 8 rows (int4_tiles.h),
// passed with its row-layout tensors, which give the shapes (and feed the prompt matmul).
enum class Kind : int64_t { F32 = 0, I8 = 1, I4 = 2, I4T = 3 };

// One stored weight matrix (N, K), row-major; only the pointers of its kind are set.
struct Weight {
  Kind kind = Kind::F32;
  int64_t N = 0, K = 0, G = 0;  // G: the int4 group size
  const float* f32 = nullptr;
  const int8_t* i8 = nullptr;
  const float* scale = nullptr;  // int8: (N,)
  const uint8_t* i4 = nullptr;
  const uint16_t* s16 = nullptr;  // int4 scales (N, K / G), fp16 bits
  const uint16_t* m16 = nullptr;  // int4 mins (N, K / G), fp16 bits
  const uint8_t* tiles = nullptr;  // I4T: the tiles (n_tiles(N), K / G group blocks)
  // Twice the bytes per stored weight (8 fp32, 2 int8, 1 int4): sizes the thread chunks.
  int64_t bytes_x2() const { return kind == Kind::F32 ? 8 : kind == Kind::I8 ? 2 : 1; }
  // Rows the threads split in: a tile's 8 rows are computed together.
  int64_t unit() const { return kind == Kind::I4T ? kTileRows : 1; }
};

// Activation rows x (M, K) prepared for one kind of weight (int4: one group size), once for every
// weight that reads them: the fused decode block quantizes its normed input once for q, k and v.
struct Acts {
  const float* x = nullptr;
  int64_t M = 0, K = 0, G = 0;
  Kind kind = Kind::F32;
  bool a8 = false, pairs = false;
  std::vector<float> xsum, xcorr;  // int4: group sums of x (M, K / G); a8: the centring correction
  std::vector<float> xd, xd2;      // a8: one scale per 32 inputs (M, nb); int4 pairs: 4 copies each
  std::vector<int8_t> xq;          // a8: codes, int8 (M, nb * 32) in input order, int4 (M, K) in kernel order
};

inline void prepare_acts(Acts& a, const float* x, int64_t M, int64_t K, Kind kind, int64_t G, bool a8) {
  a.x = x;
  a.M = M;
  a.K = K;
  a.G = G;
  a.kind = kind;
  a.a8 = a8 && kind != Kind::F32;
  const bool tiled = kind == Kind::I4T;
  if (kind == Kind::I8 && a.a8) {
    const int64_t nb = (K + kBlock - 1) / kBlock;
    a.xq.resize(M * nb * kBlock);
    a.xd.resize(M * nb);
    quantize_activations(x, M, K, a.xq.data(), a.xd.data(), nullptr);
    return;
  }
  if (kind != Kind::I4 && !tiled) return;
  const int64_t n_groups = K / G;
  a.xsum.resize(M * n_groups);
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t g = 0; g < n_groups; ++g) {
      __m256 vx = _mm256_setzero_ps();  // eight lanes: a sequential fp32 sum would take 4 cycles per input
      for (int64_t k = g * G; k < (g + 1) * G; k += 8) vx = _mm256_add_ps(vx, _mm256_loadu_ps(x + m * K + k));
      a.xsum[m * n_groups + g] = hsum(vx);
    }
  }
  if (!a.a8) return;
  // Per-call preparation for the integer int4 kernel, shared by every output row (O(M K), plain
  // loops: ATen ops here cost more than the quantization itself at decode sizes).
  const int64_t nu = K / kBlock, upg = G / kBlock;
  a.pairs = !tiled && upg % 2 == 0;
  std::vector<int32_t> qsum(M * nu);
  a.xq.resize(M * K);
  a.xd.resize(M * nu);
  a.xcorr.resize(M * n_groups);
  if (tiled) {  // the tiles read the codes in input order
    quantize_activations(x, M, K, a.xq.data(), a.xd.data(), qsum.data());
  } else {
    std::vector<int8_t> in_order(M * K);
    quantize_activations(x, M, K, in_order.data(), a.xd.data(), qsum.data());
    permute_for_int4(in_order.data(), M, K, a.pairs, a.xq.data());
  }
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t g = 0; g < n_groups; ++g) {
      // Centring the codes on 7.5: sum_k q_k x_k = sum_k (q_k - 7.5) x_k + 7.5 (sum x)_g, and the
      // kernel's sum_u d_u (q . xq)_u estimates the first term once 7.5 sum_u d_u (sum xq)_u is taken
      // off: corr_g = 7.5 ((sum x)_g - sum_u d_u (sum xq)_u), the same for every output row.
      float sq = 0.f;
      for (int64_t u = g * upg; u < (g + 1) * upg; ++u) sq += a.xd[m * nu + u] * float(qsum[m * nu + u]);
      a.xcorr[m * n_groups + g] = 7.5f * (a.xsum[m * n_groups + g] - sq);
    }
  }
  // Pairs scale vector half h by its unit's d: per pair [d_u x4, d_u+1 x4].
  if (a.pairs) {
    a.xd2.resize(M * nu * 4);
    for (int64_t i = 0; i < M * nu; ++i)
      for (int j = 0; j < 4; ++j) a.xd2[i * 4 + j] = a.xd[i];
  }
}

// y rows m0 .. m0 + MG - 1 (row stride w.N) for weight rows b .. e - 1 (tiled weights: b a
// multiple of 8, e one too or N).
template <int MG>
void rows_group(const Weight& w, const Acts& a, int64_t m0, int64_t b, int64_t e, float* y) {
  const int64_t K = w.K, N = w.N;
  float* yg = y + m0 * N;
  if (w.kind == Kind::F32) {
    f32_range<MG>(a.x + m0 * K, K, w.f32, b, e, yg, N);
  } else if (w.kind == Kind::I8) {
    const int64_t nb = (K + kBlock - 1) / kBlock;
    if (a.a8) i8a8_range<MG>(a.xq.data() + m0 * nb * kBlock, a.xd.data() + m0 * nb, K, w.i8, w.scale, b, e, yg, N);
    else i8_range<MG>(a.x + m0 * K, K, w.i8, w.scale, b, e, yg, N);
  } else if (w.kind == Kind::I4T) {
    const int64_t ng = K / w.G, nu = K / kBlock, t0 = b / kTileRows, t1 = (e + kTileRows - 1) / kTileRows;
    const float* xs = a.xsum.data() + m0 * ng;
    const Isa isa = tiles_isa();
    if (a.a8) a8_tiles<MG>(isa, a.xq.data() + m0 * K, a.xd.data() + m0 * nu, xs, a.xcorr.data() + m0 * ng, K, w.G, w.tiles,
                           t0, t1, yg, N);
    else f32_tiles<MG>(isa, a.x + m0 * K, xs, K, w.G, w.tiles, t0, t1, yg, N);
  } else {
    const int64_t ng = K / w.G, nu = K / kBlock;
    const float* xs = a.xsum.data() + m0 * ng;
    if (!a.a8) {
      i4_range<MG>(a.x + m0 * K, xs, K, w.G, w.i4, w.s16, w.m16, b, e, yg, N);
      return;
    }
    const int8_t* qg = a.xq.data() + m0 * K;
    const float* dg = a.xd.data() + m0 * nu;
    const float* xc = a.xcorr.data() + m0 * ng;
    if (a.pairs) i4a8_range<MG, true>(qg, dg, a.xd2.data() + m0 * nu * 4, xs, xc, K, w.G, w.i4, w.s16, w.m16, b, e, yg, N);
    else i4a8_range<MG, false>(qg, dg, dg, xs, xc, K, w.G, w.i4, w.s16, w.m16, b, e, yg, N);
  }
}

// All M rows of y = x W^T for weight rows b .. e - 1, on the calling thread. Up to kGroupM
// activation rows that is one register-kernel pass over the range. Beyond it (a batch of decode
// rows) the weight rows go in blocks of ~128 KiB, which stay in L2 while each group of kGroupM
// rows passes over them: the weights still stream from memory once per call, not once per group.
inline void gemv_rows(const Weight& w, const Acts& a, int64_t b, int64_t e, float* y) {
  const int64_t M = a.M;
  const int64_t row_bytes = std::max<int64_t>(1, w.K * w.bytes_x2() / 2);
  const int64_t unit = w.unit();
  const int64_t step = M <= kGroupM ? e - b : std::max<int64_t>(8, (128 * 1024) / row_bytes) / unit * unit;
  for (int64_t b0 = b; b0 < e; b0 += step) {
    const int64_t e0 = std::min(e, b0 + step);
    for (int64_t m0 = 0; m0 < M; m0 += kGroupM) {
      switch (std::min(kGroupM, M - m0)) {
        case 1: rows_group<1>(w, a, m0, b0, e0, y); break;
        case 2: rows_group<2>(w, a, m0, b0, e0, y); break;
        case 3: rows_group<3>(w, a, m0, b0, e0, y); break;
        default: rows_group<4>(w, a, m0, b0, e0, y); break;
      }
    }
  }
}

// y_i (M, N_i) = x W_i^T for n weights that read the same prepared activations, as one parallel
// region over their stacked rows: q, k and v (or gate and up) are split across the threads
// together, so a small matrix (k, v) does not run on one thread while the others wait.
// The threads split units of rows (one row, or a tile of 8), weights one after another.
inline void gemv_multi(int n, const Weight* ws, float* const* ys, const Acts& a) {
  int64_t total = 0;
  for (int i = 0; i < n; ++i) total += (ws[i].N + ws[i].unit() - 1) / ws[i].unit();
  const int64_t grain = std::max<int64_t>(1, grain_rows(ws[0].K, ws[0].bytes_x2()) / ws[0].unit());
  at::parallel_for(0, total, grain, [&](int64_t b, int64_t e) {
    int64_t offset = 0;
    for (int i = 0; i < n; ++i) {
      const int64_t unit = ws[i].unit(), units = (ws[i].N + unit - 1) / unit;
      const int64_t lo = std::max(b, offset), hi = std::min(e, offset + units);
      if (lo < hi) gemv_rows(ws[i], a, (lo - offset) * unit, std::min(ws[i].N, (hi - offset) * unit), ys[i]);
      offset += units;
    }
  });
}

inline void gemv(const Weight& w, const Acts& a, float* y) { gemv_multi(1, &w, &y, a); }

// ---- prefill: many activation rows, exact ---------------------------------------------------
//
// A prompt multiplies every weight by tens of rows, which makes the matmul compute-bound: the
// GEMV kernels above (which convert each weight once per group of 4 rows, and run short of
// registers at 4 rows) reached ~7 MACs per cycle there. Instead, a tile of weight rows is
// dequantized once into an fp32 buffer that stays in L1/L2, and register blocks of 4 activation
// rows x 3 weight rows (12 accumulators, one FMA per loaded vector pair) multiply it: ~17 MACs
// per cycle on one core at 37 x 576 x 1536, against a peak of 16 per cycle at base clock. The
// weights are exactly `dequantize()`'s (int8: q * scale; int4: q * s + m with one FMA rounding),
// and the products are summed in fp32, so the result equals F.linear on the dequantized weight
// to fp32 reassociation, like the GEMV kernels.

// y (MR, NR) block at y[m * ldy + r] from x rows (MR, K) and fp32 tile rows (NR, K); K % 8 == 0.
template <int MR, int NR>
inline void tile_block(const float* x, int64_t K, const float* t, float* y, int64_t ldy) {
  __m256 acc[MR][NR];
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < NR; ++r) acc[m][r] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; k += 8) {
    __m256 wv[NR];
    for (int r = 0; r < NR; ++r) wv[r] = _mm256_loadu_ps(t + r * K + k);
    for (int m = 0; m < MR; ++m) {
      const __m256 xv = _mm256_loadu_ps(x + m * K + k);
      for (int r = 0; r < NR; ++r) acc[m][r] = _mm256_fmadd_ps(wv[r], xv, acc[m][r]);
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < NR; ++r) y[m * ldy + r] = hsum(acc[m][r]);
}

// Weight rows n0 .. n0 + rows - 1 as fp32 (rows, K) in t; fp32 weights are used in place.
inline const float* dequantize_rows(const Weight& w, int64_t n0, int64_t rows, float* t) {
  const int64_t K = w.K;
  if (w.kind == Kind::F32) return w.f32 + n0 * K;
  if (w.kind == Kind::I8) {
    for (int64_t r = 0; r < rows; ++r) {
      const int8_t* q = w.i8 + (n0 + r) * K;
      const __m256 sv = _mm256_set1_ps(w.scale[n0 + r]);
      for (int64_t k = 0; k < K; k += 8)
        _mm256_storeu_ps(t + r * K + k, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(
                                                          _mm_loadl_epi64((const __m128i*)(q + k)))), sv));
    }
    return t;
  }
  const int64_t ng = K / w.G;
  const __m256i mask = _mm256_set1_epi32(0xF);
  const __m256i sh0 = _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4);
  const __m256i sh8 = _mm256_set1_epi32(8);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t n = n0 + r;
    for (int64_t u = 0; u < K / 32; ++u) {
      const int64_t g = n * ng + (u * 32) / w.G;
      const __m256 sv = _mm256_set1_ps(_cvtsh_ss(w.s16[g]));
      const __m256 mv = _mm256_set1_ps(_cvtsh_ss(w.m16[g]));
      const __m256i packed = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i*)(w.i4 + n * (K / 2) + u * 16)));
      __m256i sh = sh0;  // the nibble order of pack_int4, see gemv_kernels.h
      for (int j = 0; j < 4; ++j) {
        const __m256 q = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srlv_epi32(packed, sh), mask));
        _mm256_storeu_ps(t + r * K + u * 32 + j * 8, _mm256_fmadd_ps(q, sv, mv));
        sh = _mm256_add_epi32(sh, sh8);
      }
    }
  }
  return t;
}

// y (M, N) = x (M, K) W^T for any M; K % 8 == 0 (checked by the ops). Threads take tiles of rows.
inline void gemm(const Weight& w, const float* x, int64_t M, float* y) {
  constexpr int MR = 4, NR = 3;
  const int64_t K = w.K, N = w.N;
  // Tile rows: a multiple of NR, about 96 KiB of fp32 so the tile stays in L2 next to x.
  const int64_t TR = std::max<int64_t>(NR, std::min<int64_t>(24, (96 * 1024) / (4 * K) / NR * NR));
  const int64_t n_tiles = (N + TR - 1) / TR;
  at::parallel_for(0, n_tiles, 1, [&](int64_t tb, int64_t te) {
    std::vector<float> buf(w.kind == Kind::F32 ? 0 : TR * K);
    for (int64_t tile = tb; tile < te; ++tile) {
      const int64_t n0 = tile * TR, rows = std::min(TR, N - n0);
      const float* t = dequantize_rows(w, n0, rows, buf.data());
      for (int64_t m = 0; m < M; m += MR) {
        const int64_t mr = std::min<int64_t>(MR, M - m);
        int64_t r = 0;
        for (; r + NR <= rows; r += NR) {
          float* yb = y + m * N + n0 + r;
          const float* tb2 = t + r * K;
          switch (mr) {
            case 4: tile_block<4, NR>(x + m * K, K, tb2, yb, N); break;
            case 3: tile_block<3, NR>(x + m * K, K, tb2, yb, N); break;
            case 2: tile_block<2, NR>(x + m * K, K, tb2, yb, N); break;
            default: tile_block<1, NR>(x + m * K, K, tb2, yb, N); break;
          }
        }
        for (; r < rows; ++r) {
          for (int64_t mm = m; mm < m + mr; ++mm) tile_block<1, 1>(x + mm * K, K, t + r * K, y + mm * N + n0 + r, N);
        }
      }
    }
  });
}

// ---- from tensors ---------------------------------------------------------------------------

// The Weight over one linear layer's stored tensors, with their dtypes and shapes checked:
//   f32  [w (N, K) float32]
//   int8 [w (N, K) int8, scale (N,) float32]
//   int4 [w (N, K / 2) uint8, scales (N, K / G) float16, mins (N, K / G) float16]
//   int4 tiles [the int4 tensors, tiles uint8 (n_tiles(N), K / G * tile_group_bytes(G))]
inline size_t tensors_per_weight(Kind kind) {
  return kind == Kind::F32 ? 1 : kind == Kind::I8 ? 2 : kind == Kind::I4 ? 3 : 4;
}

inline Weight weight_from(Kind kind, at::TensorList t, int64_t G, const char* name) {
  const size_t want = tensors_per_weight(kind);
  TORCH_CHECK(t.size() == want, name, ": expected ", want, " tensors for this weight format, got ", t.size());
  const at::Tensor& w = t[0];
  TORCH_CHECK(w.device().is_cpu() && w.dim() == 2 && w.is_contiguous(), name, ": the weight must be a contiguous 2-D CPU tensor");
  Weight out;
  out.kind = kind;
  out.N = w.size(0);
  if (kind == Kind::F32) {
    TORCH_CHECK(w.scalar_type() == at::kFloat, name, " takes a float32 weight");
    out.K = w.size(1);
    out.f32 = w.data_ptr<float>();
  } else if (kind == Kind::I8) {
    TORCH_CHECK(w.scalar_type() == at::kChar, name, " takes an int8 weight");
    TORCH_CHECK(t[1].scalar_type() == at::kFloat && t[1].is_contiguous() && t[1].numel() == out.N,
                name, " takes one float32 scale per output row");
    out.K = w.size(1);
    out.i8 = w.data_ptr<int8_t>();
    out.scale = t[1].data_ptr<float>();
  } else {
    TORCH_CHECK(w.scalar_type() == at::kByte, name, " takes a uint8 packed weight");
    TORCH_CHECK(G >= 32 && G % 32 == 0, name, ": group_size must be a positive multiple of 32");
    out.K = w.size(1) * 2;
    out.G = G;
    TORCH_CHECK(out.K % G == 0, name, ": in_features ", out.K, " is not a multiple of group_size ", G);
    for (size_t i = 1; i < 3; ++i) {
      TORCH_CHECK(t[i].scalar_type() == at::kHalf && t[i].is_contiguous() && t[i].dim() == 2 &&
                      t[i].size(0) == out.N && t[i].size(1) == out.K / G,
                  name, " takes float16 scales and mins of shape (out_features, in_features / group_size)");
    }
    out.i4 = w.data_ptr<uint8_t>();
    out.s16 = reinterpret_cast<const uint16_t*>(t[1].data_ptr<at::Half>());
    out.m16 = reinterpret_cast<const uint16_t*>(t[2].data_ptr<at::Half>());
    if (kind == Kind::I4T) {
      TORCH_CHECK(t[3].scalar_type() == at::kByte && t[3].is_contiguous() && t[3].device().is_cpu() &&
                      t[3].numel() == n_tiles(out.N) * (out.K / G) * tile_group_bytes(G),
                  name, ": the int4 tiles do not match this weight (repack_int4 of the same tensors and group size)");
      out.tiles = t[3].data_ptr<uint8_t>();
    }
  }
  return out;
}

// Int4 tiles alone (the decode block, which knows the shapes): n_tiles(N) x (K / G) group blocks.
// The row-layout pointers stay null, so the weight serves the GEMV kernels only.
inline Weight weight_from_tiles(const at::Tensor& tiles, int64_t N, int64_t K, int64_t G, const char* name) {
  TORCH_CHECK(G >= kBlock && G % kBlock == 0 && K > 0 && K % G == 0, name, ": in_features ", K,
              " is not a multiple of group_size ", G);
  TORCH_CHECK(tiles.scalar_type() == at::kByte && tiles.is_contiguous() && tiles.device().is_cpu() && tiles.dim() == 2 &&
                  tiles.size(0) == n_tiles(N) && tiles.size(1) == (K / G) * tile_group_bytes(G),
              name, ": int4 tiles of shape (", n_tiles(N), ", ", (K / G) * tile_group_bytes(G), ") expected for a ", N,
              " x ", K, " weight at group size ", G, ", got ", tiles.sizes());
  Weight out;
  out.kind = Kind::I4T;
  out.N = N;
  out.K = K;
  out.G = G;
  out.tiles = tiles.data_ptr<uint8_t>();
  return out;
}

}  // namespace herd_kernels
