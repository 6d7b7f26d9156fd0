// The one-matmul ops of herd's CPU kernels: y (M, N) = x (M, K) @ W (N, K)^T for M <= 16 rows
// (decode and batched decode), in three weight formats with fp32 or int8-quantized activations.
// The kernels and their numerics are described in gemv_kernels.h; the calling convention in gemv.h.

#include "gemv.h"

#include <torch/library.h>

#include <atomic>

namespace {

using namespace herd_kernels;

void check_x(const at::Tensor& x, const Weight& w) {
  TORCH_CHECK(x.device().is_cpu(), "herd kernels run on CPU tensors");
  TORCH_CHECK(x.scalar_type() == at::kFloat, "herd kernels take float32 activations, got ", x.scalar_type());
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "x must be a contiguous (M, K) matrix");
  TORCH_CHECK(x.size(0) >= 1 && x.size(0) <= kMaxM, "herd kernels handle 1..", kMaxM, " rows, got ", x.size(0));
  TORCH_CHECK(x.size(1) == w.K, "x has ", x.size(1), " columns but the weight expects ", w.K);
}

at::Tensor run(const at::Tensor& x, const Weight& w, bool a8) {
  check_x(x, w);
  Acts a;
  prepare_acts(a, x.data_ptr<float>(), x.size(0), w.K, w.kind, w.G, a8);
  at::Tensor y = at::empty({x.size(0), w.N}, x.options());
  gemv(w, a, y.data_ptr<float>());
  return y;
}

at::Tensor linear_f32(const at::Tensor& x, const at::Tensor& w) {
  return run(x, weight_from(Kind::F32, {w}, 0, "linear_f32"), false);
}

at::Tensor linear_int8(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale) {
  return run(x, weight_from(Kind::I8, {w, scale}, 0, "linear_int8"), false);
}

at::Tensor linear_int4(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale, const at::Tensor& minv,
                       int64_t group_size) {
  return run(x, weight_from(Kind::I4, {w, scale, minv}, group_size, "linear_int4"), false);
}

at::Tensor linear_int8_a8(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale) {
  return run(x, weight_from(Kind::I8, {w, scale}, 0, "linear_int8_a8"), true);
}

at::Tensor linear_int4_a8(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale, const at::Tensor& minv,
                          int64_t group_size) {
  return run(x, weight_from(Kind::I4, {w, scale, minv}, group_size, "linear_int4_a8"), true);
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

// How many threads the kernels' parallel regions really run on. ATen's parallel_for is a header
// template around `#pragma omp parallel`, so an extension built without -fopenmp silently runs it
// on one thread (herd's kernels did, until this check): the tests compare this with torch's count.
int64_t parallel_threads() {
  std::atomic<uint64_t> seen{0};
  at::parallel_for(0, 64, 1, [&](int64_t, int64_t) {
    seen.fetch_or(uint64_t(1) << (at::get_thread_num() % 64), std::memory_order_relaxed);
  });
  return __builtin_popcountll(seen.load());
}

}  // namespace

TORCH_LIBRARY(herd_cpu, m) {
  m.def("linear_f32(Tensor x, Tensor w) -> Tensor");
  m.def("linear_int8(Tensor x, Tensor w, Tensor scale) -> Tensor");
  m.def("linear_int4(Tensor x, Tensor w, Tensor scale, Tensor minv, int group_size) -> Tensor");
  m.def("linear_int8_a8(Tensor x, Tensor w, Tensor scale) -> Tensor");
  m.def("linear_int4_a8(Tensor x, Tensor w, Tensor scale, Tensor minv, int group_size) -> Tensor");
  m.def("dequantize_int4(Tensor w, Tensor scale, Tensor minv, int group_size) -> Tensor");
  m.def("parallel_threads() -> int");
}

TORCH_LIBRARY_IMPL(herd_cpu, CPU, m) {
  m.impl("linear_f32", &linear_f32);
  m.impl("linear_int8", &linear_int8);
  m.impl("linear_int4", &linear_int4);
  m.impl("linear_int8_a8", &linear_int8_a8);
  m.impl("linear_int4_a8", &linear_int4_a8);
  m.impl("dequantize_int4", &dequantize_int4);
}

TORCH_LIBRARY_IMPL(herd_cpu, CompositeExplicitAutograd, m) { m.impl("parallel_threads", &parallel_threads); }
