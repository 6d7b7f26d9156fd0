// The int4 tile kernels, written once and compiled twice by int4_tiles.h: once for AVX2 (the
// extension's baseline flags) and once inside a `#pragma GCC target` region for AVX-512 with VNNI,
// each copy in its own namespace. HERD_TILES_AVX512 (0 or 1) picks the instructions that differ:
//   int8 activations: AVX-512 VNNI's vpdpbusd (u8 x s8, four products summed into each int32
//     lane, one instruction) where AVX2 takes maddubs + add (pairs into int16) and one madd per
//     unit (int16 pairs into int32);
//   fp32 activations: AVX-512VL's vpermt2ps turns a nibble into its float through a 16-entry
//     table (one instruction, the index's upper bits ignored) where AVX2 masks and converts.
// No include guard: it is meant to be included more than once, into different namespaces.
// The layout and the numerics are described in int4_tiles.h.

// y (M, N) rows for tiles t0 .. t1 - 1 of one weight, int8 activations: xq (M, K) codes in input
// order, xd (M, K / 32) their block scales, xsum and xcorr (M, K / G) the group sums of x and the
// centring correction (gemv.h's prepare_acts). UPG: 32-input units per group when known at
// compile time (1: G = 32, the default), else 0.
template <int M, int UPG>
void a8_tiles(const int8_t* xq, const float* xd, const float* xsum, const float* xcorr, int64_t K, int64_t G,
              const uint8_t* tiles, int64_t t0, int64_t t1, float* y, int64_t N) {
  const int64_t ng = K / G, upg = UPG > 0 ? UPG : G / kBlock, nu = K / kBlock, gb = tile_group_bytes(G);
  const __m256i nib = _mm256_set1_epi8(0x0F);
#if !HERD_TILES_AVX512
  const __m256i ones = _mm256_set1_epi16(1);
#endif
  for (int64_t t = t0; t < t1; ++t) {
    const uint8_t* blk = tiles + t * ng * gb;
    __m256 yacc[M], macc[M];
    for (int m = 0; m < M; ++m) yacc[m] = macc[m] = _mm256_setzero_ps();
    for (int64_t g = 0; g < ng; ++g, blk += gb) {
      for (int64_t o = 0; o < gb; o += 64) _mm_prefetch((const char*)(blk + kPrefetchBytes + o), _MM_HINT_T0);
      const __m256 sv = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)blk));  // 8 rows' scales
      const __m256 mv = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(blk + 16)));  // and mins
      __m256 gs[M];  // per row: sum_u d_u (q . xq)_u + corr_g
      for (int m = 0; m < M; ++m) gs[m] = _mm256_broadcast_ss(xcorr + m * ng + g);
      for (int64_t uu = 0; uu < upg; ++uu) {
        const int64_t u = g * upg + uu;
        const uint8_t* c = blk + 32 + 128 * uu;
#if HERD_TILES_AVX512
        __m256i a0[M], a1[M], a2[M], a3[M];
        for (int m = 0; m < M; ++m) a0[m] = a1[m] = a2[m] = a3[m] = _mm256_setzero_si256();
#else
        __m256i p16[M];
        for (int m = 0; m < M; ++m) p16[m] = _mm256_setzero_si256();
#endif
#pragma GCC unroll 4
        for (int j = 0; j < 4; ++j) {
          const __m256i v = _mm256_loadu_si256((const __m256i*)(c + 32 * j));
          const __m256i lo = _mm256_and_si256(v, nib);  // lane r: row r, inputs 4j .. 4j + 3
          const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), nib);  // inputs 16 + 4j ..
#pragma GCC unroll 4
          for (int m = 0; m < M; ++m) {
            int32_t xl, xh;
            std::memcpy(&xl, xq + m * K + u * kBlock + 4 * j, 4);
            std::memcpy(&xh, xq + m * K + u * kBlock + 16 + 4 * j, 4);
#if HERD_TILES_AVX512
            if (j & 1) {
              a2[m] = _mm256_dpbusd_epi32(a2[m], lo, _mm256_set1_epi32(xl));
              a3[m] = _mm256_dpbusd_epi32(a3[m], hi, _mm256_set1_epi32(xh));
            } else {
              a0[m] = _mm256_dpbusd_epi32(a0[m], lo, _mm256_set1_epi32(xl));
              a1[m] = _mm256_dpbusd_epi32(a1[m], hi, _mm256_set1_epi32(xh));
            }
#else
            // Each int16 lane sums 2 products <= 15 * 127 per maddubs: eight of them stay < 2^15.
            p16[m] = _mm256_add_epi16(p16[m], _mm256_add_epi16(_mm256_maddubs_epi16(lo, _mm256_set1_epi32(xl)),
                                                               _mm256_maddubs_epi16(hi, _mm256_set1_epi32(xh))));
#endif
          }
        }
        for (int m = 0; m < M; ++m) {
#if HERD_TILES_AVX512
          const __m256i isum = _mm256_add_epi32(_mm256_add_epi32(a0[m], a1[m]), _mm256_add_epi32(a2[m], a3[m]));
#else
          const __m256i isum = _mm256_madd_epi16(p16[m], ones);
#endif
          gs[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), _mm256_broadcast_ss(xd + m * nu + u), gs[m]);
        }
      }
      for (int m = 0; m < M; ++m) {
        yacc[m] = _mm256_fmadd_ps(gs[m], sv, yacc[m]);
        macc[m] = _mm256_fmadd_ps(mv, _mm256_broadcast_ss(xsum + m * ng + g), macc[m]);
      }
    }
    for (int m = 0; m < M; ++m) store_tile(_mm256_add_ps(yacc[m], macc[m]), y + m * N, t, N);
  }
}

// The same for fp32 activations x (M, K): per group, sum_k q_k x_k in fp32 for each of the 8 rows,
// times the rows' scales, plus the mins times the group sums of x. C chains of FMAs per activation
// row: at M = 1 two left the FMA units waiting on their 4-cycle latency (4 chains: 7% faster).
template <int M, int UPG>
void f32_tiles(const float* x, const float* xsum, int64_t K, int64_t G, const uint8_t* tiles, int64_t t0, int64_t t1,
               float* y, int64_t N) {
  constexpr int C = M == 1 ? 4 : 2;
  const int64_t ng = K / G, upg = UPG > 0 ? UPG : G / kBlock, gb = tile_group_bytes(G);
#if HERD_TILES_AVX512
  const __m256 lut_lo = _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7), lut_hi = _mm256_setr_ps(8, 9, 10, 11, 12, 13, 14, 15);
#else
  const __m256i mask = _mm256_set1_epi32(0xF);
#endif
  for (int64_t t = t0; t < t1; ++t) {
    const uint8_t* blk = tiles + t * ng * gb;
    __m256 yacc[M], macc[M];
    for (int m = 0; m < M; ++m) yacc[m] = macc[m] = _mm256_setzero_ps();
    for (int64_t g = 0; g < ng; ++g, blk += gb) {
      for (int64_t o = 0; o < gb; o += 64) _mm_prefetch((const char*)(blk + kPrefetchBytes + o), _MM_HINT_T0);
      const __m256 sv = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)blk));
      const __m256 mv = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(blk + 16)));
      __m256 f[M][C];
      for (int m = 0; m < M; ++m)
        for (int i = 0; i < C; ++i) f[m][i] = _mm256_setzero_ps();
      for (int64_t uu = 0; uu < upg; ++uu) {
        const int64_t k0 = (g * upg + uu) * kBlock;
        const uint8_t* c = blk + 32 + 128 * uu;
#pragma GCC unroll 4
        for (int j = 0; j < 4; ++j) {
          const __m256i v = _mm256_loadu_si256((const __m256i*)(c + 32 * j));
          // Lane r's nibble 2i holds row r's input 4j + i, nibble 2i + 1 its input 16 + 4j + i.
#pragma GCC unroll 8
          for (int n = 0; n < 8; ++n) {
            const __m256i sh = n == 0 ? v : _mm256_srli_epi32(v, 4 * n);
#if HERD_TILES_AVX512
            const __m256 q = _mm256_permutex2var_ps(lut_lo, sh, lut_hi);  // index bits 0..3 only
#else
            const __m256 q = _mm256_cvtepi32_ps(_mm256_and_si256(sh, mask));
#endif
            const int64_t k = k0 + (n & 1) * 16 + 4 * j + n / 2;
#pragma GCC unroll 4
            for (int m = 0; m < M; ++m) {
              __m256& a = f[m][(8 * j + n) % C];
              a = _mm256_fmadd_ps(q, _mm256_broadcast_ss(x + m * K + k), a);
            }
          }
        }
      }
      for (int m = 0; m < M; ++m) {
        __m256 sum = f[m][0];
        for (int i = 1; i < C; ++i) sum = _mm256_add_ps(sum, f[m][i]);
        yacc[m] = _mm256_fmadd_ps(sum, sv, yacc[m]);
        macc[m] = _mm256_fmadd_ps(mv, _mm256_broadcast_ss(xsum + m * ng + g), macc[m]);
      }
    }
    for (int m = 0; m < M; ++m) store_tile(_mm256_add_ps(yacc[m], macc[m]), y + m * N, t, N);
  }
}
