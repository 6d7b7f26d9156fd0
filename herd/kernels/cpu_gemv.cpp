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

// int4 with `tiles` (repack_int4 of the same tensors) reads the tiles; the results are the same
// sums in another order (int4_tiles.h).
Weight int4_weight(const at::Tensor& w, const at::Tensor& scale, const at::Tensor& minv, int64_t group_size,
                   const std::optional<at::Tensor>& tiles, const char* name) {
  if (tiles.has_value()) return weight_from(Kind::I4T, {w, scale, minv, *tiles}, group_size, name);
  return weight_from(Kind::I4, {w, scale, minv}, group_size, name);
}

at::Tensor linear_int4(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale, const at::Tensor& minv,
                       int64_t group_size, const std::optional<at::Tensor>& tiles) {
  return run(x, int4_weight(w, scale, minv, group_size, tiles, "linear_int4"), false);
}

at::Tensor linear_int8_a8(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale) {
  return run(x, weight_from(Kind::I8, {w, scale}, 0, "linear_int8_a8"), true);
}

at::Tensor linear_int4_a8(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale, const at::Tensor& minv,
                          int64_t group_size, const std::optional<at::Tensor>& tiles) {
  return run(x, int4_weight(w, scale, minv, group_size, tiles, "linear_int4_a8"), true);
}

// The tiles of an int4 weight (int4_tiles.h): (n_tiles(N), K / G * tile_group_bytes(G)) uint8.
at::Tensor repack_int4(const at::Tensor& w, const at::Tensor& scale, const at::Tensor& minv, int64_t group_size) {
  const Weight wt = weight_from(Kind::I4, {w, scale, minv}, group_size, "repack_int4");
  const int64_t bytes = (wt.K / wt.G) * tile_group_bytes(wt.G);
  at::Tensor out = at::empty({n_tiles(wt.N), bytes}, w.options());
  uint8_t* op = out.data_ptr<uint8_t>();
  at::parallel_for(0, n_tiles(wt.N), 16, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) repack_tile(wt.i4, wt.s16, wt.m16, wt.N, wt.K, wt.G, t, op + t * bytes);
  });
  return out;
}

// The instruction set the int4 tile kernels run with now: 0 AVX2, 1 AVX-512 (F, VL, BW, VNNI).
int64_t tiles_isa_op() { return int64_t(tiles_isa()); }

// Caps it (0: AVX2 even where AVX-512 is there, for tests; 1: the best the CPU has); returns the
// previous cap. Process-wide.
int64_t set_max_isa(int64_t isa) {
  TORCH_CHECK(isa == 0 || isa == 1, "set_max_isa takes 0 (AVX2) or 1 (AVX-512)");
  return max_isa().exchange(int(isa));
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
  m.def("linear_int4(Tensor x, Tensor w, Tensor scale, Tensor minv, int group_size, Tensor? tiles=None) -> Tensor");
  m.def("linear_int8_a8(Tensor x, Tensor w, Tensor scale) -> Tensor");
  m.def("linear_int4_a8(Tensor x, Tensor w, Tensor scale, Tensor minv, int group_size, Tensor? tiles=None) -> Tensor");
  m.def("repack_int4(Tensor w, Tensor scale, Tensor minv, int group_size) -> Tensor");
  m.def("tiles_isa() -> int");
  m.def("set_max_isa(int isa) -> int");
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
  m.impl("repack_int4", &repack_int4);
  m.impl("matmul_int8", &matmul_int8);
  m.impl("matmul_int4", &matmul_int4);
}

TORCH_LIBRARY_IMPL(herd_cpu, CompositeExplicitAutograd, m) {
  m.impl("parallel_threads", &parallel_threads);
  m.impl("tiles_isa", &tiles_isa_op);
  m.impl("set_max_isa", &set_max_isa);
}
