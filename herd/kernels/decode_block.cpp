// One Llama transformer block for a decode step (each row feeds one token), as a single op:
//
//   h   = x + wo(attend(rope(wq(n1)), rope(wk(n1)) -> cache, wv(n1) -> cache)),  n1 = rms_norm(x)
//   out = h + w2(silu(w1(n2)) * w3(n2)),                                         n2 = rms_norm(h)
//
// Why: a decode step of a small model is mostly per-op overhead. SmolLM2-135M has 30 blocks of
// seven small matmuls and ~40 other ATen ops (RMSNorm alone is eight), each costing a few
// microseconds of dispatch, allocation and Python, which at one thread came to a third of a
// step. Here the block is one call: the small steps are plain loops over a few KB, and the seven
// matmuls are four parallel regions of the kernels in gemv.h (q, k and v together, gate and up
// together), whose inputs are prepared (int4 group sums, int8 activation codes) once per region.
//
// The math is the model's, in fp32, in the same order per element; sums are taken in a different
// order (vector lanes), so results equal the eager block to fp32 reassociation error:
//   RMSNorm  (x * (1 / sqrt(mean(x^2) + eps))) * w, normalised first, then scaled (Meta's order)
//   RoPE     interleaved pairs (x0, x1) times the complex rotation (c, s) at the row's position
//   cache    k (after RoPE) and v written at slot pos[b] of row b, like KVCache.update
//   attend   query head h reads kv head h / (H / Hkv) (GQA), slots 0 .. min(pos[b] + 1, kv_len) - 1,
//            softmax(q k / sqrt(D)) v: the model's AttentionMask for a cached one-token step
//   SiLU     g / (1 + exp(-g))
// exp is a polynomial (relative error ~1e-7, below fp32's rounding of its argument).

#include "gemv.h"

#include <torch/library.h>

namespace {

using namespace herd_kernels;

// e^x for x in fp32's range: x = n ln2 + r with |r| <= ln2 / 2, e^r by its Taylor series to r^7
// (truncation error < 1e-8 relative), 2^n through the exponent bits. Inputs below -87.3 (results
// under fp32's smallest normal) give ~1e-38 instead of a denormal or 0, which no sum notices.
inline __m256 exp256(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145751953125f), x);  // ln2 in two parts: exact n * hi
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428606765330187045e-06f), r);
  __m256 p = _mm256_set1_ps(1.f / 5040);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 720));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 120));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 24));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 6));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

inline float exp1(float x) {
  alignas(32) float v[8] = {x};
  _mm256_store_ps(v, exp256(_mm256_load_ps(v)));
  return v[0];
}

// out = (x / rms(x)) * w over n inputs (n % 8 == 0, checked by the caller).
void rms_norm(const float* x, const float* w, int64_t n, float eps, float* out) {
  __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m256 a = _mm256_loadu_ps(x + i), b = _mm256_loadu_ps(x + i + 8);
    s0 = _mm256_fmadd_ps(a, a, s0);
    s1 = _mm256_fmadd_ps(b, b, s1);
  }
  for (; i < n; i += 8) s0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i), _mm256_loadu_ps(x + i), s0);
  const float r = 1.f / std::sqrt(hsum(_mm256_add_ps(s0, s1)) / float(n) + eps);
  const __m256 rv = _mm256_set1_ps(r);
  for (i = 0; i < n; i += 8)
    _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(x + i), rv), _mm256_loadu_ps(w + i)));
}

// Rotates n_heads heads of D inputs in place by the (c, s) pairs in cs (D / 2 pairs).
void rope(float* x, int64_t n_heads, int64_t D, const float* cs) {
  for (int64_t h = 0; h < n_heads; ++h) {
    float* xh = x + h * D;
    for (int64_t i = 0; i < D / 2; ++i) {
      const float a = xh[2 * i], b = xh[2 * i + 1], c = cs[2 * i], s = cs[2 * i + 1];
      xh[2 * i] = a * c - b * s;
      xh[2 * i + 1] = a * s + b * c;
    }
  }
}

inline float dot(const float* a, const float* b, int64_t D) {
  __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= D; i += 16) {
    s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
    s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
  }
  for (; i < D; i += 8) s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
  return hsum(_mm256_add_ps(s0, s1));
}

// One query head over L cached keys and values (rows of D floats): out = softmax(q K^T * scale) V.
// p is scratch for L scores.
void attend_head(const float* q, const float* keys, const float* values, int64_t L, int64_t D, float scale,
                 float* p, float* out) {
  float mx = -INFINITY;
  for (int64_t j = 0; j < L; ++j) {
    p[j] = dot(q, keys + j * D, D) * scale;
    mx = std::max(mx, p[j]);
  }
  const __m256 mv = _mm256_set1_ps(mx);
  __m256 sv = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= L; j += 8) {
    const __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(p + j), mv));
    _mm256_storeu_ps(p + j, e);
    sv = _mm256_add_ps(sv, e);
  }
  float sum = hsum(sv);
  for (; j < L; ++j) {
    p[j] = exp1(p[j] - mx);
    sum += p[j];
  }
  for (int64_t d = 0; d < D; d += 8) {
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 2 <= L; k += 2) {
      a0 = _mm256_fmadd_ps(_mm256_set1_ps(p[k]), _mm256_loadu_ps(values + k * D + d), a0);
      a1 = _mm256_fmadd_ps(_mm256_set1_ps(p[k + 1]), _mm256_loadu_ps(values + (k + 1) * D + d), a1);
    }
    if (k < L) a0 = _mm256_fmadd_ps(_mm256_set1_ps(p[k]), _mm256_loadu_ps(values + k * D + d), a0);
    _mm256_storeu_ps(out + d, _mm256_div_ps(_mm256_add_ps(a0, a1), _mm256_set1_ps(sum)));
  }
}

// The seven weights in the order the Python side passes them.
enum { WQ, WK, WV, WO, W1, W2, W3, N_WEIGHTS };
constexpr const char* kNames[N_WEIGHTS] = {"wq", "wk", "wv", "wo", "w1", "w2", "w3"};

at::Tensor decode_block(const at::Tensor& x, const at::Tensor& pos, const at::Tensor& rope_cs, const at::Tensor& k_cache,
                        const at::Tensor& v_cache, const at::Tensor& attention_norm, const at::Tensor& ffn_norm,
                        at::TensorList weights, int64_t kind_id, int64_t group_size, bool a8, double eps,
                        int64_t n_heads, int64_t kv_len) {
  TORCH_CHECK(kind_id >= 0 && kind_id <= 3, "decode_block: kind must be 0 (f32), 1 (int8), 2 (int4) or 3 (int4 tiles)");
  const Kind kind = Kind(kind_id);
  // int4 tiles come alone, without their row-layout tensors: the shapes follow from the model's,
  // and 21 fewer tensors to pass cost ~2 us less per call.
  const size_t per = kind == Kind::I4T ? 1 : tensors_per_weight(kind);
  TORCH_CHECK(weights.size() == N_WEIGHTS * per, "decode_block: expected ", N_WEIGHTS * per, " weight tensors, got ",
              weights.size());
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.is_contiguous(),
              "decode_block takes contiguous float32 CPU activations");
  const int64_t dim = x.size(-1), B = x.numel() / dim;
  TORCH_CHECK(B >= 1 && B <= kMaxM, "decode_block handles 1..", kMaxM, " rows, got ", B);
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes() && k_cache.is_contiguous() &&
                  v_cache.is_contiguous() && k_cache.scalar_type() == at::kFloat && v_cache.scalar_type() == at::kFloat,
              "decode_block: the caches must be contiguous float32 (B, Hkv, Lmax, D) tensors of one shape");
  const int64_t Hkv = k_cache.size(1), Lmax = k_cache.size(2), D = k_cache.size(3), H = n_heads;
  TORCH_CHECK(k_cache.size(0) >= B, "decode_block: the cache has ", k_cache.size(0), " rows, fewer than ", B);
  TORCH_CHECK(H >= Hkv && H % Hkv == 0 && D % 8 == 0 && dim % 8 == 0,
              "decode_block: needs n_heads a multiple of n_kv_heads and head_dim, dim multiples of 8");
  Weight w[N_WEIGHTS];
  if (kind == Kind::I4T) {
    TORCH_CHECK(group_size >= kBlock && group_size % kBlock == 0, "decode_block: group_size must be a multiple of 32");
    const int64_t gb = tile_group_bytes(group_size), w2_bytes = weights[W2].dim() == 2 ? weights[W2].size(1) : 0;
    const int64_t hid = w2_bytes % gb == 0 ? w2_bytes / gb * group_size : 0;  // w2's in_features
    const int64_t n[N_WEIGHTS] = {H * D, Hkv * D, Hkv * D, dim, hid, dim, hid};
    const int64_t k[N_WEIGHTS] = {dim, dim, dim, H * D, dim, hid, dim};
    for (int i = 0; i < N_WEIGHTS; ++i) w[i] = weight_from_tiles(weights[i], n[i], k[i], group_size, kNames[i]);
  } else {
    for (int i = 0; i < N_WEIGHTS; ++i) w[i] = weight_from(kind, weights.slice(i * per, per), group_size, kNames[i]);
  }
  const int64_t hidden = w[W1].N;
  TORCH_CHECK(w[WQ].K == dim && w[WK].K == dim && w[WV].K == dim && w[W1].K == dim && w[W3].K == dim &&
                  w[WQ].N == H * D && w[WK].N == Hkv * D && w[WV].N == Hkv * D && w[WO].K == H * D &&
                  w[WO].N == dim && w[W3].N == hidden && w[W2].K == hidden && w[W2].N == dim && hidden % 8 == 0,
              "decode_block: weight shapes do not match dim ", dim, ", ", H, " x ", Hkv, " heads of ", D);
  TORCH_CHECK(attention_norm.scalar_type() == at::kFloat && attention_norm.is_contiguous() &&
                  attention_norm.numel() == dim && ffn_norm.scalar_type() == at::kFloat && ffn_norm.is_contiguous() &&
                  ffn_norm.numel() == dim,
              "decode_block: the norm weights must be contiguous float32 (dim,)");
  TORCH_CHECK(pos.scalar_type() == at::kLong && pos.is_contiguous() && (pos.numel() == B || pos.numel() == 1),
              "decode_block: pos must hold one int64 position per row, or one for all rows");
  TORCH_CHECK(rope_cs.scalar_type() == at::kFloat && rope_cs.is_contiguous() &&
                  (rope_cs.numel() == D || rope_cs.numel() == B * D),
              "decode_block: rope must hold (cos, sin) pairs for one position per row, or one for all rows");
  std::vector<int64_t> p(B), len(B);
  const int64_t* pp = pos.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    p[b] = pp[pos.numel() == 1 ? 0 : b];
    TORCH_CHECK(p[b] >= 0 && p[b] < Lmax, "decode_block: position ", p[b], " is outside the cache (", Lmax, " slots)");
    len[b] = std::min(p[b] + 1, kv_len);
    TORCH_CHECK(len[b] >= 1, "decode_block: kv_len must be >= 1");
  }

  const float* xp = x.data_ptr<float>();
  at::Tensor out = at::empty_like(x);
  float* op = out.data_ptr<float>();
  std::vector<float> n1(B * dim), q(B * H * D), k(B * Hkv * D), v(B * Hkv * D), att(B * H * D), o(B * dim);
  std::vector<float> g(B * hidden), u(B * hidden);

  // Attention half.
  for (int64_t b = 0; b < B; ++b)
    rms_norm(xp + b * dim, attention_norm.data_ptr<float>(), dim, float(eps), n1.data() + b * dim);
  {
    Acts a;
    prepare_acts(a, n1.data(), B, dim, kind, group_size, a8);
    float* ys[3] = {q.data(), k.data(), v.data()};
    gemv_multi(3, &w[WQ], ys, a);
  }
  float* kc = k_cache.data_ptr<float>();
  float* vc = v_cache.data_ptr<float>();
  const float* cs = rope_cs.data_ptr<float>();
  for (int64_t b = 0; b < B; ++b) {
    const float* csb = cs + (rope_cs.numel() == D ? 0 : b * D);
    rope(q.data() + b * H * D, H, D, csb);
    rope(k.data() + b * Hkv * D, Hkv, D, csb);
    for (int64_t h = 0; h < Hkv; ++h) {
      const int64_t slot = ((b * Hkv + h) * Lmax + p[b]) * D;
      std::memcpy(kc + slot, k.data() + (b * Hkv + h) * D, D * sizeof(float));
      std::memcpy(vc + slot, v.data() + (b * Hkv + h) * D, D * sizeof(float));
    }
  }
  const float scale = 1.f / std::sqrt(float(D));
  const int64_t rep = H / Hkv, longest = *std::max_element(len.begin(), len.end());
  // Heads in parallel once each has enough keys to pay for the fork (short contexts: one thread).
  at::parallel_for(0, B * H, std::max<int64_t>(1, 16384 / (longest * D)), [&](int64_t s, int64_t e) {
    std::vector<float> scratch(longest);
    for (int64_t i = s; i < e; ++i) {
      const int64_t b = i / H, h = i % H;
      const int64_t base = (b * Hkv + h / rep) * Lmax * D;
      attend_head(q.data() + i * D, kc + base, vc + base, len[b], D, scale, scratch.data(), att.data() + i * D);
    }
  });
  {
    Acts a;
    prepare_acts(a, att.data(), B, H * D, kind, group_size, a8);
    gemv(w[WO], a, o.data());
  }
  for (int64_t i = 0; i < B * dim; i += 8)  // h = x + attention, written into out
    _mm256_storeu_ps(op + i, _mm256_add_ps(_mm256_loadu_ps(xp + i), _mm256_loadu_ps(o.data() + i)));

  // Feed-forward half.
  for (int64_t b = 0; b < B; ++b)
    rms_norm(op + b * dim, ffn_norm.data_ptr<float>(), dim, float(eps), n1.data() + b * dim);
  {
    Acts a;
    prepare_acts(a, n1.data(), B, dim, kind, group_size, a8);
    float* ys[2] = {g.data(), u.data()};
    const Weight gate_up[2] = {w[W1], w[W3]};
    gemv_multi(2, gate_up, ys, a);
  }
  const __m256 one = _mm256_set1_ps(1.f);
  for (int64_t i = 0; i < B * hidden; i += 8) {  // silu(g) * u, in place in g
    const __m256 gv = _mm256_loadu_ps(g.data() + i);
    const __m256 silu = _mm256_div_ps(gv, _mm256_add_ps(one, exp256(_mm256_sub_ps(_mm256_setzero_ps(), gv))));
    _mm256_storeu_ps(g.data() + i, _mm256_mul_ps(silu, _mm256_loadu_ps(u.data() + i)));
  }
  {
    Acts a;
    prepare_acts(a, g.data(), B, hidden, kind, group_size, a8);
    gemv(w[W2], a, o.data());
  }
  for (int64_t i = 0; i < B * dim; i += 8)
    _mm256_storeu_ps(op + i, _mm256_add_ps(_mm256_loadu_ps(op + i), _mm256_loadu_ps(o.data() + i)));
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(herd_cpu, m) {
  m.def("decode_block(Tensor x, Tensor pos, Tensor rope, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor attention_norm, "
        "Tensor ffn_norm, Tensor[] weights, int kind, int group_size, bool a8, float eps, int n_heads, int kv_len) "
        "-> Tensor");
}

TORCH_LIBRARY_IMPL(herd_cpu, CPU, m) { m.impl("decode_block", &decode_block); }
