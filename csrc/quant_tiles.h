// The AVX512-VNNI tile kernels of the quantized linear ops (csrc/quant_linear.cpp, which
// describes the packed layout and the activation quantization): shared by quant_linear and
// grouped_quant_linear so that both compute a row with the very same instructions.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define TOKENMILL_HAS_VNNI 1
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kRows = 16;   // output rows per tile: one zmm of fp32 accumulators
constexpr int64_t kBlock = 32;  // weights per quantization block along K
constexpr int kMR = 8;          // activation rows per pass over a tile's weights (<= 8: zmm)
constexpr int64_t kPrefetchAhead = 12;  // records (~3.4 KB at 4 bits) of software prefetch

#ifdef TOKENMILL_HAS_VNNI

inline __m512 load_row16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load_row16(const at::BFloat16* p) {
  __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// One block of 32 activations -> 32 int8 at dst; returns its scale d and d * (sum of the int8).
template <typename T>
inline void quantize_block(const T* src, int8_t* dst, float& d_out, float& s_out) {
  __m512 v0 = load_row16(src), v1 = load_row16(src + 16);
  __m512 amax = _mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1));
  const float a = _mm512_reduce_max_ps(amax);
  const float d = a / 127.0f;
  const float id = d > 0.0f ? 1.0f / d : 0.0f;
  // round to nearest even (the default MXCSR mode), then pack to int8
  __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, _mm512_set1_ps(id)));
  __m512i q1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, _mm512_set1_ps(id)));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), _mm512_cvtsepi32_epi8(q0));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + 16), _mm512_cvtsepi32_epi8(q1));
  const int32_t s = _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
  d_out = d;
  s_out = d * static_cast<float>(s);
}

// x [M, K] -> xq [M, K] int8, dx [M, nb] (scale), sx [M, nb] (dx * sum of the block's xq).
template <typename T>
void quantize_activations(const T* x, int64_t M, int64_t K, int8_t* xq, float* dx, float* sx) {
  const int64_t nb = K / kBlock;
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      for (int64_t b = 0; b < nb; ++b) {
        quantize_block(x + m * K + b * kBlock, xq + m * K + b * kBlock, dx[m * nb + b],
                       sx[m * nb + b]);
      }
    }
  });
}

inline void store_row16(float* p, __mmask16 mask, __m512 v) { _mm512_mask_storeu_ps(p, mask, v); }
inline void store_row16(at::BFloat16* p, __mmask16 mask, __m512 v) {
  // round to nearest even, as Tensor.to(torch.bfloat16) does
#ifdef __AVX512BF16__
  const __m256i h = reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v));
#else
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m256i h = _mm512_cvtepi32_epi16(_mm512_srli_epi32(
      _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16));
#endif
  _mm256_mask_storeu_epi16(p, mask, h);
}

template <int BITS, int MR, typename OutT>
inline void tile_kernel(const uint8_t* rec0, int64_t nb, const int8_t* xq, int64_t K,
                        const float* dx, const float* sx, OutT* y, int64_t ldy, int64_t nvalid) {
  constexpr int64_t kWBytes = kRows * kBlock * BITS / 8;
  constexpr int64_t kRec = kWBytes + 2 * kRows * 2;
  const __m512i nib = _mm512_set1_epi8(0x0F);
  __m512 acc[MR];
  for (int i = 0; i < MR; ++i) acc[i] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* rec = rec0 + b * kRec;
    // Records are streamed once per token from memory: fetch a few ahead (past the tile's end
    // too: the next tile follows, and this thread usually takes it next). Measured ~20% more
    // bandwidth at one row.
    for (int64_t line = 0; line < kRec; line += 64)
      _mm_prefetch(reinterpret_cast<const char*>(rec + kPrefetchAhead * kRec + line), _MM_HINT_T0);
    __m512i w[8];
    if constexpr (BITS == 4) {
      for (int p = 0; p < 4; ++p) {
        const __m512i v = _mm512_loadu_si512(rec + 64 * p);
        w[p] = _mm512_and_si512(v, nib);
        w[p + 4] = _mm512_and_si512(_mm512_srli_epi16(v, 4), nib);
      }
    } else {
      for (int j = 0; j < 8; ++j) w[j] = _mm512_loadu_si512(rec + 64 * j);
    }
    const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(rec + kWBytes)));
    const __m512 mo = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(rec + kWBytes + 32)));
    // Unrolled so that the MR accumulators stay in registers (rolled, GCC kept them on the
    // stack: a load and a store per row and block; ~5-10% at 512 rows).
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const int8_t* xb = xq + i * K + b * kBlock;
      // Independent accumulator chains: a single chain of 8 dot products waits on vpdpbusd's
      // latency (measured 2.7x slower than bf16 at 64 rows with one chain). Their number may
      // depend on MR because the sum is exact: |sum| <= 32 * 255 * 128 < 2^31.
      constexpr int kChains = MR == 1 ? 4 : 2;
      __m512i chain[kChains];
      for (int c = 0; c < kChains; ++c) chain[c] = _mm512_setzero_si512();
      for (int j = 0; j < 8; ++j) {
        int32_t quad;  // 4 activations, broadcast straight from memory into the dot product
        std::memcpy(&quad, xb + 4 * j, sizeof(quad));
        chain[j % kChains] = _mm512_dpbusd_epi32(chain[j % kChains], w[j], _mm512_set1_epi32(quad));
      }
      __m512i ia = _mm512_add_epi32(chain[0], chain[1]);
      if constexpr (kChains == 4) ia = _mm512_add_epi32(ia, _mm512_add_epi32(chain[2], chain[3]));
      // The float part, identical for every MR: one product, two explicit fused multiply-adds.
      const __m512 scale = _mm512_mul_ps(d, _mm512_set1_ps(dx[i * nb + b]));
      acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(ia), scale, acc[i]);
      acc[i] = _mm512_fmadd_ps(mo, _mm512_set1_ps(sx[i * nb + b]), acc[i]);
    }
  }
  const __mmask16 mask = nvalid >= kRows ? 0xFFFF : static_cast<__mmask16>((1u << nvalid) - 1);
  for (int i = 0; i < MR; ++i) store_row16(y + i * ldy, mask, acc[i]);
}

// Tile t of a packed weight for activation rows [0, M): rows in groups of kMR, the rest in one
// narrower pass (9 rows as 8 + 1, not 4 + 4 + 1): each pass unpacks the tile's weights once.
template <int BITS, typename OutT>
inline void run_tile(const uint8_t* packed, int64_t t, int64_t nb, int64_t n, const int8_t* xq,
                     const float* dx, const float* sx, int64_t M, int64_t K, OutT* y) {
  constexpr int64_t kRec = kRows * kBlock * BITS / 8 + 2 * kRows * 2;
  const uint8_t* rec = packed + t * nb * kRec;
  const int64_t nvalid = std::min<int64_t>(kRows, n - t * kRows);
  OutT* yt = y + t * kRows;
  for (int64_t m = 0; m < M; m += kMR) {
    const int64_t r = std::min<int64_t>(kMR, M - m);
    const int8_t* xm = xq + m * K;
    const float* dm = dx + m * nb;
    const float* sm = sx + m * nb;
    OutT* ym = yt + m * n;
    switch (r) {
#define TOKENMILL_PASS(W) \
  case W:                 \
    tile_kernel<BITS, W>(rec, nb, xm, K, dm, sm, ym, n, nvalid); \
    break;
      TOKENMILL_PASS(1) TOKENMILL_PASS(2) TOKENMILL_PASS(3) TOKENMILL_PASS(4)
      TOKENMILL_PASS(5) TOKENMILL_PASS(6) TOKENMILL_PASS(7) TOKENMILL_PASS(8)
#undef TOKENMILL_PASS
    }
  }
}

template <int BITS, typename OutT>
void run_tiles(const uint8_t* packed, int64_t T, int64_t nb, int64_t n, const int8_t* xq,
               const float* dx, const float* sx, int64_t M, int64_t K, OutT* y) {
  const int64_t grain = std::max<int64_t>(1, T / (4 * at::get_num_threads()));
  at::parallel_for(0, T, grain, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) run_tile<BITS, OutT>(packed, t, nb, n, xq, dx, sx, M, K, y);
  });
}

#endif  // TOKENMILL_HAS_VNNI

}  // namespace
