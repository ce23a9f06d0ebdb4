// Row-independent dense linear for CPU (tokenmill_cpu_dense): y = x W^T (+ b) for bfloat16 or
// float32 weights, each output element accumulated in one fixed order over K whatever the
// number of rows, so that a row's result never depends on the batch it is in.
//
// pack_dense(w [N, K]) -> packed: output columns in tiles of 16;
//   bfloat16: [T, K2, 16, 2] (K2 = ceil(K / 2)): vector p of tile t holds, for its 16 columns,
//             the pair k = 2p, 2p + 1 (vdpbf16ps's layout); an odd K gets a zero last weight.
//   float32:  [T, K, 16].
//   Columns past N are zero.
// dense_linear(x [M, K], packed, bias?, n) -> y [M, n] in x's dtype (x's dtype = the weight's).
//
// Each output element is one accumulator, zeroed, then updated with one instruction per pair
// (vdpbf16ps) or per k (vfmadd231ps) in ascending k, then the bias added, then rounded to x's
// dtype (round to nearest even). Register blocks of kMR rows x kNT tiles only decide how many
// elements are in flight at once, and the thread split only which elements a thread takes:
// neither changes an element's instruction sequence, so every row is the same alone or in a
// batch of any size, on any number of threads.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string>

#if defined(__AVX512F__) && defined(__AVX512BW__)
#define TOKENMILL_HAS_AVX512 1
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kCols = 16;  // output columns per tile: one zmm of float32 accumulators
constexpr int kMR = 4;         // rows per register block
constexpr int kNT = 4;         // tiles per register block (kMR x kNT = 16 accumulators)
constexpr int64_t kRowChunk = 64;  // rows per parallel work item (a chunk's x stays in cache)

#ifdef TOKENMILL_HAS_AVX512

inline void store16(float* p, __mmask16 mask, __m512 v) { _mm512_mask_storeu_ps(p, mask, v); }
inline void store16(at::BFloat16* p, __mmask16 mask, __m512 v) {
  // round to nearest even, as Tensor.to(torch.bfloat16) does (NaN aside)
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m256i h = _mm512_cvtepi32_epi16(_mm512_srli_epi32(
      _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16));
  _mm256_mask_storeu_epi16(p, mask, h);
}

inline __m512 load_bias16(const float* b, __mmask16 mask) { return _mm512_maskz_loadu_ps(mask, b); }
inline __m512 load_bias16(const at::BFloat16* b, __mmask16 mask) {
  const __m256i h = _mm256_maskz_loadu_epi16(mask, b);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// The update of one accumulator by step s (a pair of k for bfloat16, one k for float32).
template <typename T>
struct Step;

#ifdef __AVX512BF16__
template <>
struct Step<at::BFloat16> {
  static constexpr int64_t kPer = 2;  // k per step
  // The pair (x[2s], x[2s + 1]) broadcast; the last pair of an odd K has a zero second half.
  static inline __m512i bcast(const at::BFloat16* x, int64_t s, int64_t K) {
    uint32_t pair = 0;
    if (2 * s + 1 < K)
      std::memcpy(&pair, x + 2 * s, 4);
    else
      std::memcpy(&pair, x + 2 * s, 2);
    return _mm512_set1_epi32(static_cast<int32_t>(pair));
  }
  static inline __m512 update(__m512 acc, const void* w, __m512i xb) {
    const __m512i wv = _mm512_loadu_si512(w);
    return _mm512_dpbf16_ps(acc, reinterpret_cast<__m512bh>(wv), reinterpret_cast<__m512bh>(xb));
  }
};
#endif

template <>
struct Step<float> {
  static constexpr int64_t kPer = 1;
  static inline __m512i bcast(const float* x, int64_t s, int64_t) {
    return _mm512_castps_si512(_mm512_set1_ps(x[s]));
  }
  static inline __m512 update(__m512 acc, const void* w, __m512i xb) {
    return _mm512_fmadd_ps(_mm512_loadu_ps(static_cast<const float*>(w)), _mm512_castsi512_ps(xb),
                           acc);
  }
};

// MR rows x NT tiles starting at tile t0: y[i, 16 t + c] for i < MR, t0 <= t < t0 + NT.
template <typename T, int MR, int NT>
inline void block_kernel(const T* x, int64_t K, const T* w, int64_t steps, int64_t t0,
                         const T* bias, int64_t n, T* y) {
  constexpr int64_t kStepElems = kCols * Step<T>::kPer;  // weights per (tile, step)
  const T* wt[NT];
  for (int j = 0; j < NT; ++j) wt[j] = w + (t0 + j) * steps * kStepElems;
  __m512 acc[MR][NT];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NT; ++j) acc[i][j] = _mm512_setzero_ps();
  for (int64_t s = 0; s < steps; ++s) {
    __m512i xb[MR];
    for (int i = 0; i < MR; ++i) xb[i] = Step<T>::bcast(x + i * K, s, K);
    for (int j = 0; j < NT; ++j) {
      const T* ws = wt[j] + s * kStepElems;
      for (int i = 0; i < MR; ++i) acc[i][j] = Step<T>::update(acc[i][j], ws, xb[i]);
    }
  }
  for (int j = 0; j < NT; ++j) {
    const int64_t col = (t0 + j) * kCols;
    const int64_t valid = std::min<int64_t>(kCols, n - col);
    const __mmask16 mask = valid >= kCols ? 0xFFFF : static_cast<__mmask16>((1u << valid) - 1);
    const __m512 b = bias != nullptr ? load_bias16(bias + col, mask) : _mm512_setzero_ps();
    for (int i = 0; i < MR; ++i) {
      const __m512 v = bias != nullptr ? _mm512_add_ps(acc[i][j], b) : acc[i][j];
      store16(y + i * n + col, mask, v);
    }
  }
}

template <typename T, int MR>
inline void rows_kernel(const T* x, int64_t K, const T* w, int64_t steps, int64_t t0, int64_t t1,
                        const T* bias, int64_t n, T* y) {
  int64_t t = t0;
  for (; t + kNT <= t1; t += kNT) block_kernel<T, MR, kNT>(x, K, w, steps, t, bias, n, y);
  switch (t1 - t) {
    case 1: block_kernel<T, MR, 1>(x, K, w, steps, t, bias, n, y); break;
    case 2: block_kernel<T, MR, 2>(x, K, w, steps, t, bias, n, y); break;
    case 3: block_kernel<T, MR, 3>(x, K, w, steps, t, bias, n, y); break;
    default: break;
  }
}

template <typename T>
void run(const T* x, int64_t M, int64_t K, const T* w, int64_t T_, const T* bias, int64_t n,
         T* y) {
  const int64_t steps = (K + Step<T>::kPer - 1) / Step<T>::kPer;
  // Work items: (chunk of rows, group of tiles). Groups of 2 * kNT tiles: enough items for the
  // threads at one row, few enough that each keeps a weight panel in cache across its rows.
  constexpr int64_t kGroup = 2 * kNT;
  const int64_t groups = (T_ + kGroup - 1) / kGroup;
  const int64_t chunks = (M + kRowChunk - 1) / kRowChunk;
  at::parallel_for(0, chunks * groups, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t item = i0; item < i1; ++item) {
      const int64_t c = item / groups, g = item % groups;
      const int64_t t0 = g * kGroup, t1 = std::min(T_, t0 + kGroup);
      const int64_t m1 = std::min(M, (c + 1) * kRowChunk);
      for (int64_t m = c * kRowChunk; m < m1; m += kMR) {
        const T* xm = x + m * K;
        T* ym = y + m * n;
        switch (std::min<int64_t>(kMR, m1 - m)) {
          case 1: rows_kernel<T, 1>(xm, K, w, steps, t0, t1, bias, n, ym); break;
          case 2: rows_kernel<T, 2>(xm, K, w, steps, t0, t1, bias, n, ym); break;
          case 3: rows_kernel<T, 3>(xm, K, w, steps, t0, t1, bias, n, ym); break;
          default: rows_kernel<T, kMR>(xm, K, w, steps, t0, t1, bias, n, ym); break;
        }
      }
    }
  });
}

#endif  // TOKENMILL_HAS_AVX512

bool supports(at::ScalarType dtype) {
#ifndef TOKENMILL_HAS_AVX512
  return false;
#else
  if (dtype == at::kFloat) return true;
#ifdef __AVX512BF16__
  return dtype == at::kBFloat16;
#else
  return false;
#endif
#endif
}

// Whether this build has the kernel for weights of `dtype` (a ScalarType's name).
bool dense_supports(const std::string& dtype) {
  if (dtype == "float32") return supports(at::kFloat);
  if (dtype == "bfloat16") return supports(at::kBFloat16);
  return false;
}

at::Tensor pack_dense(const at::Tensor& w) {
  TORCH_CHECK(w.dim() == 2 && w.device().is_cpu(), "pack_dense: w must be a CPU [N, K]");
  TORCH_CHECK(supports(w.scalar_type()), "pack_dense: no kernel for ", w.scalar_type());
  const int64_t N = w.size(0), K = w.size(1), T = (N + kCols - 1) / kCols;
  const int64_t per = w.scalar_type() == at::kBFloat16 ? 2 : 1, steps = (K + per - 1) / per;
  auto padded = at::zeros({T * kCols, steps * per}, w.options());
  padded.narrow(0, 0, N).narrow(1, 0, K).copy_(w);
  // [T, 16, steps, per] -> [T, steps, 16, per]
  return padded.view({T, kCols, steps, per}).permute({0, 2, 1, 3}).contiguous();
}

at::Tensor dense_linear(const at::Tensor& x, const at::Tensor& packed,
                        const std::optional<at::Tensor>& bias, int64_t n) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 && x.is_contiguous(),
              "dense_linear: x must be a contiguous CPU [M, K]");
  TORCH_CHECK(packed.scalar_type() == x.scalar_type() && supports(x.scalar_type()),
              "dense_linear: x (", x.scalar_type(), ") and the packed weight (",
              packed.scalar_type(), ") must share a supported dtype");
  const int64_t M = x.size(0), K = x.size(1), T = packed.size(0);
  const int64_t per = x.scalar_type() == at::kBFloat16 ? 2 : 1;
  TORCH_CHECK(packed.dim() == 4 && packed.is_contiguous() && packed.size(1) == (K + per - 1) / per &&
                  packed.size(2) == kCols && packed.size(3) == per,
              "dense_linear: the packed weight does not match K = ", K);
  TORCH_CHECK(n > (T - 1) * kCols && n <= T * kCols, "dense_linear: n = ", n, " does not fit ",
              T, " tiles");
  if (bias.has_value())
    TORCH_CHECK(bias->scalar_type() == x.scalar_type() && bias->is_contiguous() &&
                    bias->numel() == n,
                "dense_linear: bias must be a contiguous [", n, "] of x's dtype");
  auto y = at::empty({M, n}, x.options());
  if (M == 0) return y;
#ifdef TOKENMILL_HAS_AVX512
  if (x.scalar_type() == at::kFloat) {
    run<float>(x.data_ptr<float>(), M, K, packed.data_ptr<float>(), T,
               bias.has_value() ? bias->data_ptr<float>() : nullptr, n, y.data_ptr<float>());
  } else {
#ifdef __AVX512BF16__
    run<at::BFloat16>(x.data_ptr<at::BFloat16>(), M, K, packed.data_ptr<at::BFloat16>(), T,
                      bias.has_value() ? bias->data_ptr<at::BFloat16>() : nullptr, n,
                      y.data_ptr<at::BFloat16>());
#endif
  }
#endif
  return y;
}

}  // namespace

TORCH_LIBRARY(tokenmill_cpu_dense, m) {
  m.def("dense_supports(str dtype) -> bool", &dense_supports);
  m.def("pack_dense(Tensor w) -> Tensor");
  m.def("dense_linear(Tensor x, Tensor packed, Tensor? bias, int n) -> Tensor");
}

TORCH_LIBRARY_IMPL(tokenmill_cpu_dense, CPU, m) {
  m.impl("pack_dense", &pack_dense);
  m.impl("dense_linear", &dense_linear);
}
