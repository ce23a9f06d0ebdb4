// Fused elementwise ops of the decoder layer for CPU, bfloat16 (tokenmill_cpu_fused).
//
// At decode the layer's matmuls are a few tens of microseconds each, and the dozen small aten
// ops around them (residual add, RMSNorm with its casts, RoPE's slices and concatenations, the
// KV-cache writes, SwiGLU) cost as much again in dispatch. These ops do each group in one call:
//
//   add_rms_norm(x [T, N], residual [T, N]?, weight [N], eps) -> (out, x + residual)
//   rope_cache(qkv [T, (H + 2 H_kv) D], positions [T], cos, sin [P, D], k_cache, v_cache
//              [blocks, block_size, H_kv, D], slot_mapping [T], H, H_kv) -> q [T, H, D]
//   silu_mul(gate_up [T, 2 I]) -> silu(gate) * up [T, I]
//   gelu_tanh_mul(gate_up [T, 2 I]) -> gelu_tanh(gate) * up [T, I]
//   decode_layer(...) -> (out, residual): a whole decoder layer for a batch of decode rows
//     whose matmuls are quantized (tokenmill_cpu_quant::quant_linear) and whose attention is
//     tokenmill_cpu_attn::paged_decode_attention, called through the dispatcher: the same
//     kernels in the same order as models/llama.py (or models/gemma.py), without a trip
//     through Python per op. Options: Qwen3's and Gemma 3's RMSNorm per head on q and k before
//     RoPE, a sliding window, Gemma 2's attention-logit soft-cap, Gemma's norms after the
//     attention and the MLP (pre_ff_norm / post_ff_norm), GeGLU instead of SwiGLU.
//
// Each rounds to bfloat16 exactly where the PyTorch code of layers/norm.py, layers/rotary.py
// and models/llama.py does (after every elementwise op; RMSNorm in float32, rounded, then times
// the weight; a float32 norm weight, Gemma's 1 + w, multiplies in float32 before the one
// rounding, as models/gemma.py does), so a row's values match that code's, and every row is
// computed on its own in a fixed order (batch invariance). Built with -ffp-contract=off: a
// fused multiply-add would round once where PyTorch rounds twice.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/add.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <optional>
#include <cstdint>
#include <tuple>

#if defined(__AVX512F__) && defined(__AVX512BW__)
#define TOKENMILL_HAS_AVX512 1
#include <immintrin.h>
#endif

namespace {

using bf16 = at::BFloat16;
// Rows per parallel task: small batches stay on the calling thread (a fork costs more than
// the work).
constexpr int64_t kRowGrain = 16;

#ifdef TOKENMILL_HAS_AVX512

inline __mmask16 tail_mask(int64_t n) {
  return n >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << n) - 1);
}

inline __m512 load_bf16(const bf16* p, __mmask16 m) {
  const __m256i h = _mm256_maskz_loadu_epi16(m, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// float32 -> bfloat16, round to nearest even, NaN kept NaN (as c10::BFloat16 does).
inline void store_bf16(bf16* p, __m512 v, __mmask16 m) {
#ifdef __AVX512BF16__
  const __m256i h = reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v));
#else
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  r = _mm512_mask_mov_epi32(r, nan, _mm512_set1_epi32(0x7FC0));
  const __m256i h = _mm512_cvtepi32_epi16(r);
#endif
  _mm256_mask_storeu_epi16(p, m, h);
}

inline __m512 round_bf16(__m512 v) {  // the float value of bf16(v)
  alignas(64) bf16 tmp[16];
  store_bf16(tmp, v, 0xFFFF);
  return load_bf16(tmp, 0xFFFF);
}

// exp(x) to ~1 ulp: x = n ln2 + r, |r| <= ln2 / 2, exp(r) by a degree-6 polynomial, times 2^n.
inline __m512 exp512(__m512 x) {
  x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.7f)), _mm512_set1_ps(-103.9f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_sub_ps(x, _mm512_mul_ps(n, _mm512_set1_ps(0.693359375f)));
  r = _mm512_sub_ps(r, _mm512_mul_ps(n, _mm512_set1_ps(-2.12194440e-4f)));
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}

// The weight's dtype decides where the norm rounds, as PyTorch's type promotion does there:
// bfloat16 (HF's Llama casts the normalized row to bf16, then multiplies by the bf16 weight) or
// float32 (Gemma's 1 + w, multiplied in fp32 and rounded once).
inline __m512 scale_normed(__m512 normed, const bf16* w, __mmask16 m) {
  return _mm512_mul_ps(round_bf16(normed), load_bf16(w, m));
}
inline __m512 scale_normed(__m512 normed, const float* w, __mmask16 m) {
  return _mm512_mul_ps(normed, _mm512_maskz_loadu_ps(m, w));
}

template <typename W>
void add_rms_norm_row(const bf16* x, const bf16* res, const W* w, bf16* out, bf16* sum,
                      int64_t n, float eps) {
  __m512 ss = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = tail_mask(n - i);
    __m512 v = load_bf16(x + i, m);
    if (res != nullptr) {
      v = round_bf16(_mm512_add_ps(v, load_bf16(res + i, m)));
      store_bf16(sum + i, v, m);
    }
    ss = _mm512_add_ps(ss, _mm512_mul_ps(v, v));
  }
  const float inv = 1.0f / std::sqrt(_mm512_reduce_add_ps(ss) / static_cast<float>(n) + eps);
  const bf16* src = res != nullptr ? sum : x;
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = tail_mask(n - i);
    const __m512 normed = _mm512_mul_ps(load_bf16(src + i, m), _mm512_set1_ps(inv));
    store_bf16(out + i, scale_normed(normed, w + i, m), m);
  }
}

// One head: out = x * cos + rotate_half(x) * sin, each product and the sum rounded to bf16.
inline void rope_head(const bf16* x, const bf16* cos, const bf16* sin, bf16* out, int64_t d) {
  const int64_t half = d / 2;
  for (int64_t i = 0; i < d; i += 16) {
    const __mmask16 m = tail_mask(std::min<int64_t>(16, (i < half ? half : d) - i));
    const __m512 v = load_bf16(x + i, m);
    const __m512 rot = i < half ? _mm512_sub_ps(_mm512_setzero_ps(), load_bf16(x + i + half, m))
                                : load_bf16(x + i - half, m);
    const __m512 a = round_bf16(_mm512_mul_ps(v, load_bf16(cos + i, m)));
    const __m512 b = round_bf16(_mm512_mul_ps(rot, load_bf16(sin + i, m)));
    store_bf16(out + i, _mm512_add_ps(a, b), m);
    if (i < half && i + 16 > half) i = half - 16;  // restart the loop at the second half
  }
}

void silu_mul_row(const bf16* gu, bf16* out, int64_t inter) {
  for (int64_t i = 0; i < inter; i += 16) {
    const __mmask16 m = tail_mask(inter - i);
    const __m512 g = load_bf16(gu + i, m);
    const __m512 e = exp512(_mm512_sub_ps(_mm512_setzero_ps(), g));
    const __m512 s = round_bf16(_mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.0f), e)));
    store_bf16(out + i, _mm512_mul_ps(s, load_bf16(gu + inter + i, m)), m);
  }
}

// PyTorch's gelu(approximate="tanh") in fp32, 0.5 x (1 + tanh(inner)) with inner =
// sqrt(2 / pi) (x + 0.044715 x^3), rounded to bf16, times up. 1 + tanh(u) is 2 / (1 + e^-2u),
// accurate for any u; going through t = that - 1 rounds t to fp32 as a tanh result is, so that
// 1 + t takes the steps PyTorch's does where tanh is close to -1, and like PyTorch's vectorized
// tanh (SLEEF) t is -1 below -8.664339742 (gelu 0 there, not a few 1e-7).
void gelu_tanh_mul_row(const bf16* gu, bf16* out, int64_t inter) {
  const __m512 beta = _mm512_set1_ps(static_cast<float>(M_SQRT2 * M_2_SQRTPI * 0.5));
  const __m512 kappa = _mm512_set1_ps(0.044715f), one = _mm512_set1_ps(1.0f);
  for (int64_t i = 0; i < inter; i += 16) {
    const __mmask16 m = tail_mask(inter - i);
    const __m512 g = load_bf16(gu + i, m);
    const __m512 cube = _mm512_mul_ps(_mm512_mul_ps(g, g), g);
    const __m512 inner = _mm512_mul_ps(beta, _mm512_add_ps(g, _mm512_mul_ps(kappa, cube)));
    const __m512 e = exp512(_mm512_mul_ps(inner, _mm512_set1_ps(-2.0f)));
    __m512 t = _mm512_sub_ps(_mm512_div_ps(_mm512_set1_ps(2.0f), _mm512_add_ps(one, e)), one);
    t = _mm512_mask_mov_ps(
        t, _mm512_cmp_ps_mask(inner, _mm512_set1_ps(-8.664339742f), _CMP_LT_OQ), _mm512_set1_ps(-1.0f));
    const __m512 gelu = _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(0.5f), g), _mm512_add_ps(one, t));
    store_bf16(out + i, _mm512_mul_ps(round_bf16(gelu), load_bf16(gu + inter + i, m)), m);
  }
}

#endif  // TOKENMILL_HAS_AVX512

void check_bf16_rows(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kBFloat16 && t.dim() == 2 &&
                  t.is_contiguous(),
              op, ": ", name, " must be a contiguous 2-D bfloat16 CPU tensor");
}

// A norm weight: bfloat16 or float32 (which one decides the rounding, see scale_normed).
void check_norm_weight(const at::Tensor& w, int64_t n, const char* op, const char* name) {
  TORCH_CHECK((w.scalar_type() == at::kBFloat16 || w.scalar_type() == at::kFloat) &&
                  w.device().is_cpu() && w.dim() == 1 && w.numel() == n && w.is_contiguous(),
              op, ": ", name, " must be a contiguous bfloat16 or float32 [", n, "] CPU tensor");
}

std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x,
                                                const std::optional<at::Tensor>& residual,
                                                const at::Tensor& weight, double eps) {
#ifndef TOKENMILL_HAS_AVX512
  TORCH_CHECK(false, "tokenmill_cpu_fused was built without AVX-512");
#else
  check_bf16_rows(x, "add_rms_norm", "x");
  const int64_t T = x.size(0), N = x.size(1);
  check_norm_weight(weight, N, "add_rms_norm", "weight");
  const bf16* res = nullptr;
  at::Tensor sum = x;
  if (residual.has_value()) {
    check_bf16_rows(*residual, "add_rms_norm", "residual");
    TORCH_CHECK(residual->sizes() == x.sizes(), "add_rms_norm: residual shape ",
                residual->sizes(), " != x shape ", x.sizes());
    res = residual->data_ptr<bf16>();
    sum = at::empty_like(x);
  }
  auto out = at::empty_like(x);
  const bf16* xp = x.data_ptr<bf16>();
  bf16* op = out.data_ptr<bf16>();
  bf16* sp = sum.data_ptr<bf16>();
  auto rows = [&](auto* wp) {
    at::parallel_for(0, T, kRowGrain, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t)
        add_rms_norm_row(xp + t * N, res ? res + t * N : nullptr, wp, op + t * N, sp + t * N, N,
                         static_cast<float>(eps));
    });
  };
  if (weight.scalar_type() == at::kFloat)
    rows(weight.data_ptr<float>());
  else
    rows(weight.data_ptr<bf16>());
  return {out, sum};
#endif
}

at::Tensor rope_cache(const at::Tensor& qkv, const at::Tensor& positions, const at::Tensor& cos,
                      const at::Tensor& sin, at::Tensor& k_cache, at::Tensor& v_cache,
                      const at::Tensor& slot_mapping, int64_t num_heads, int64_t num_kv_heads) {
#ifndef TOKENMILL_HAS_AVX512
  TORCH_CHECK(false, "tokenmill_cpu_fused was built without AVX-512");
#else
  check_bf16_rows(qkv, "rope_cache", "qkv");
  check_bf16_rows(cos, "rope_cache", "cos");
  check_bf16_rows(sin, "rope_cache", "sin");
  const int64_t T = qkv.size(0), D = cos.size(1), P = cos.size(0);
  TORCH_CHECK(D % 2 == 0 && sin.sizes() == cos.sizes(), "rope_cache: bad cos/sin tables");
  TORCH_CHECK(qkv.size(1) == (num_heads + 2 * num_kv_heads) * D, "rope_cache: qkv width ",
              qkv.size(1), " != (", num_heads, " + 2 * ", num_kv_heads, ") * ", D);
  for (const at::Tensor* c : {&k_cache, &v_cache})
    TORCH_CHECK(c->scalar_type() == at::kBFloat16 && c->dim() == 4 && c->size(2) == num_kv_heads &&
                    c->size(3) == D && c->stride(3) == 1,
                "rope_cache: caches must be bfloat16 [blocks, block_size, ", num_kv_heads, ", ",
                D, "] with a contiguous last dim");
  for (const at::Tensor* idx : {&positions, &slot_mapping})
    TORCH_CHECK(idx->scalar_type() == at::kLong && idx->dim() == 1 && idx->numel() == T &&
                    idx->is_contiguous(),
                "rope_cache: positions and slot_mapping must be contiguous int64 [", T, "]");
  const int64_t bs = k_cache.size(1), num_slots = k_cache.size(0) * bs;
  const int64_t* pos = positions.data_ptr<int64_t>();
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t) {
    TORCH_CHECK(pos[t] >= 0 && pos[t] < P, "rope_cache: position ", pos[t], " outside [0, ", P,
                ")");
    TORCH_CHECK(slots[t] >= 0 && slots[t] < num_slots, "rope_cache: slot ", slots[t],
                " outside [0, ", num_slots, ")");
  }
  auto q = at::empty({T, num_heads, D}, qkv.options());
  const bf16* src = qkv.data_ptr<bf16>();
  const bf16* cp = cos.data_ptr<bf16>();
  const bf16* sp = sin.data_ptr<bf16>();
  bf16* qp = q.data_ptr<bf16>();
  bf16* kc = k_cache.data_ptr<bf16>();
  bf16* vc = v_cache.data_ptr<bf16>();
  const int64_t width = qkv.size(1);
  at::parallel_for(0, T, kRowGrain, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const bf16* row = src + t * width;
      const bf16* c = cp + pos[t] * D;
      const bf16* s = sp + pos[t] * D;
      for (int64_t h = 0; h < num_heads; ++h) rope_head(row + h * D, c, s, qp + (t * num_heads + h) * D, D);
      const int64_t block = slots[t] / bs, off = slots[t] % bs;
      for (int64_t h = 0; h < num_kv_heads; ++h) {
        const int64_t kofs = block * k_cache.stride(0) + off * k_cache.stride(1) + h * k_cache.stride(2);
        const int64_t vofs = block * v_cache.stride(0) + off * v_cache.stride(1) + h * v_cache.stride(2);
        rope_head(row + (num_heads + h) * D, c, s, kc + kofs, D);
        std::memcpy(vc + vofs, row + (num_heads + num_kv_heads + h) * D, D * sizeof(bf16));
      }
    }
  });
  return q;
#endif
}

// act(gate) * up of gate_up [T, 2 I] (gate first), one row at a time by `row`.
template <typename RowFn>
at::Tensor glu_mul(const at::Tensor& gate_up, RowFn row, const char* op) {
#ifndef TOKENMILL_HAS_AVX512
  TORCH_CHECK(false, "tokenmill_cpu_fused was built without AVX-512");
#else
  check_bf16_rows(gate_up, op, "gate_up");
  const int64_t T = gate_up.size(0), I = gate_up.size(1) / 2;
  TORCH_CHECK(gate_up.size(1) % 2 == 0, op, ": gate_up width must be even");
  auto out = at::empty({T, I}, gate_up.options());
  const bf16* src = gate_up.data_ptr<bf16>();
  bf16* dst = out.data_ptr<bf16>();
  at::parallel_for(0, T, kRowGrain, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) row(src + t * 2 * I, dst + t * I, I);
  });
  return out;
#endif
}

at::Tensor silu_mul(const at::Tensor& gate_up) {
#ifndef TOKENMILL_HAS_AVX512
  TORCH_CHECK(false, "tokenmill_cpu_fused was built without AVX-512");
#else
  return glu_mul(gate_up, silu_mul_row, "silu_mul");
#endif
}

at::Tensor gelu_tanh_mul(const at::Tensor& gate_up) {
#ifndef TOKENMILL_HAS_AVX512
  TORCH_CHECK(false, "tokenmill_cpu_fused was built without AVX-512");
#else
  return glu_mul(gate_up, gelu_tanh_mul_row, "gelu_tanh_mul");
#endif
}

using QuantLinearFn = at::Tensor(const at::Tensor&, const at::Tensor&, int64_t, int64_t);
using DecodeAttentionFn = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                     const at::Tensor&, const at::Tensor&, double, int64_t,
                                     double);

// y [T, n] = x W^T for a packed weight (and + bias, rounded like PyTorch's y + bias).
at::Tensor qlinear(const at::Tensor& x, const at::Tensor& packed, int64_t n, int64_t bits,
                   const std::optional<at::Tensor>& bias = std::nullopt) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("tokenmill_cpu_quant::quant_linear", "")
                             .typed<QuantLinearFn>();
  at::Tensor y = op.call(x, packed, n, bits);
  return bias.has_value() ? at::add(y, *bias) : y;
}

// In place on a fresh qkv [T, (H + 2 H_kv) D]: each q head normed with q_w [D], each k head with
// k_w [D], exactly as add_rms_norm (no residual) does per row; v untouched.
void head_rms_norm(const at::Tensor& qkv, const at::Tensor& q_w, const at::Tensor& k_w,
                   int64_t num_heads, int64_t num_kv_heads, int64_t D, double eps) {
#ifndef TOKENMILL_HAS_AVX512
  TORCH_CHECK(false, "tokenmill_cpu_fused was built without AVX-512");
#else
  check_bf16_rows(qkv, "decode_layer", "qkv");
  for (const at::Tensor* w : {&q_w, &k_w}) check_norm_weight(*w, D, "decode_layer", "q/k norm");
  TORCH_CHECK(q_w.scalar_type() == k_w.scalar_type(),
              "decode_layer: q_norm and k_norm must share a dtype");
  const int64_t T = qkv.size(0), width = qkv.size(1);
  bf16* base = qkv.data_ptr<bf16>();
  auto rows = [&](const auto* qw, const auto* kw) {
    at::parallel_for(0, T, kRowGrain, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        bf16* row = base + t * width;
        // in place: each 16-wide chunk is read before it is written
        for (int64_t h = 0; h < num_heads + num_kv_heads; ++h) {
          bf16* head = row + h * D;
          add_rms_norm_row(head, nullptr, h < num_heads ? qw : kw, head, nullptr, D,
                           static_cast<float>(eps));
        }
      }
    });
  };
  if (q_w.scalar_type() == at::kFloat)
    rows(q_w.data_ptr<float>(), k_w.data_ptr<float>());
  else
    rows(q_w.data_ptr<bf16>(), k_w.data_ptr<bf16>());
#endif
}

std::tuple<at::Tensor, at::Tensor> decode_layer(
    const at::Tensor& x, const std::optional<at::Tensor>& residual, const at::Tensor& input_norm,
    const at::Tensor& post_norm, double eps, const at::Tensor& qkv_w, int64_t qkv_bits,
    const std::optional<at::Tensor>& qkv_bias, const at::Tensor& o_w, int64_t o_bits,
    const at::Tensor& gate_up_w, int64_t gate_up_bits, const at::Tensor& down_w,
    int64_t down_bits, int64_t intermediate, const at::Tensor& cos, const at::Tensor& sin,
    const at::Tensor& positions, at::Tensor& k_cache, at::Tensor& v_cache,
    const at::Tensor& slot_mapping, const at::Tensor& block_tables, const at::Tensor& ctx_lens,
    double scale, int64_t num_heads, int64_t num_kv_heads,
    const std::optional<at::Tensor>& q_norm, const std::optional<at::Tensor>& k_norm,
    int64_t window, double softcap, const std::optional<at::Tensor>& pre_ff_norm,
    const std::optional<at::Tensor>& post_ff_norm, c10::string_view activation) {
  static const auto attention =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("tokenmill_cpu_attn::paged_decode_attention", "")
          .typed<DecodeAttentionFn>();
  const bool gelu = activation == "gelu_tanh";
  TORCH_CHECK(gelu || activation == "silu", "decode_layer: activation must be silu or gelu_tanh");
  TORCH_CHECK(pre_ff_norm.has_value() == post_ff_norm.has_value(),
              "decode_layer: pre_ff_norm and post_ff_norm go together");
  const int64_t T = x.size(0), hidden = x.size(1), D = cos.size(1);
  // x -> [norm -> GQA attention with RoPE (-> norm) -> +] -> [norm -> GLU (-> norm) -> +]
  auto [h, res] = add_rms_norm(x, residual, input_norm, eps);
  const at::Tensor qkv = qlinear(h, qkv_w, (num_heads + 2 * num_kv_heads) * D, qkv_bits, qkv_bias);
  if (q_norm.has_value() || k_norm.has_value()) {  // Qwen3, Gemma 3: RMSNorm per head on q and k
    TORCH_CHECK(q_norm.has_value() && k_norm.has_value(),
                "decode_layer: q_norm and k_norm go together");
    head_rms_norm(qkv, *q_norm, *k_norm, num_heads, num_kv_heads, D, eps);
  }
  const at::Tensor q = rope_cache(qkv, positions, cos, sin, k_cache, v_cache, slot_mapping,
                                  num_heads, num_kv_heads);  // [T, H, D]
  const at::Tensor attn =
      attention.call(q, k_cache, v_cache, block_tables, ctx_lens, scale, window, softcap);
  at::Tensor o = qlinear(attn.view({T, num_heads * D}), o_w, hidden, o_bits);
  // Gemma normalizes the attention output before the residual add (post_norm), then the
  // stream again before the MLP (pre_ff_norm); Llama's post_norm is that second norm.
  const bool sandwich = pre_ff_norm.has_value();
  if (sandwich) o = std::get<0>(add_rms_norm(o, std::nullopt, post_norm, eps));
  auto [h2, res2] = add_rms_norm(o, res, sandwich ? *pre_ff_norm : post_norm, eps);
  const at::Tensor gate_up = qlinear(h2, gate_up_w, 2 * intermediate, gate_up_bits);
  at::Tensor out = qlinear(gelu ? gelu_tanh_mul(gate_up) : silu_mul(gate_up), down_w, hidden,
                           down_bits);
  if (sandwich) out = std::get<0>(add_rms_norm(out, std::nullopt, *post_ff_norm, eps));
  return {out, res2};  // the layer's output is out + res2, added by the next norm
}

}  // namespace

TORCH_LIBRARY(tokenmill_cpu_fused, m) {
  m.def("add_rms_norm(Tensor x, Tensor? residual, Tensor weight, float eps) -> (Tensor, Tensor)");
  m.def(
      "rope_cache(Tensor qkv, Tensor positions, Tensor cos, Tensor sin, Tensor(a!) k_cache, "
      "Tensor(b!) v_cache, Tensor slot_mapping, int num_heads, int num_kv_heads) -> Tensor");
  m.def("silu_mul(Tensor gate_up) -> Tensor");
  m.def("gelu_tanh_mul(Tensor gate_up) -> Tensor");
  m.def(
      "decode_layer(Tensor x, Tensor? residual, Tensor input_norm, Tensor post_norm, float eps, "
      "Tensor qkv_w, int qkv_bits, Tensor? qkv_bias, Tensor o_w, int o_bits, Tensor gate_up_w, "
      "int gate_up_bits, Tensor down_w, int down_bits, int intermediate, Tensor cos, Tensor sin, "
      "Tensor positions, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slot_mapping, "
      "Tensor block_tables, Tensor ctx_lens, float scale, int num_heads, int num_kv_heads, "
      "Tensor? q_norm=None, Tensor? k_norm=None, int window=0, float softcap=0., "
      "Tensor? pre_ff_norm=None, Tensor? post_ff_norm=None, str activation=\"silu\") "
      "-> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(tokenmill_cpu_fused, CPU, m) {
  m.impl("add_rms_norm", &add_rms_norm);
  m.impl("rope_cache", &rope_cache);
  m.impl("silu_mul", &silu_mul);
  m.impl("gelu_tanh_mul", &gelu_tanh_mul);
  m.impl("decode_layer", &decode_layer);
}
