// SqueezeLLM lookup-table linear for CPU (tokenmill_cpu_lut): y = x W^T with
// W[r, k] = lut[r, code[r, k]] + S[r, k], S a CSR matrix of outliers.
//
// lut_linear(x [M, K] float32/bfloat16, codes uint8 [R, ceil(K/2)], lut float32 [R, 16],
//            crow int32 [R + 1], col int32 [nnz], val float32 [nnz]) -> y [M, R] (x's dtype)
// lut_dequantize(codes, lut, crow, col, val, K) -> the bfloat16 weight [R, K] (large batches)
//
// codes: two 4-bit indices per byte, element 2j in the low nibble and 2j + 1 in the high one;
// each row starts on a byte. A row's 16-entry table fits one zmm: 16 codes are widened to int32
// lanes and looked up with one vpermps (which reads only the low 4 bits of each lane, so the high
// nibble needs no mask), then multiplied with x in float32. The decoded weights of a 16-wide
// chunk are reused across up to 4 rows of x. Each output element is computed by one thread in a
// fixed order (two accumulators over alternate chunks, the masked tail chunk, then the sparse
// entries in CSR order), every multiply-add an explicit fused one, that depends on K only: a
// row's result is bit-identical whatever else is in the batch and however many rows share a
// pass (see row_dot).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define TOKENMILL_LUT_AVX512 1
#include <immintrin.h>
#else
#define TOKENMILL_LUT_AVX512 0
#endif

namespace {

constexpr int kMR = 4;  // rows of x per pass over a weight row

inline int code_at(const uint8_t* row, int64_t k) { return (row[k >> 1] >> ((k & 1) * 4)) & 0xF; }

#if TOKENMILL_LUT_AVX512
// The weights of 16 codes held in the low 8 bytes of b.
inline __m512 decode16_bytes(__m128i b, __m512 table, __m512i shifts) {
  const __m512i v = _mm512_cvtepu8_epi32(_mm_unpacklo_epi8(b, b));  // b0 b0 b1 b1 ...
  return _mm512_permutexvar_ps(_mm512_srlv_epi32(v, shifts), table);
}

inline __m512 decode16(const uint8_t* p, __m512 table, __m512i shifts) {
  return decode16_bytes(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)), table, shifts);
}
#endif

// Scalar multiply-add in one rounding where the hardware has it. Written out, never left to the
// compiler: the build has -ffp-contract=off, so `a * b + c` would round twice.
inline float madd(float a, float b, float c) {
#if defined(__FMA__)
  return std::fma(a, b, c);
#else
  return a * b + c;
#endif
}

// out[i * ldy] = sum_k W[row, k] x[i, k] for the MR rows of x starting at x.
//
// Row i's arithmetic is the same sequence of operations for every MR (MR only says how many
// rows share the decoded weights), so a row's result cannot depend on how many rows share the
// call: 16-wide chunks go alternately into two accumulators by explicit fused multiply-adds
// (the last, partial chunk masked, into the accumulator whose turn it is), one fixed horizontal
// sum, then the sparse entries in CSR order by scalar fused multiply-adds.
template <int MR>
inline void row_dot(const uint8_t* codes, const float* lut, int64_t K, const float* x,
                    const int32_t* col, const float* val, int32_t j0, int32_t j1, float* out,
                    int64_t ldy) {
  float sum[MR];
#if TOKENMILL_LUT_AVX512
  const __m512 table = _mm512_loadu_ps(lut);
  const __m512i shifts = _mm512_set_epi32(4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0);
  __m512 acc0[MR], acc1[MR];
  for (int i = 0; i < MR; ++i) acc0[i] = acc1[i] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    const __m512 w0 = decode16(codes + k / 2, table, shifts);
    const __m512 w1 = decode16(codes + k / 2 + 8, table, shifts);
    for (int i = 0; i < MR; ++i) {
      acc0[i] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + i * K + k), acc0[i]);
      acc1[i] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + i * K + k + 16), acc1[i]);
    }
  }
  if (k + 16 <= K) {
    const __m512 w0 = decode16(codes + k / 2, table, shifts);
    for (int i = 0; i < MR; ++i)
      acc0[i] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + i * K + k), acc0[i]);
    k += 16;
  }
  if (k < K) {  // the last 1..15 columns; lanes past K leave the accumulator as it is
    const int64_t rest = K - k;
    const __mmask16 mask = static_cast<__mmask16>((1u << rest) - 1);
    // masked: the codes row may end here (the next byte can be past the tensor)
    const __m128i b = _mm_maskz_loadu_epi8(static_cast<__mmask16>((1u << ((rest + 1) / 2)) - 1),
                                           codes + k / 2);
    const __m512 w = decode16_bytes(b, table, shifts);
    auto last_chunk = [&](__m512(&acc)[MR]) {
      for (int i = 0; i < MR; ++i)
        acc[i] = _mm512_mask3_fmadd_ps(w, _mm512_maskz_loadu_ps(mask, x + i * K + k), acc[i], mask);
    };
    if (k % 32 == 0)  // the accumulator whose turn it is (named, so both stay in registers)
      last_chunk(acc0);
    else
      last_chunk(acc1);
  }
  for (int i = 0; i < MR; ++i) sum[i] = _mm512_reduce_add_ps(_mm512_add_ps(acc0[i], acc1[i]));
#else
  for (int i = 0; i < MR; ++i) sum[i] = 0.0f;
  for (int64_t k = 0; k < K; ++k) {
    const float w = lut[code_at(codes, k)];
    for (int i = 0; i < MR; ++i) sum[i] = madd(w, x[i * K + k], sum[i]);
  }
#endif
  for (int32_t j = j0; j < j1; ++j)  // the row's sparse outliers, in CSR order
    for (int i = 0; i < MR; ++i) sum[i] = madd(val[j], x[i * K + col[j]], sum[i]);
  for (int i = 0; i < MR; ++i) out[i * ldy] = sum[i];
}

void check_weight(const at::Tensor& codes, const at::Tensor& lut, const at::Tensor& crow,
                  const at::Tensor& col, const at::Tensor& val, int64_t K) {
  const int64_t R = codes.size(0);
  TORCH_CHECK(codes.device().is_cpu(), "lut_linear: CPU tensors only");
  TORCH_CHECK(codes.scalar_type() == at::kByte && codes.dim() == 2 && codes.is_contiguous() &&
                  codes.size(1) == (K + 1) / 2,
              "lut_linear: codes must be contiguous uint8 [R, ceil(K/2)] for K = ", K);
  TORCH_CHECK(lut.scalar_type() == at::kFloat && lut.is_contiguous() && lut.dim() == 2 &&
                  lut.size(0) == R && lut.size(1) == 16,
              "lut_linear: lut must be contiguous float32 [R, 16]");
  TORCH_CHECK(crow.scalar_type() == at::kInt && col.scalar_type() == at::kInt &&
                  val.scalar_type() == at::kFloat && crow.numel() == R + 1 &&
                  col.numel() == val.numel() && crow.is_contiguous() && col.is_contiguous() &&
                  val.is_contiguous(),
              "lut_linear: sparse part must be int32 crow [R + 1], int32 col, float32 val");
  // validated here, not inside the parallel loops: they index x and the output with these
  const int32_t* rp = crow.data_ptr<int32_t>();
  const int32_t* ci = col.data_ptr<int32_t>();
  TORCH_CHECK(rp[0] == 0 && rp[R] == col.numel(), "lut_linear: crow does not span col");
  for (int64_t r = 0; r < R; ++r)
    TORCH_CHECK(rp[r] <= rp[r + 1], "lut_linear: crow must be non-decreasing");
  for (int64_t j = 0; j < col.numel(); ++j)
    TORCH_CHECK(ci[j] >= 0 && ci[j] < K, "lut_linear: sparse column ", ci[j], " out of range");
}

// The dense bfloat16 weight [R, K] (for large batches, where a bf16 matmul on it beats the
// lookup kernel): float32 lut[code] plus the sparse value, rounded to nearest even, bit-exact
// with SqueezeLLMWeights.dequantize().bfloat16().
at::Tensor lut_dequantize(const at::Tensor& codes, const at::Tensor& lut, const at::Tensor& crow,
                          const at::Tensor& col, const at::Tensor& val, int64_t K) {
  check_weight(codes, lut, crow, col, val, K);
  const int64_t R = codes.size(0);
  auto out = at::empty({R, K}, lut.options().dtype(at::kBFloat16));
  const uint8_t* cp = codes.data_ptr<uint8_t>();
  const float* lp = lut.data_ptr<float>();
  const int32_t* rp = crow.data_ptr<int32_t>();
  const int32_t* ci = col.data_ptr<int32_t>();
  const float* vp = val.data_ptr<float>();
  at::BFloat16* op = out.data_ptr<at::BFloat16>();
  const int64_t cstride = codes.size(1);
  at::parallel_for(0, R, 16, [&](int64_t r0, int64_t r1) {
    std::vector<float> row(K);
    for (int64_t r = r0; r < r1; ++r) {
      const uint8_t* cr = cp + r * cstride;
      int64_t k0 = 0;
#if TOKENMILL_LUT_AVX512
      const __m512 table = _mm512_loadu_ps(lp + r * 16);
      const __m512i shifts = _mm512_set_epi32(4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0);
      for (; k0 + 16 <= K; k0 += 16) _mm512_storeu_ps(row.data() + k0, decode16(cr + k0 / 2, table, shifts));
#endif
      for (; k0 < K; ++k0) row[k0] = lp[r * 16 + code_at(cr, k0)];
      for (int32_t j = rp[r]; j < rp[r + 1]; ++j) row[ci[j]] += vp[j];
      at::BFloat16* o = op + r * K;
      int64_t k = 0;
#if TOKENMILL_LUT_AVX512
      for (; k + 16 <= K; k += 16) {  // float32 -> bfloat16, round to nearest even
        const __m512i bits = _mm512_castps_si512(_mm512_loadu_ps(row.data() + k));
        const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
        const __m512i rnd = _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + k),
                            _mm512_cvtepi32_epi16(_mm512_srli_epi32(rnd, 16)));
      }
#endif
      for (; k < K; ++k) o[k] = at::BFloat16(row[k]);
    }
  });
  return out;
}

at::Tensor lut_linear(const at::Tensor& x_in, const at::Tensor& codes, const at::Tensor& lut,
                      const at::Tensor& crow, const at::Tensor& col, const at::Tensor& val) {
  TORCH_CHECK(x_in.device().is_cpu() && codes.device().is_cpu(), "lut_linear: CPU tensors only");
  TORCH_CHECK(x_in.dim() == 2, "lut_linear: x must be [M, K]");
  TORCH_CHECK(x_in.scalar_type() == at::kFloat || x_in.scalar_type() == at::kBFloat16,
              "lut_linear: x must be float32 or bfloat16");
  const int64_t M = x_in.size(0), K = x_in.size(1), R = codes.size(0);
  check_weight(codes, lut, crow, col, val, K);
  // bf16 activations are widened once here rather than once per output row
  const at::Tensor x = x_in.to(at::kFloat).contiguous();
  auto y = at::empty({M, R}, x.options());
  if (M > 0 && R > 0) {
    const uint8_t* cp = codes.data_ptr<uint8_t>();
    const float* lp = lut.data_ptr<float>();
    const int32_t* rp = crow.data_ptr<int32_t>();
    const int32_t* ci = col.data_ptr<int32_t>();
    const float* vp = val.data_ptr<float>();
    const float* xp = x.data_ptr<float>();
    float* yp = y.data_ptr<float>();
    const int64_t cstride = codes.size(1);
    const int64_t grain = std::max<int64_t>(1, R / (4 * at::get_num_threads()));
    at::parallel_for(0, R, grain, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const uint8_t* cr = cp + r * cstride;
        const float* lr = lp + r * 16;
        int64_t m = 0;
        for (; m + kMR <= M; m += kMR)
          row_dot<kMR>(cr, lr, K, xp + m * K, ci, vp, rp[r], rp[r + 1], yp + m * R + r, R);
        for (; m < M; ++m)
          row_dot<1>(cr, lr, K, xp + m * K, ci, vp, rp[r], rp[r + 1], yp + m * R + r, R);
      }
    });
  }
  return x_in.scalar_type() == at::kFloat ? y : y.to(x_in.scalar_type());
}

}  // namespace

TORCH_LIBRARY(tokenmill_cpu_lut, m) {
  m.def("lut_linear(Tensor x, Tensor codes, Tensor lut, Tensor crow, Tensor col, Tensor val) -> Tensor");
  m.def("lut_dequantize(Tensor codes, Tensor lut, Tensor crow, Tensor col, Tensor val, int K) -> Tensor");
}

TORCH_LIBRARY_IMPL(tokenmill_cpu_lut, CPU, m) {
  m.impl("lut_linear", &lut_linear);
  m.impl("lut_dequantize", &lut_dequantize);
}
