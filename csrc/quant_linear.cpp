// Weight-only quantized linear for CPU (tokenmill_cpu_quant): y = x W^T with W kept in 4-bit or
// 8-bit blocks of 32 along K, never dequantized to a matrix.
//
// quant_linear(x [M, K] float32/bfloat16, packed [T, K/32, rec] uint8, n, bits) -> y [M, n]
//
// Packed layout (built by tokenmill/layers/quantization/packing.py): output rows are grouped in
// tiles of 16; for each (tile, block of 32 columns) one record holds the 16 x 32 weights as
// unsigned integers q (bits = 4: 256 bytes, bits = 8: 512 bytes) followed by the 16 scales d and
// the 16 offsets m as fp16, so that w = d * q + m (GGUF Q4_0, Q4_1 and Q8_0 all map onto this
// exactly). The weight bytes are ordered for AVX512-VNNI: vector j (64 bytes) holds, for the 16
// rows, the 4 consecutive weights k = 4j .. 4j + 3 (row-major [16][4]); with bits = 4, vector j
// (j < 4) holds quad j in its low nibbles and quad j + 4 in its high nibbles.
//
// Activations are quantized per row and block of 32 to int8 with a float scale (like llama.cpp's
// Q8_1), then one vpdpbusd does 64 multiply-adds: sum_k w_k x_k = d dx sum_k q_k xq_k
// + m dx sum_k xq_k per block. Each output row is computed by one thread in a fixed order that
// does not depend on M, so a row's result is the same whatever else is in the batch: a block's
// integer dot product is exact (any order of int32 additions gives the same sum), and its two
// float updates are the same explicit fused multiply-adds in every pass width (see tile_kernel).
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

// x [M, K] -> xq [M, K] int8, dx [M, nb] (scale), sx [M, nb] (dx * sum of the block's xq).
template <typename T>
void quantize_activations(const T* x, int64_t M, int64_t K, int8_t* xq, float* dx, float* sx) {
  const int64_t nb = K / kBlock;
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      for (int64_t b = 0; b < nb; ++b) {
        const T* src = x + m * K + b * kBlock;
        __m512 v0 = load_row16(src), v1 = load_row16(src + 16);
        __m512 amax = _mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1));
        const float a = _mm512_reduce_max_ps(amax);
        const float d = a / 127.0f;
        const float id = d > 0.0f ? 1.0f / d : 0.0f;
        // round to nearest even (the default MXCSR mode), then pack to int8
        __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, _mm512_set1_ps(id)));
        __m512i q1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, _mm512_set1_ps(id)));
        int8_t* dst = xq + m * K + b * kBlock;
        _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), _mm512_cvtsepi32_epi8(q0));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + 16), _mm512_cvtsepi32_epi8(q1));
        const int32_t s = _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
        dx[m * nb + b] = d;
        sx[m * nb + b] = d * static_cast<float>(s);
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

template <int BITS, typename OutT>
void run_tiles(const uint8_t* packed, int64_t T, int64_t nb, int64_t n, const int8_t* xq,
               const float* dx, const float* sx, int64_t M, int64_t K, OutT* y) {
  constexpr int64_t kRec = kRows * kBlock * BITS / 8 + 2 * kRows * 2;
  const int64_t grain = std::max<int64_t>(1, T / (4 * at::get_num_threads()));
  at::parallel_for(0, T, grain, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const uint8_t* rec = packed + t * nb * kRec;
      const int64_t nvalid = std::min<int64_t>(kRows, n - t * kRows);
      OutT* yt = y + t * kRows;
      // Rows in groups of kMR, the rest in one narrower pass (9 rows as 8 + 1, not 4 + 4 + 1):
      // each pass unpacks the tile's weights once.
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
  });
}

// One (tile, block) record -> 16 rows x 32 bfloat16 weights at out (row stride ld).
template <int BITS>
inline void dequant_record(const uint8_t* rec, at::BFloat16* out, int64_t ld, int64_t nvalid) {
  constexpr int64_t kWBytes = kRows * kBlock * BITS / 8;
  alignas(64) uint8_t q[kRows][kBlock];
  for (int j = 0; j < 8; ++j) {  // vector j: rows x (k = 4j .. 4j + 3), see the layout above
    const uint8_t* v = rec + 64 * (BITS == 4 ? j % 4 : j);
    for (int r = 0; r < kRows; ++r)
      for (int e = 0; e < 4; ++e) {
        const uint8_t byte = v[r * 4 + e];
        q[r][4 * j + e] = BITS == 8 ? byte : (j < 4 ? byte & 0x0F : byte >> 4);
      }
  }
  alignas(64) float d[kRows], m[kRows];
  _mm512_store_ps(d, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(rec + kWBytes))));
  _mm512_store_ps(m, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(rec + kWBytes + 32))));
  for (int64_t r = 0; r < nvalid; ++r) {
    const __m512 dr = _mm512_set1_ps(d[r]), mr = _mm512_set1_ps(m[r]);
    for (int h = 0; h < 2; ++h) {
      const __m128i b = _mm_load_si128(reinterpret_cast<const __m128i*>(q[r] + 16 * h));
      // two ops, no fused multiply-add: the same values as the reference dequantization
      const __m512 w = _mm512_add_ps(_mm512_mul_ps(dr, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(b))), mr);
      // float32 -> bfloat16, round to nearest even (what Tensor.to(torch.bfloat16) does)
      const __m512i bits = _mm512_castps_si512(w);
      const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
      const __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + r * ld + 16 * h),
                          _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded, 16)));
    }
  }
}

#endif  // TOKENMILL_HAS_VNNI

// The dense bfloat16 weight [n, K] of a packed one (for large batches, where a bf16 matmul on
// the dequantized weight beats the int8 dot products).
at::Tensor dequantize_packed(const at::Tensor& packed, int64_t n, int64_t bits) {
#ifndef TOKENMILL_HAS_VNNI
  TORCH_CHECK(false, "tokenmill_cpu_quant was built without AVX512-VNNI");
#else
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.dim() == 3 && packed.is_contiguous(),
              "dequantize_packed: packed must be contiguous uint8 [tiles, blocks, record]");
  TORCH_CHECK(bits == 4 || bits == 8, "dequantize_packed: bits must be 4 or 8");
  const int64_t T = packed.size(0), nb = packed.size(1), K = nb * kBlock;
  const int64_t rec = kRows * kBlock * bits / 8 + 2 * kRows * 2;
  TORCH_CHECK(packed.size(2) == rec, "dequantize_packed: record size ", packed.size(2), " != ", rec);
  TORCH_CHECK(n > (T - 1) * kRows && n <= T * kRows, "dequantize_packed: n = ", n,
              " does not fit ", T, " tiles");
  auto out = at::empty({n, K}, packed.options().dtype(at::kBFloat16));
  const uint8_t* src = packed.data_ptr<uint8_t>();
  at::BFloat16* dst = out.data_ptr<at::BFloat16>();
  at::parallel_for(0, T, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t nvalid = std::min<int64_t>(kRows, n - t * kRows);
      for (int64_t b = 0; b < nb; ++b) {
        const uint8_t* r = src + (t * nb + b) * rec;
        at::BFloat16* o = dst + t * kRows * K + b * kBlock;
        if (bits == 4)
          dequant_record<4>(r, o, K, nvalid);
        else
          dequant_record<8>(r, o, K, nvalid);
      }
    }
  });
  return out;
#endif
}

at::Tensor quant_linear(const at::Tensor& x, const at::Tensor& packed, int64_t n, int64_t bits) {
#ifndef TOKENMILL_HAS_VNNI
  TORCH_CHECK(false, "tokenmill_cpu_quant was built without AVX512-VNNI");
#else
  TORCH_CHECK(x.device().is_cpu() && packed.device().is_cpu(), "quant_linear: CPU tensors only");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "quant_linear: x must be contiguous [M, K]");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "quant_linear: x must be float32 or bfloat16");
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.dim() == 3 && packed.is_contiguous(),
              "quant_linear: packed must be contiguous uint8 [tiles, blocks, record]");
  TORCH_CHECK(bits == 4 || bits == 8, "quant_linear: bits must be 4 or 8");
  const int64_t M = x.size(0), K = x.size(1), T = packed.size(0), nb = packed.size(1);
  const int64_t rec = kRows * kBlock * bits / 8 + 2 * kRows * 2;
  TORCH_CHECK(K % kBlock == 0 && nb == K / kBlock, "quant_linear: K = ", K,
              " does not match the packed weight's ", nb, " blocks of 32");
  TORCH_CHECK(packed.size(2) == rec, "quant_linear: record size ", packed.size(2), " != ", rec);
  TORCH_CHECK(n > (T - 1) * kRows && n <= T * kRows, "quant_linear: n = ", n, " does not fit ",
              T, " tiles");
  auto y = at::empty({M, n}, x.options());  // written in x's dtype by the tile kernel
  if (M == 0) return y;
  // Per-call scratch for the quantized activations, kept by the calling thread: at decode a
  // call is ~20-60 us, and three allocations were a tenth of it.
  thread_local std::vector<int8_t> xq;
  thread_local std::vector<float> dx, sx;
  xq.resize(M * K);
  dx.resize(M * nb);
  sx.resize(M * nb);
  const uint8_t* w = packed.data_ptr<uint8_t>();
  if (x.scalar_type() == at::kFloat) {
    quantize_activations(x.data_ptr<float>(), M, K, xq.data(), dx.data(), sx.data());
    (bits == 4 ? run_tiles<4, float> : run_tiles<8, float>)(
        w, T, nb, n, xq.data(), dx.data(), sx.data(), M, K, y.data_ptr<float>());
  } else {
    quantize_activations(x.data_ptr<at::BFloat16>(), M, K, xq.data(), dx.data(), sx.data());
    (bits == 4 ? run_tiles<4, at::BFloat16> : run_tiles<8, at::BFloat16>)(
        w, T, nb, n, xq.data(), dx.data(), sx.data(), M, K, y.data_ptr<at::BFloat16>());
  }
  return y;
#endif
}

}  // namespace

TORCH_LIBRARY(tokenmill_cpu_quant, m) {
  m.def("quant_linear(Tensor x, Tensor packed, int n, int bits) -> Tensor");
  m.def("dequantize_packed(Tensor packed, int n, int bits) -> Tensor");
}

TORCH_LIBRARY_IMPL(tokenmill_cpu_quant, CPU, m) {
  m.impl("quant_linear", &quant_linear);
  m.impl("dequantize_packed", &dequantize_packed);
}
