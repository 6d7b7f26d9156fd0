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

// Prefill: any number of rows, exact (gemv.h's gemm: tiles dequantized to fp32 in cache).
at::Tensor run_gemm(const at::Tensor& x, const Weight& w, const char* name) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 2 && x.is_contiguous(),
              name, " takes contiguous float32 (M, K) activations");
  TORCH_CHECK(x.size(1) == w.K, "x has ", x.size(1), " columns but the weight expects ", w.K);
  TORCH_CHECK(w.K % 8 == 0, name, " needs in_features divisible by 8, got ", w.K);
  at::Tensor y = at::empty({x.size(0), w.N}, x.options());
  if (x.size(0) > 0) gemm(w, x.data_ptr<float>(), x.size(0), y.data_ptr<float>());
  return y;
}

at::Tensor matmul_int8(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale) {
  return run_gemm(x, weight_from(Kind::I8, {w, scale}, 0, "matmul_int8"), "matmul_int8");
}

at::Tensor matmul_int4(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale, const at::Tensor& minv,
                       int64_t group_size) {
  return run_gemm(x, weight_from(Kind::I4, {w, scale, minv}, group_size, "matmul_int4"), "matmul_int4");
}

// The fp32 weight of an int4 layer in one pass (where ATen ops take several full-size temporaries).
at::Tensor dequantize_int4(const at::Tensor& w, const at::Tensor& scale, const at::Tensor& minv, int64_t group_size) {
  const Weight wt = weight_from(Kind::I4, {w, scale, minv}, group_size, "dequantize_int4");
  at::Tensor out = at::empty({wt.N, wt.K}, w.options().dtype(at::kFloat));
  float* op = out.data_ptr<float>();
  at::parallel_for(0, wt.N, grain_rows(wt.K, 1), [&](int64_t b, int64_t e) {
    dequantize_rows(wt, b, e - b, op + b * wt.K);
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
  m.def("matmul_int8(Tensor x, Tensor w, Tensor scale) -> Tensor");
  m.def("matmul_int4(Tensor x, Tensor w, Tensor scale, Tensor minv, int group_size) -> Tensor");
  m.def("parallel_threads() -> int");
}

TORCH_LIBRARY_IMPL(herd_cpu, CPU, m) {
  m.impl("linear_f32", &linear_f32);
  m.impl("linear_int8", &linear_int8);
  m.impl("linear_int4", &linear_int4);
  m.impl("linear_int8_a8", &linear_int8_a8);
  m.impl("linear_int4_a8", &linear_int4_a8);
  m.impl("dequantize_int4", &dequantize_int4);
  m.impl("matmul_int8", &matmul_int8);
  m.impl("matmul_int4", &matmul_int4);
}

TORCH_LIBRARY_IMPL(herd_cpu, CompositeExplicitAutograd, m) { m.impl("parallel_threads", &parallel_threads); }
