// Decode attention over the paged KV cache for CPU (tokenmill_cpu_attn).
//
// paged_decode_attention(q [B, H, D], k_cache, v_cache [num_blocks, block_size, H_kv, D],
//                        block_tables [B, max_blocks] int64, ctx_lens [B] int64, scale,
//                        window = 0, softcap = 0) -> out [B, H, D]
// Row b attends to keys [0, ctx_lens[b]), or with a sliding window > 0 to its last `window`;
// softcap > 0 caps the scaled scores at softcap * tanh(score / softcap) before the softmax.
//
// Keys and values are read straight from the blocks through the block table (no gather copy).
// Each kv head's G = H / H_kv query heads are computed together in fp32 with an online softmax,
// so every key is loaded once for the whole group. A work item is a partition of at most
// kPartition keys of one row, for one kv head or all of them (see run_decode); rows longer than
// kPartition are split and the partial softmaxes merged in a fixed order. How a row is split
// depends only on its own length, and each item is computed by one thread in a fixed order, so
// a row's output never depends on the other rows of the batch nor on the thread count (batch
// invariance by construction). Which code path a head takes (vector body or remainder of a
// loop, register group of heads, one or all kv heads per item) may vary with the batch, so
// every fused multiply-add is explicit (at::vec::fmadd, std::fma) and the build forbids the
// compiler to fuse any other (-ffp-contract=off): each path does the same operations per lane.
//
// The extension is JIT-built for the host (-march=native), so the ISA of at::vec is chosen here
// from the compiler's target macros; these must be defined before any ATen vec header.
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && \
    defined(__AVX512DQ__) && defined(__FMA__)
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#else
#define CPU_CAPABILITY DEFAULT
#endif

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#endif

namespace {

using fVec = at::vec::Vectorized<float>;
constexpr int kVLen = fVec::size();
// Keys per online-softmax step.
constexpr int64_t kTile = 32;
// Keys per work item; longer rows are split so that a few long rows still fill every core.
constexpr int64_t kPartition = 512;
constexpr int64_t kMaxHeadDim = 256;
// Below this many (key, kv head) pairs (~10-20 us of work) a call runs on one thread.
constexpr int64_t kMinParallelWork = 1024;
// Heads per thread when merging split rows (each merge is a few hundred flops).
constexpr int64_t kMergeGrain = 256;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

#if defined(CPU_CAPABILITY_AVX512)
constexpr bool kAvx512 = true;
#else
constexpr bool kAvx512 = false;
#endif
#if defined(CPU_CAPABILITY_AVX512) && defined(__AVX512BF16__)
constexpr bool kHasDpBf16 = true;
#else
constexpr bool kHasDpBf16 = false;
#endif

// On AVX-512, bf16 rows are widened without shuffles: of each 32 values, the even ones go to
// one fp32 vector (x << 16) and the odd ones to the next (x & 0xffff0000). q, keys, values and
// the accumulators all use this lane order (dot products do not care); it is undone when the
// output is written.
template <typename T>
constexpr bool kPermuted = kAvx512 && std::is_same_v<T, at::BFloat16>;

// Loads 2 * kVLen values at p as fp32 into a, b (in the lane order above).
template <typename T>
inline void load_pair(const T* p, fVec& a, fVec& b) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, at::BFloat16>) {
    const __m512i raw = _mm512_loadu_si512(p);
    a = _mm512_castsi512_ps(_mm512_slli_epi32(raw, 16));
    b = _mm512_castsi512_ps(_mm512_and_si512(raw, _mm512_set1_epi32(0xffff0000)));
    return;
  }
#endif
  if constexpr (std::is_same_v<T, float>) {
    a = fVec::loadu(p);
    b = fVec::loadu(p + kVLen);
  } else if constexpr (std::is_same_v<T, at::BFloat16>) {
    at::vec::load_fp32_from_bf16(p, a);
    at::vec::load_fp32_from_bf16(p + kVLen, b);
  } else {
    at::vec::load_fp32_from_fp16(p, a);
    at::vec::load_fp32_from_fp16(p + kVLen, b);
  }
}

// A row of D values as fp32 into dst (in the lane order above).
template <typename T>
inline void load_row(const T* src, float* dst, int nv) {
  for (int c = 0; c < nv; c += 2) {
    fVec a, b;
    load_pair(src + c * kVLen, a, b);
    a.store(dst + c * kVLen);
    b.store(dst + (c + 1) * kVLen);
  }
}

inline float hsum(const fVec& v) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_reduce_add_ps(v);
#else
  return at::vec::vec_reduce_all<float>([](fVec& x, fVec& y) { return x + y; }, v);
#endif
}

// max without NaN propagation (a NaN score still makes the output NaN through exp).
inline fVec vmax(const fVec& a, const fVec& b) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_max_ps(a, b);
#else
  return at::vec::maximum(a, b);
#endif
}

inline float hmax(const fVec& v) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_reduce_max_ps(v);
#else
  return at::vec::vec_reduce_all<float>([](fVec& x, fVec& y) { return at::vec::maximum(x, y); },
                                        v);
#endif
}

// out[i] = sum of the lanes of a[i], i < 16.
inline void reduce16(const fVec* a, float* out) {
#if defined(CPU_CAPABILITY_AVX512)
  // Pairwise transpose-and-add: 45 ops for 16 sums instead of ~8 per sum.
  __m512 b[8], c[4], e[2];
  for (int k = 0; k < 8; ++k) {
    const __m512 x = a[2 * k], y = a[2 * k + 1];
    b[k] = _mm512_add_ps(_mm512_unpacklo_ps(x, y), _mm512_unpackhi_ps(x, y));
  }
  for (int k = 0; k < 4; ++k) {
    const __m512 x = b[2 * k], y = b[2 * k + 1];
    c[k] = _mm512_add_ps(_mm512_shuffle_ps(x, y, 0x44), _mm512_shuffle_ps(x, y, 0xEE));
  }
  for (int k = 0; k < 2; ++k) {
    const __m512 x = c[2 * k], y = c[2 * k + 1];
    e[k] = _mm512_add_ps(_mm512_shuffle_f32x4(x, y, 0x88), _mm512_shuffle_f32x4(x, y, 0xDD));
  }
  _mm512_storeu_ps(out, _mm512_add_ps(_mm512_shuffle_f32x4(e[0], e[1], 0x88),
                                      _mm512_shuffle_f32x4(e[0], e[1], 0xDD)));
#else
  for (int i = 0; i < 16; ++i) out[i] = hsum(a[i]);
#endif
}

struct Problem {
  const void* q;
  const void* k;
  const void* v;
  void* out;
  const int64_t* tables;
  const int64_t* ctx_lens;
  int64_t table_stride;
  int64_t q_stride_row, q_stride_head;
  int64_t k_stride_block, k_stride_tok, k_stride_head;
  int64_t v_stride_block, v_stride_tok, v_stride_head;
  int64_t num_heads, num_kv_heads, group, head_dim, block_size;
  float scale;
  int64_t window;  // > 0: row b attends to its last `window` keys only (sliding window)
  float softcap;   // > 0: scores become softcap * tanh(scores / softcap) (Gemma 2)
};

// Row b's first key: its keys are [key_begin, ctx_lens[b]).
inline int64_t key_begin(const Problem& p, int64_t b) {
  return p.window > 0 ? std::max<int64_t>(0, p.ctx_lens[b] - p.window) : 0;
}

// Per-thread scratch for the query heads of one work item; contents never carry from one work
// item to the next.
struct Scratch {
  std::vector<float> q;         // [heads, D] fp32 query heads
  std::vector<float> acc;       // [heads, D] unnormalized outputs
  std::vector<float> kbuf;      // [kTile, D] keys of the tile as fp32 (when not read directly)
  std::vector<float> scores;    // [heads, kTile] scores, then probabilities
  std::vector<float> m, l;      // [heads] running max and denominator
  std::vector<float> alpha;     // [heads] rescale of the previous tiles
  std::vector<float> tile_sum;  // [heads] sum of this tile's probabilities
  Scratch(int64_t heads, int64_t d)
      : q(heads * d),
        acc(heads * d),
        kbuf(kTile * d, 0.f),
        scores(heads * kTile),
        m(heads),
        l(heads),
        alpha(heads, 0.f),
        tile_sum(heads) {}
};

// For kGB heads: acc[h] = acc[h] * alpha[h] + sum_{i < cnt} probs[h][i] * v_i, where v_i =
// vtok[i] + voff (probs rows are kTile apart, acc rows D apart). Each value row is widened once
// for all kGB heads. Also prefetches rows knext[i] + koff and vnext[i] + voff for i < pf, one of
// each per key: blocks are scattered, so the hardware prefetchers lose the stream at every block.
template <typename T, int kNV, int kGB>
inline void pv_group(const T* const* vtok, int64_t voff, int64_t cnt, int nv, int64_t D,
                     const float* probs, const float* alpha, float* acc,
                     const T* const* knext, const T* const* vnext, int64_t koff, int64_t pf,
                     int64_t row_bytes) {
  constexpr int kArr = kNV > 0 ? kNV : static_cast<int>(kMaxHeadDim / kVLen);
  // FMA latency needs ~8 independent chains: few accumulators take even/odd keys apart.
  constexpr int kSplit = kNV > 0 && kGB * kNV < 8 ? 2 : 1;
  constexpr int64_t kLine = 64;
  fVec a[kSplit][kGB][kArr];
  for (int h = 0; h < kGB; ++h) {
    const fVec alpha_v(alpha[h]);
    for (int c = 0; c < nv; ++c) {
      a[0][h][c] = fVec::loadu(acc + h * D + c * kVLen) * alpha_v;
      for (int r = 1; r < kSplit; ++r) a[r][h][c] = fVec(0.f);
    }
  }
  auto step = [&](int64_t i, fVec(&ar)[kGB][kArr]) {
    if (i < pf) {
      const char* kn = reinterpret_cast<const char*>(knext[i] + koff);
      const char* vn = reinterpret_cast<const char*>(vnext[i] + voff);
      for (int64_t c = 0; c < row_bytes; c += kLine) {
        __builtin_prefetch(kn + c, 0, 3);
        __builtin_prefetch(vn + c, 0, 3);
      }
    }
    fVec v[kArr];
    const T* vr = vtok[i] + voff;
    for (int c = 0; c < nv; c += 2) load_pair(vr + c * kVLen, v[c], v[c + 1]);
    for (int h = 0; h < kGB; ++h) {
      const fVec p(probs[h * kTile + i]);
      for (int c = 0; c < nv; ++c) ar[h][c] = at::vec::fmadd(p, v[c], ar[h][c]);
    }
  };
  int64_t i = 0;
  for (; i + kSplit <= cnt; i += kSplit) {
    for (int r = 0; r < kSplit; ++r) step(i + r, a[r]);
  }
  for (; i < cnt; ++i) step(i, a[0]);
  for (int h = 0; h < kGB; ++h) {
    for (int c = 0; c < nv; ++c) {
      fVec sum = a[0][h][c];
      for (int r = 1; r < kSplit; ++r) sum = sum + a[r][h][c];
      sum.store(acc + h * D + c * kVLen);
    }
  }
}

// Scores of a tile for query heads h0 .. h0 + G - 1 of `s` (kv head at koff of the token rows
// ktok; q points at the item's first query head) with vector code: per key, 16 lanes of partial
// dot products, then reduce16.
template <typename T, int kNV>
void vec_scores(const Problem& p, const T* q, const T* const* ktok, int64_t koff, int64_t h0,
                int64_t cnt, Scratch& s) {
  const int64_t D = p.head_dim, G = p.group;
  const int nv = kNV > 0 ? kNV : static_cast<int>(D / kVLen);
  constexpr int kArr = kNV > 0 ? kNV : static_cast<int>(kMaxHeadDim / kVLen);
  // dpbf16 takes 32 bf16 at a time: q and keys stay bf16 for the scores (products of two bf16
  // are exact in fp32, and dpbf16 accumulates in fp32).
  constexpr bool kDp = kHasDpBf16 && std::is_same_v<T, at::BFloat16> && kNV > 0 && kNV % 2 == 0;
  const float* kf[kTile];
  if constexpr (std::is_same_v<T, float>) {
    for (int64_t i = 0; i < kTile; ++i) kf[i] = ktok[i] + koff;
  } else if constexpr (!kDp) {
    for (int64_t i = 0; i < cnt; ++i) load_row(ktok[i] + koff, s.kbuf.data() + i * D, nv);
    for (int64_t i = 0; i < kTile; ++i) kf[i] = s.kbuf.data() + (i < cnt ? i : 0) * D;
  }
  for (int64_t g = h0; g < h0 + G; ++g) {
    for (int64_t h = 0; h < kTile; h += 16) {
      fVec dots[16];
      if constexpr (kDp) {
#if defined(CPU_CAPABILITY_AVX512) && defined(__AVX512BF16__)
        const T* qg = q + g * p.q_stride_head;
        __m512bh qv[kArr / 2];
        for (int c = 0; c < nv / 2; ++c) {
          qv[c] = (__m512bh)_mm512_loadu_si512(qg + c * 32);
        }
        for (int64_t i = 0; i < 16; ++i) {
          const T* k = ktok[h + i] + koff;
          __m512 a =
              _mm512_dpbf16_ps(_mm512_setzero_ps(), qv[0], (__m512bh)_mm512_loadu_si512(k));
          for (int c = 1; c < nv / 2; ++c) {
            a = _mm512_dpbf16_ps(a, qv[c], (__m512bh)_mm512_loadu_si512(k + c * 32));
          }
          dots[i] = a;
        }
#endif
      } else {
        const float* qg = s.q.data() + g * D;
        fVec qv[kArr];
        for (int c = 0; c < nv; ++c) qv[c] = fVec::loadu(qg + c * kVLen);
        for (int64_t i = 0; i < 16; ++i) {
          const float* k = kf[h + i];
          fVec a = qv[0] * fVec::loadu(k);
          for (int c = 1; c < nv; ++c) a = at::vec::fmadd(qv[c], fVec::loadu(k + c * kVLen), a);
          dots[i] = a;
        }
      }
      reduce16(dots, s.scores.data() + g * kTile + h);
    }
  }
}

// Attention of row `b` for kv heads [kh0, kh1) (query heads kh0 * G .. kh1 * G) over keys
// [t_begin, t_end). Leaves m, l and the unnormalized acc (in the lane order of load_pair) of
// those query heads in `s`, indexed from 0.
//
// Each tile of keys is read for all kv heads before the next tile, so with all heads in one call
// whole blocks stream through in order. How heads are split across calls does not change any
// head's arithmetic.
template <typename T, int kNV>
void attend(const Problem& p, int64_t b, int64_t kh0, int64_t kh1, int64_t t_begin,
            int64_t t_end, Scratch& s) {
  const int64_t D = p.head_dim, G = p.group, bs = p.block_size;
  const int64_t heads = (kh1 - kh0) * G;
  const int nv = kNV > 0 ? kNV : static_cast<int>(D / kVLen);
  constexpr int kGroupMax = kNV > 0 ? std::max(1, 16 / kNV) : 1;

  const T* q = static_cast<const T*>(p.q) + b * p.q_stride_row + kh0 * G * p.q_stride_head;
  const T* kbase = static_cast<const T*>(p.k);
  const T* vbase = static_cast<const T*>(p.v);
  const int64_t* table = p.tables + b * p.table_stride;

  for (int64_t h = 0; h < heads; ++h) load_row(q + h * p.q_stride_head, s.q.data() + h * D, nv);
  std::fill_n(s.acc.begin(), heads * D, 0.f);
  std::fill_n(s.m.begin(), heads, kNegInf);
  std::fill_n(s.l.begin(), heads, 0.f);

  // Token rows (kv head 0) of this tile and the next.
  const T* ktok[kTile];
  const T* vtok[kTile];
  const T* knext[kTile];
  const T* vnext[kTile];

  // Walks the rows block by block; the table is read only for blocks that hold keys.
  int64_t pos = t_begin, off = t_begin % bs;
  const T* kcur = kbase + table[t_begin / bs] * p.k_stride_block + off * p.k_stride_tok;
  const T* vcur = vbase + table[t_begin / bs] * p.v_stride_block + off * p.v_stride_tok;
  auto next_rows = [&](int64_t cnt, const T** kr, const T** vr) {
    for (int64_t i = 0; i < cnt; ++i) {
      kr[i] = kcur;
      vr[i] = vcur;
      ++pos;
      if (++off < bs) {
        kcur += p.k_stride_tok;
        vcur += p.v_stride_tok;
      } else if (pos < t_end) {
        off = 0;
        const int64_t blk = table[pos / bs];
        kcur = kbase + blk * p.k_stride_block;
        vcur = vbase + blk * p.v_stride_block;
      }
    }
    // Rows past cnt repeat row 0: finite data whose scores are masked to -inf.
    for (int64_t i = cnt; i < kTile; ++i) {
      kr[i] = kr[0];
      vr[i] = vr[0];
    }
  };
  const int64_t row_bytes = D * static_cast<int64_t>(sizeof(T));
  next_rows(std::min(kTile, t_end - t_begin), ktok, vtok);

  for (int64_t t0 = t_begin; t0 < t_end; t0 += kTile) {
    const int64_t cnt = std::min(kTile, t_end - t0);
    const int64_t pf = t0 + kTile < t_end ? std::min(kTile, t_end - t0 - kTile) : 0;
    if (pf > 0) next_rows(pf, knext, vnext);

    for (int64_t kh = kh0; kh < kh1; ++kh) {
      const int64_t koff = kh * p.k_stride_head, voff = kh * p.v_stride_head;
      const int64_t h0 = (kh - kh0) * G;  // first query head of this kv head, in `s`
      vec_scores<T, kNV>(p, q, ktok, koff, h0, cnt, s);

      // Online softmax update, vectorized over the keys of the tile.
      const fVec scale_v(p.scale);
      for (int64_t g = h0; g < h0 + G; ++g) {
        float* sg = s.scores.data() + g * kTile;
        fVec sv[kTile / kVLen];
        fVec tile_max(kNegInf);
        for (int64_t j = 0; j < kTile / kVLen; ++j) {
          sv[j] = fVec::loadu(sg + j * kVLen) * scale_v;
          if (p.softcap > 0.f) sv[j] = (sv[j] * fVec(1.f / p.softcap)).tanh() * fVec(p.softcap);
          if (cnt < kTile) {
            const fVec lane = fVec::arange(static_cast<float>(j * kVLen), 1.f);
            sv[j] = fVec::blendv(sv[j], fVec(kNegInf), lane >= fVec(static_cast<float>(cnt)));
          }
          tile_max = vmax(tile_max, sv[j]);
        }
        const float m_new = std::max(s.m[g], hmax(tile_max));
        s.alpha[g] = s.m[g] - m_new;  // exponentiated below for all heads at once
        s.m[g] = m_new;
        fVec psum(0.f);
        const fVec m_v(m_new);
        for (int64_t j = 0; j < kTile / kVLen; ++j) {
          const fVec pv = (sv[j] - m_v).exp_u20();
          pv.store(sg + j * kVLen);
          psum = psum + pv;
        }
        s.tile_sum[g] = hsum(psum);
      }
      // exp(-inf) = 0 on the first tile, where acc and l are still 0.
      for (int64_t g = h0; g < h0 + G; g += kVLen) {
        const int n = static_cast<int>(std::min<int64_t>(kVLen, h0 + G - g));
        fVec::loadu(s.alpha.data() + g, n).exp_u20().store(s.alpha.data() + g, n);
      }
      for (int64_t g = h0; g < h0 + G; ++g) {
        s.l[g] = std::fma(s.l[g], s.alpha[g], s.tile_sum[g]);
      }

      // Values: heads in groups whose accumulators fit in registers, so each row is widened
      // once per group; the first group prefetches this kv head's rows of the next tile.
      for (int64_t g = h0; g < h0 + G;) {
        const int gb = static_cast<int>(std::min<int64_t>(kGroupMax, h0 + G - g));
        const int64_t pf_g = g == h0 ? pf : 0;
        const float* pg = s.scores.data() + g * kTile;
        float* ag = s.acc.data() + g * D;
        const float* al = s.alpha.data() + g;
        if (kGroupMax >= 4 && gb == 4) {
          pv_group<T, kNV, 4>(vtok, voff, cnt, nv, D, pg, al, ag, knext, vnext, koff, pf_g,
                              row_bytes);
        } else if (kGroupMax >= 3 && gb == 3) {
          pv_group<T, kNV, 3>(vtok, voff, cnt, nv, D, pg, al, ag, knext, vnext, koff, pf_g,
                              row_bytes);
        } else if (kGroupMax >= 2 && gb == 2) {
          pv_group<T, kNV, 2>(vtok, voff, cnt, nv, D, pg, al, ag, knext, vnext, koff, pf_g,
                              row_bytes);
        } else {
          pv_group<T, kNV, 1>(vtok, voff, cnt, nv, D, pg, al, ag, knext, vnext, koff, pf_g,
                              row_bytes);
        }
        g += gb;
      }
    }
    std::copy_n(knext, kTile, ktok);
    std::copy_n(vnext, kTile, vtok);
  }
}

// dst = acc / l, undoing the lane order of load_pair.
template <typename T>
inline void store_out(T* dst, const float* acc, float l, int64_t D) {
  const fVec lv(l);
  alignas(64) float tmp[kMaxHeadDim];
  for (int64_t c = 0; c < D; c += kVLen) (fVec::loadu(acc + c) / lv).store(tmp + c);
  if constexpr (kPermuted<T>) {
    for (int64_t c = 0; c < D; c += 2 * kVLen) {
      for (int j = 0; j < kVLen; ++j) {
        dst[c + 2 * j] = static_cast<T>(tmp[c + j]);
        dst[c + 2 * j + 1] = static_cast<T>(tmp[c + kVLen + j]);
      }
    }
  } else {
    for (int64_t c = 0; c < D; ++c) dst[c] = static_cast<T>(tmp[c]);
  }
}

template <typename T, int kNV>
void run_decode(const Problem& p, int64_t batch) {
  const int64_t D = p.head_dim, G = p.group, Hkv = p.num_kv_heads;
  // (row, partition) units of at most kPartition keys.
  std::vector<std::pair<int64_t, int64_t>> units;
  std::vector<int64_t> partial_base(batch, -1);
  int64_t num_partials = 0, total_keys = 0;
  units.reserve(batch);
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t keys = p.ctx_lens[b] - key_begin(p, b);
    total_keys += keys;
    const int64_t parts = (keys + kPartition - 1) / kPartition;
    if (parts > 1) {
      partial_base[b] = num_partials;
      num_partials += parts;
    }
    for (int64_t part = 0; part < parts; ++part) units.emplace_back(b, part);
  }
  // Split rows keep per-partition [m, l, acc[D]] for each query head: [num_partials, H, D + 2].
  std::vector<float> partials(num_partials * p.num_heads * (D + 2));

  // Waking the other threads costs microseconds: small calls run on the calling thread.
  const int64_t num_units = static_cast<int64_t>(units.size());
  const int64_t threads = total_keys * Hkv < kMinParallelWork
                              ? 1
                              : std::min<int64_t>(at::get_num_threads(), num_units * Hkv);
  // An item is a unit and all its kv heads (whole blocks stream through in order) when there
  // are enough units to share out, else a unit and one kv head. Either way every head is
  // computed the same way, so this choice cannot change results.
  const int64_t kv_per_item = num_units >= 4 * threads ? Hkv : 1;
  const int64_t items_per_unit = Hkv / kv_per_item;
  const int64_t total = num_units * items_per_unit;
  std::atomic<int64_t> next{0};
  T* out = static_cast<T*>(p.out);
  // Items are handed out dynamically; each is computed entirely by the thread that takes it.
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    Scratch s(kv_per_item * G, D);
    for (int64_t it = next.fetch_add(1); it < total; it = next.fetch_add(1)) {
      const auto [b, part] = units[it / items_per_unit];
      const int64_t kh0 = it % items_per_unit * kv_per_item, kh1 = kh0 + kv_per_item;
      const int64_t n = p.ctx_lens[b];
      // partitions start at the row's first key, so their bounds depend on the row alone
      const int64_t t_begin = key_begin(p, b) + part * kPartition;
      attend<T, kNV>(p, b, kh0, kh1, t_begin, std::min(n, t_begin + kPartition), s);
      for (int64_t i = 0; i < kv_per_item * G; ++i) {
        const int64_t h = kh0 * G + i;
        if (partial_base[b] < 0) {
          store_out(out + (b * p.num_heads + h) * D, s.acc.data() + i * D, s.l[i], D);
        } else {
          float* dst = partials.data() + ((partial_base[b] + part) * p.num_heads + h) * (D + 2);
          dst[0] = s.m[i];
          dst[1] = s.l[i];
          std::copy_n(s.acc.data() + i * D, D, dst + 2);
        }
      }
    }
  });
  if (num_partials == 0) return;

  at::parallel_for(0, batch * p.num_heads, kMergeGrain, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(D);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / p.num_heads, h = bh % p.num_heads;
      if (partial_base[b] < 0) continue;
      const int64_t parts = (p.ctx_lens[b] - key_begin(p, b) + kPartition - 1) / kPartition;
      auto at_part = [&](int64_t part) {
        return partials.data() + ((partial_base[b] + part) * p.num_heads + h) * (D + 2);
      };
      float m = kNegInf;
      for (int64_t part = 0; part < parts; ++part) m = std::max(m, at_part(part)[0]);
      float l = 0.f;
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t part = 0; part < parts; ++part) {
        const float* src = at_part(part);
        const float w = std::exp(src[0] - m);
        l = std::fma(w, src[1], l);
        const fVec wv(w);
        for (int64_t c = 0; c < D; c += kVLen) {
          at::vec::fmadd(wv, fVec::loadu(src + 2 + c), fVec::loadu(acc.data() + c))
              .store(acc.data() + c);
        }
      }
      store_out(out + (b * p.num_heads + h) * D, acc.data(), l, D);
    }
  });
}

template <typename T>
void dispatch_head_dim(const Problem& p, int64_t batch) {
  switch (p.head_dim) {
    case 64:
      return run_decode<T, 64 / kVLen>(p, batch);
    case 128:
      return run_decode<T, 128 / kVLen>(p, batch);
    default:
      return run_decode<T, 0>(p, batch);
  }
}

at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& k_cache,
                                  const at::Tensor& v_cache, const at::Tensor& block_tables,
                                  const at::Tensor& ctx_lens, double scale, int64_t window,
                                  double softcap) {
  TORCH_CHECK(q.device().is_cpu() && k_cache.device().is_cpu() && v_cache.device().is_cpu(),
              "paged_decode_attention: CPU tensors only");
  TORCH_CHECK(q.dim() == 3, "q must be [B, H, D]");
  TORCH_CHECK(k_cache.dim() == 4 && v_cache.dim() == 4,
              "k_cache, v_cache must be [num_blocks, block_size, H_kv, D]");
  TORCH_CHECK(k_cache.sizes() == v_cache.sizes(), "k_cache and v_cache shapes differ");
  const auto dtype = q.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
              "q must be float32, bfloat16 or float16");
  TORCH_CHECK(k_cache.scalar_type() == dtype && v_cache.scalar_type() == dtype,
              "q, k_cache and v_cache must share a dtype");
  TORCH_CHECK(q.stride(2) == 1, "the last (head_dim) dimension of q must be contiguous");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t num_blocks = k_cache.size(0), block_size = k_cache.size(1);
  const int64_t Hkv = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == D, "head_dim of q and the cache differ");
  TORCH_CHECK(Hkv >= 1 && H % Hkv == 0, "num_heads must be a multiple of num_kv_heads");
  TORCH_CHECK(D % 32 == 0 && D <= kMaxHeadDim, "head_dim must be a multiple of 32, at most ",
              kMaxHeadDim, "; got ", D);
  // The kernel walks blocks, tokens and heads through strides but reads each head's D values
  // as one contiguous run.
  TORCH_CHECK(k_cache.stride(3) == 1 && v_cache.stride(3) == 1,
              "the last (head_dim) dimension of the caches must be contiguous");
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && ctx_lens.scalar_type() == at::kLong,
              "block_tables and ctx_lens must be int64");
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.size(0) == B,
              "block_tables must be [B, max_blocks]");
  TORCH_CHECK(ctx_lens.dim() == 1 && ctx_lens.size(0) == B, "ctx_lens must be [B]");
  TORCH_CHECK(block_tables.device().is_cpu() && ctx_lens.device().is_cpu(),
              "block_tables and ctx_lens must be CPU tensors");
  TORCH_CHECK(window >= 0, "window must be >= 0 (0: none)");
  TORCH_CHECK(softcap >= 0, "softcap must be >= 0 (0: none)");

  auto out = at::empty_like(q, at::MemoryFormat::Contiguous);
  if (B == 0) return out;
  const auto tables = block_tables.contiguous();
  const auto lens = ctx_lens.contiguous();
  const int64_t max_blocks = tables.size(1);
  const int64_t* tp = tables.data_ptr<int64_t>();
  const int64_t* lp = lens.data_ptr<int64_t>();
  // A bad table entry would read outside the cache, so every block in use is checked.
  for (int64_t b = 0; b < B; ++b) {
    const int64_t n = lp[b];
    TORCH_CHECK(n >= 1 && n <= max_blocks * block_size, "ctx_lens[", b, "] = ", n,
                " is outside [1, max_blocks * block_size = ", max_blocks * block_size, "]");
    // blocks behind a sliding window are never read (their entries may be stale)
    const int64_t first = window > 0 ? std::max<int64_t>(0, n - window) / block_size : 0;
    for (int64_t j = first, used = (n + block_size - 1) / block_size; j < used; ++j) {
      const int64_t blk = tp[b * max_blocks + j];
      TORCH_CHECK(blk >= 0 && blk < num_blocks, "block_tables[", b, ", ", j, "] = ", blk,
                  " is outside [0, ", num_blocks, ")");
    }
  }

  Problem p{};
  p.q = q.data_ptr();
  p.q_stride_row = q.stride(0);
  p.q_stride_head = q.stride(1);
  p.k = k_cache.data_ptr();
  p.v = v_cache.data_ptr();
  p.out = out.data_ptr();
  p.tables = tp;
  p.ctx_lens = lp;
  p.table_stride = max_blocks;
  p.k_stride_block = k_cache.stride(0);
  p.k_stride_tok = k_cache.stride(1);
  p.k_stride_head = k_cache.stride(2);
  p.v_stride_block = v_cache.stride(0);
  p.v_stride_tok = v_cache.stride(1);
  p.v_stride_head = v_cache.stride(2);
  p.num_heads = H;
  p.num_kv_heads = Hkv;
  p.group = H / Hkv;
  p.head_dim = D;
  p.block_size = block_size;
  p.scale = static_cast<float>(scale);
  p.window = window;
  p.softcap = static_cast<float>(softcap);

  switch (dtype) {
    case at::kFloat:
      dispatch_head_dim<float>(p, B);
      break;
    case at::kBFloat16:
      dispatch_head_dim<at::BFloat16>(p, B);
      break;
    default:
      dispatch_head_dim<at::Half>(p, B);
      break;
  }
  return out;
}

}  // namespace

TORCH_LIBRARY(tokenmill_cpu_attn, m) {
  m.def(
      "paged_decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
      "Tensor ctx_lens, float scale, int window=0, float softcap=0.) -> Tensor");
}

TORCH_LIBRARY_IMPL(tokenmill_cpu_attn, CPU, m) {
  m.impl("paged_decode_attention", &paged_decode_attention);
}
