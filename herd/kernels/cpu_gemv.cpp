// Small-M matmuls for CPU decoding: y (M, N) = x (M, K) @ W (N, K)^T with M <= 4.
//
// Decode at batch 1 is a matrix-vector product per layer, bound by how fast the weights stream
// from memory. These kernels do nothing clever with the arithmetic: they read each weight row
// once, in order, with independent FMA chains so the loads never wait on the adder, and split
// the rows across threads with ATen's parallel_for (the same OpenMP pool as the rest of torch,
// so torch.set_num_threads applies and no second runtime competes for the cores).
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

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <immintrin.h>

#include <cstdint>

namespace {

constexpr int64_t kMaxM = 4;

inline float hsum(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v);
  __m128 hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
  return _mm_cvtss_f32(lo);
}

// Rows per thread chunk: enough weight bytes per chunk that the fork/join is noise.
inline int64_t grain_rows(int64_t K, int64_t bytes_per_weight_x2) {
  const int64_t row_bytes = K * bytes_per_weight_x2 / 2;
  return std::max<int64_t>(8, (256 * 1024) / std::max<int64_t>(row_bytes, 1));
}

void check_inputs(const at::Tensor& x, const at::Tensor& w, int64_t K_w) {
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "herd kernels run on CPU tensors");
  TORCH_CHECK(x.scalar_type() == at::kFloat, "herd kernels take float32 activations, got ", x.scalar_type());
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "x must be a contiguous (M, K) matrix");
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous(), "weight must be a contiguous 2-D matrix");
  TORCH_CHECK(x.size(0) >= 1 && x.size(0) <= kMaxM, "herd kernels handle 1..4 rows, got ", x.size(0));
  TORCH_CHECK(x.size(1) == K_w, "x has ", x.size(1), " columns but the weight expects ", K_w);
}

// ---- fp32 ---------------------------------------------------------------------------------

// R weight rows at a time against M activation rows; two accumulators per pair keep 2*R*M
// independent FMA chains (8 for M=1) in flight to cover the FMA latency.
template <int M, int R>
void f32_rows(const float* x, int64_t K, const float* w, int64_t n0, float* y, int64_t N) {
  __m256 acc[M][R][2];
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < R; ++r) acc[m][r][0] = acc[m][r][1] = _mm256_setzero_ps();
  const float* wr[R];
  for (int r = 0; r < R; ++r) wr[r] = w + (n0 + r) * K;
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      const __m256 w0 = _mm256_loadu_ps(wr[r] + k);
      const __m256 w1 = _mm256_loadu_ps(wr[r] + k + 8);
#pragma GCC unroll 4
      for (int m = 0; m < M; ++m) {
        acc[m][r][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + m * K + k), acc[m][r][0]);
        acc[m][r][1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + m * K + k + 8), acc[m][r][1]);
      }
    }
  }
  for (int m = 0; m < M; ++m) {
    for (int r = 0; r < R; ++r) {
      float s = hsum(_mm256_add_ps(acc[m][r][0], acc[m][r][1]));
      for (int64_t kk = k; kk < K; ++kk) s += wr[r][kk] * x[m * K + kk];
      y[m * N + n0 + r] = s;
    }
  }
}

template <int M>
void f32_range(const float* x, int64_t K, const float* w, int64_t begin, int64_t end, float* y, int64_t N) {
  constexpr int R = M == 1 ? 4 : 2;
  int64_t n = begin;
  for (; n + R <= end; n += R) f32_rows<M, R>(x, K, w, n, y, N);
  for (; n < end; ++n) f32_rows<M, 1>(x, K, w, n, y, N);
}

at::Tensor linear_f32(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(w.scalar_type() == at::kFloat, "linear_f32 takes a float32 weight");
  check_inputs(x, w, w.size(1));
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  at::Tensor y = at::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, N, grain_rows(K, 8), [&](int64_t b, int64_t e) {
    switch (M) {
      case 1: f32_range<1>(xp, K, wp, b, e, yp, N); break;
      case 2: f32_range<2>(xp, K, wp, b, e, yp, N); break;
      case 3: f32_range<3>(xp, K, wp, b, e, yp, N); break;
      default: f32_range<4>(xp, K, wp, b, e, yp, N); break;
    }
  });
  return y;
}

// ---- int8 ---------------------------------------------------------------------------------

template <int M, int R>
void i8_rows(const float* x, int64_t K, const int8_t* w, const float* scale, int64_t n0, float* y, int64_t N) {
  __m256 acc[M][R][2];
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < R; ++r) acc[m][r][0] = acc[m][r][1] = _mm256_setzero_ps();
  const int8_t* wr[R];
  for (int r = 0; r < R; ++r) wr[r] = w + (n0 + r) * K;
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      // 8 int8 -> 8 int32 -> 8 float; exact, so the only rounding is the FMA's.
      const __m256 w0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(wr[r] + k))));
      const __m256 w1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(wr[r] + k + 8))));
#pragma GCC unroll 4
      for (int m = 0; m < M; ++m) {
        acc[m][r][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + m * K + k), acc[m][r][0]);
        acc[m][r][1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + m * K + k + 8), acc[m][r][1]);
      }
    }
  }
  for (int m = 0; m < M; ++m) {
    for (int r = 0; r < R; ++r) {
      float s = hsum(_mm256_add_ps(acc[m][r][0], acc[m][r][1]));
      for (int64_t kk = k; kk < K; ++kk) s += float(wr[r][kk]) * x[m * K + kk];
      y[m * N + n0 + r] = s * scale[n0 + r];
    }
  }
}

template <int M>
void i8_range(const float* x, int64_t K, const int8_t* w, const float* scale, int64_t begin, int64_t end, float* y,
              int64_t N) {
  constexpr int R = M == 1 ? 4 : 2;
  int64_t n = begin;
  for (; n + R <= end; n += R) i8_rows<M, R>(x, K, w, scale, n, y, N);
  for (; n < end; ++n) i8_rows<M, 1>(x, K, w, scale, n, y, N);
}

at::Tensor linear_int8(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale) {
  TORCH_CHECK(w.scalar_type() == at::kChar, "linear_int8 takes an int8 weight");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.is_contiguous() && scale.numel() == w.size(0),
              "linear_int8 takes one float32 scale per output row");
  check_inputs(x, w, w.size(1));
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  at::Tensor y = at::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const int8_t* wp = w.data_ptr<int8_t>();
  const float* sp = scale.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, N, grain_rows(K, 2), [&](int64_t b, int64_t e) {
    switch (M) {
      case 1: i8_range<1>(xp, K, wp, sp, b, e, yp, N); break;
      case 2: i8_range<2>(xp, K, wp, sp, b, e, yp, N); break;
      case 3: i8_range<3>(xp, K, wp, sp, b, e, yp, N); break;
      default: i8_range<4>(xp, K, wp, sp, b, e, yp, N); break;
    }
  });
  return y;
}

// ---- int4 ---------------------------------------------------------------------------------

// R weight rows at a time. Per 32-input unit: one 16-byte load per row, four shift+mask+convert
// steps, and four FMAs per (row, activation row) into four separate group accumulators.
template <int M, int R>
void i4_rows(const float* x, const float* xsum, int64_t K, int64_t G, const uint8_t* w, const at::Half* scale,
             const at::Half* minv, int64_t n0, float* y, int64_t N) {
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
  const at::Half* sr[R];
  const at::Half* mr[R];
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
      const float s = _cvtsh_ss(sr[r][g].x);  // F16C: one instruction, not c10's bit twiddling
      const float mn = _cvtsh_ss(mr[r][g].x);
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
void i4_range(const float* x, const float* xsum, int64_t K, int64_t G, const uint8_t* w, const at::Half* s,
              const at::Half* mn, int64_t begin, int64_t end, float* y, int64_t N) {
  constexpr int R = M == 1 ? 2 : 1;
  int64_t n = begin;
  for (; n + R <= end; n += R) i4_rows<M, R>(x, xsum, K, G, w, s, mn, n, y, N);
  for (; n < end; ++n) i4_rows<M, 1>(x, xsum, K, G, w, s, mn, n, y, N);
}

at::Tensor linear_int4(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale, const at::Tensor& minv,
                       int64_t group_size) {
  TORCH_CHECK(w.scalar_type() == at::kByte, "linear_int4 takes a uint8 packed weight");
  TORCH_CHECK(group_size >= 32 && group_size % 32 == 0, "group_size must be a positive multiple of 32");
  const int64_t K = w.size(1) * 2;
  check_inputs(x, w, K);
  TORCH_CHECK(K % group_size == 0, "in_features ", K, " is not a multiple of group_size ", group_size);
  const int64_t M = x.size(0), N = w.size(0), n_groups = K / group_size;
  for (const at::Tensor* t : {&scale, &minv}) {
    TORCH_CHECK(t->scalar_type() == at::kHalf && t->is_contiguous() && t->dim() == 2 && t->size(0) == N &&
                    t->size(1) == n_groups,
                "linear_int4 takes float16 scales and mins of shape (out_features, in_features / group_size)");
  }
  // Group sums of x are shared by every output row: (M, K) -> (M, K / G), summed in fp32.
  at::Tensor xsum = x.view({M, n_groups, group_size}).sum(-1).contiguous();
  at::Tensor y = at::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* xs = xsum.data_ptr<float>();
  const uint8_t* wp = w.data_ptr<uint8_t>();
  const at::Half* sp = scale.data_ptr<at::Half>();
  const at::Half* mp = minv.data_ptr<at::Half>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, N, grain_rows(K, 1), [&](int64_t b, int64_t e) {
    switch (M) {
      case 1: i4_range<1>(xp, xs, K, group_size, wp, sp, mp, b, e, yp, N); break;
      case 2: i4_range<2>(xp, xs, K, group_size, wp, sp, mp, b, e, yp, N); break;
      case 3: i4_range<3>(xp, xs, K, group_size, wp, sp, mp, b, e, yp, N); break;
      default: i4_range<4>(xp, xs, K, group_size, wp, sp, mp, b, e, yp, N); break;
    }
  });
  return y;
}

// ---- dequantization for prefill ------------------------------------------------------------

// Prefill (many rows) multiplies by the fp32 weight with MKL's GEMM; these write that weight in
// one pass, where the same in ATen ops takes several full-size temporaries.
at::Tensor dequantize_int4(const at::Tensor& w, const at::Tensor& scale, const at::Tensor& minv, int64_t group_size) {
  TORCH_CHECK(w.device().is_cpu() && w.scalar_type() == at::kByte && w.dim() == 2 && w.is_contiguous(),
              "dequantize_int4 takes a contiguous uint8 (N, K/2) weight");
  const int64_t N = w.size(0), K = w.size(1) * 2;
  TORCH_CHECK(group_size >= 32 && group_size % 32 == 0 && K % group_size == 0, "bad group_size ", group_size);
  const int64_t n_groups = K / group_size;
  for (const at::Tensor* t : {&scale, &minv}) {
    TORCH_CHECK(t->scalar_type() == at::kHalf && t->is_contiguous() && t->numel() == N * n_groups,
                "dequantize_int4 takes float16 scales and mins of shape (N, K / group_size)");
  }
  at::Tensor out = at::empty({N, K}, w.options().dtype(at::kFloat));
  const uint8_t* wp = w.data_ptr<uint8_t>();
  const at::Half* sp = scale.data_ptr<at::Half>();
  const at::Half* mp = minv.data_ptr<at::Half>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, N, grain_rows(K, 1), [&](int64_t b, int64_t e) {
    const __m256i mask = _mm256_set1_epi32(0xF);
    const __m256i sh0 = _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4);
    const __m256i sh8 = _mm256_set1_epi32(8);
    for (int64_t n = b; n < e; ++n) {
      for (int64_t u = 0; u < K / 32; ++u) {
        const int64_t g = n * n_groups + (u * 32) / group_size;
        const __m256 s = _mm256_set1_ps(_cvtsh_ss(sp[g].x));
        const __m256 m = _mm256_set1_ps(_cvtsh_ss(mp[g].x));
        const __m256i packed = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i*)(wp + n * (K / 2) + u * 16)));
        __m256i sh = sh0;
        for (int j = 0; j < 4; ++j) {
          const __m256 q = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srlv_epi32(packed, sh), mask));
          _mm256_storeu_ps(op + n * K + u * 32 + j * 8, _mm256_fmadd_ps(q, s, m));
          sh = _mm256_add_epi32(sh, sh8);
        }
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(herd_cpu, m) {
  m.def("linear_f32(Tensor x, Tensor w) -> Tensor");
  m.def("linear_int8(Tensor x, Tensor w, Tensor scale) -> Tensor");
  m.def("linear_int4(Tensor x, Tensor w, Tensor scale, Tensor minv, int group_size) -> Tensor");
  m.def("dequantize_int4(Tensor w, Tensor scale, Tensor minv, int group_size) -> Tensor");
}

TORCH_LIBRARY_IMPL(herd_cpu, CPU, m) {
  m.impl("linear_f32", &linear_f32);
  m.impl("linear_int8", &linear_int8);
  m.impl("linear_int4", &linear_int4);
  m.impl("dequantize_int4", &dequantize_int4);
}
