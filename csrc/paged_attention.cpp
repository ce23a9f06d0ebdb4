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
#include <cstring>
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

// Key rows of a tile for the vector score code: kf[i] points at key i as fp32 (fp32 caches: the
// cache row itself; else widened into kbuf), for all kTile lanes (lanes past cnt repeat row 0).
// Unused where scores take bf16 keys directly (kDpScores).
template <typename T, int kNV>
constexpr bool kDpScores =
    kHasDpBf16 && std::is_same_v<T, at::BFloat16> && kNV > 0 && kNV % 2 == 0;

template <typename T, int kNV>
inline void prepare_keys(const T* const* ktok, int64_t koff, int64_t cnt, int nv, int64_t D,
                         float* kbuf, const float** kf) {
  if constexpr (std::is_same_v<T, float>) {
    for (int64_t i = 0; i < kTile; ++i) kf[i] = ktok[i] + koff;
  } else if constexpr (!kDpScores<T, kNV>) {
    for (int64_t i = 0; i < cnt; ++i) load_row(ktok[i] + koff, kbuf + i * D, nv);
    for (int64_t i = 0; i < kTile; ++i) kf[i] = kbuf + (i < cnt ? i : 0) * D;
  }
}

// Scores of a tile for `heads` query heads: scores[g * kTile + i] = q_g . k_i. qraw points at the
// first head in the query tensor (heads q_stride_head apart), qf at the same heads as fp32 rows;
// keys as ktok[i] + koff (bf16 dot products) or kf (see prepare_keys). Per key, 16 lanes of
// partial dot products, then reduce16. Decode rows and prompt chunks both score through here,
// so a (query, key) pair's score never depends on which kernel computed it.
template <typename T, int kNV>
inline void tile_scores(const T* qraw, int64_t q_stride_head, const float* qf, int64_t heads,
                        int64_t D, const T* const* ktok, int64_t koff, const float* const* kf,
                        float* scores) {
  const int nv = kNV > 0 ? kNV : static_cast<int>(D / kVLen);
  constexpr int kArr = kNV > 0 ? kNV : static_cast<int>(kMaxHeadDim / kVLen);
  // dpbf16 takes 32 bf16 at a time: q and keys stay bf16 for the scores (products of two bf16
  // are exact in fp32, and dpbf16 accumulates in fp32).
  constexpr bool kDp = kDpScores<T, kNV>;
  (void)qraw, (void)q_stride_head, (void)qf, (void)ktok, (void)koff, (void)kf;
  for (int64_t g = 0; g < heads; ++g) {
    for (int64_t h = 0; h < kTile; h += 16) {
      fVec dots[16];
      if constexpr (kDp) {
#if defined(CPU_CAPABILITY_AVX512) && defined(__AVX512BF16__)
        const T* qg = qraw + g * q_stride_head;
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
        const float* qg = qf + g * D;
        fVec qv[kArr];
        for (int c = 0; c < nv; ++c) qv[c] = fVec::loadu(qg + c * kVLen);
        for (int64_t i = 0; i < 16; ++i) {
          const float* k = kf[h + i];
          fVec a = qv[0] * fVec::loadu(k);
          for (int c = 1; c < nv; ++c) a = at::vec::fmadd(qv[c], fVec::loadu(k + c * kVLen), a);
          dots[i] = a;
        }
      }
      reduce16(dots, scores + g * kTile + h);
    }
  }
}

// Online-softmax step of one query head over a tile: scales (and caps) its raw scores sg[0,
// kTile), masks lanes >= cnt, turns them into exp(score - m_new) in place and returns through
// m (the new running max), alpha (m_old - m_new, exponentiated later) and tile_sum.
inline void softmax_tile(float* sg, int64_t cnt, float scale, float softcap, float& m,
                         float& alpha, float& tile_sum) {
  const fVec scale_v(scale);
  fVec sv[kTile / kVLen];
  fVec tile_max(kNegInf);
  for (int64_t j = 0; j < kTile / kVLen; ++j) {
    sv[j] = fVec::loadu(sg + j * kVLen) * scale_v;
    if (softcap > 0.f) sv[j] = (sv[j] * fVec(1.f / softcap)).tanh() * fVec(softcap);
    if (cnt < kTile) {
      const fVec lane = fVec::arange(static_cast<float>(j * kVLen), 1.f);
      sv[j] = fVec::blendv(sv[j], fVec(kNegInf), lane >= fVec(static_cast<float>(cnt)));
    }
    tile_max = vmax(tile_max, sv[j]);
  }
  const float m_new = std::max(m, hmax(tile_max));
  alpha = m - m_new;
  m = m_new;
  fVec psum(0.f);
  const fVec m_v(m_new);
  for (int64_t j = 0; j < kTile / kVLen; ++j) {
    const fVec pv = (sv[j] - m_v).exp_u20();
    pv.store(sg + j * kVLen);
    psum = psum + pv;
  }
  tile_sum = hsum(psum);
}

// The rest of a tile's step for the G query heads of one kv head and one query position (state
// at index 0 of the pointers): alpha = exp(alpha), l = l * alpha + tile_sum, and the values.
// Heads go in groups whose accumulators fit in registers, so each value row is widened once per
// group; the grouping depends on G alone, never on the batch.
template <typename T, int kNV>
inline void finish_tile(const T* const* vtok, int64_t voff, int64_t cnt, int nv, int64_t D,
                        int64_t G, const float* scores, float* alpha, const float* tile_sum,
                        float* l, float* acc, const T* const* knext, const T* const* vnext,
                        int64_t koff, int64_t pf, int64_t row_bytes) {
  constexpr int kGroupMax = kNV > 0 ? std::max(1, 16 / kNV) : 1;
  // exp(-inf) = 0 on the first tile, where acc and l are still 0.
  for (int64_t g = 0; g < G; g += kVLen) {
    const int n = static_cast<int>(std::min<int64_t>(kVLen, G - g));
    fVec::loadu(alpha + g, n).exp_u20().store(alpha + g, n);
  }
  for (int64_t g = 0; g < G; ++g) l[g] = std::fma(l[g], alpha[g], tile_sum[g]);
  // The first group prefetches this kv head's rows of the next tile.
  for (int64_t g = 0; g < G;) {
    const int gb = static_cast<int>(std::min<int64_t>(kGroupMax, G - g));
    const int64_t pf_g = g == 0 ? pf : 0;
    const float* pg = scores + g * kTile;
    float* ag = acc + g * D;
    const float* al = alpha + g;
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
      const float* kf[kTile];
      prepare_keys<T, kNV>(ktok, koff, cnt, nv, D, s.kbuf.data(), kf);
      tile_scores<T, kNV>(q + h0 * p.q_stride_head, p.q_stride_head, s.q.data() + h0 * D, G, D,
                          ktok, koff, kf, s.scores.data() + h0 * kTile);
      for (int64_t g = h0; g < h0 + G; ++g) {
        softmax_tile(s.scores.data() + g * kTile, cnt, p.scale, p.softcap, s.m[g], s.alpha[g],
                     s.tile_sum[g]);
      }
      finish_tile<T, kNV>(vtok, voff, cnt, nv, D, G, s.scores.data() + h0 * kTile,
                          s.alpha.data() + h0, s.tile_sum.data() + h0, s.l.data() + h0,
                          s.acc.data() + h0 * D, knext, vnext, koff, pf, row_bytes);
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

// A split row's partitions [m, l, acc[D]] (at_part(0 .. parts - 1)) merged in order, divided
// and stored to dst; acc is D floats of scratch. Decode rows and prompt chunks both end here.
template <typename T, typename AtPart>
inline void merge_store(T* dst, int64_t parts, AtPart at_part, int64_t D, float* acc) {
  float m = kNegInf;
  for (int64_t part = 0; part < parts; ++part) m = std::max(m, at_part(part)[0]);
  float l = 0.f;
  std::fill_n(acc, D, 0.f);
  for (int64_t part = 0; part < parts; ++part) {
    const float* src = at_part(part);
    const float w = std::exp(src[0] - m);
    l = std::fma(w, src[1], l);
    const fVec wv(w);
    for (int64_t c = 0; c < D; c += kVLen) {
      at::vec::fmadd(wv, fVec::loadu(src + 2 + c), fVec::loadu(acc + c)).store(acc + c);
    }
  }
  store_out(dst, acc, l, D);
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
      merge_store(out + (b * p.num_heads + h) * D, parts, at_part, D, acc.data());
    }
  });
}

// Scores of a tile for a block of query rows from the tile's keys transposed, keys in the lanes.
//
// tile_scores leaves key i's dot product with q as 16 lanes of partial sums, lane j holding
// the terms of the query elements at j, j + 16, ... of the vector rows (both in the fp32 lane
// order of load_pair, or bf16 pairs 2j, 2j + 1, 2(j + 16), ... for dpbf16), chained in that
// order, then sums the lanes in reduce16's fixed tree ((S0 + S1) + (S2 + S3)), S_L = (lane 4L +
// lane 4L + 2) + (lane 4L + 1 + lane 4L + 3). Here the same partial sums are built for 16 keys
// at once (keys in the lanes, the query element broadcast) and added in the same tree, so every
// score is bit-identical to tile_scores', at about half the work: no per-key reduction, and the
// tile's keys are read once for a pair of rows.
//
// kt: the tile transposed; fp32: kt[e * kTile + i] = key i's fp32 element e (lane order of
// load_pair); dpbf16: as uint32 bf16 pairs, kt[e * kTile + i] = key i's pair e.
template <bool kDp, int kNV, int kRows>
inline void block_scores(const void* const* qrows, const void* kt, int nv, float* const* out) {
  const int chain = kDp ? nv / 2 : nv;  // vectors per row: terms per lane
  // lane(j, a): a[r][h] = lane-j partial sums of row r against keys 16h .. 16h + 15; each key
  // vector is loaded once for all rows.
  auto lane = [&](int j, fVec (&a)[kRows][2]) {
    if constexpr (kDp) {
#if defined(CPU_CAPABILITY_AVX512) && defined(__AVX512BF16__)
      const auto* k32 = static_cast<const uint32_t*>(kt);
      for (int c = 0; c < chain; ++c) {
        const int e = c * kVLen + j;
        const __m512bh k0 = (__m512bh)_mm512_loadu_si512(k32 + e * kTile);
        const __m512bh k1 = (__m512bh)_mm512_loadu_si512(k32 + e * kTile + kVLen);
        for (int r = 0; r < kRows; ++r) {
          int32_t qe;  // a bf16 pair of q (maybe unaligned)
          std::memcpy(&qe, static_cast<const char*>(qrows[r]) + 4 * e, 4);
          const __m512bh qb = (__m512bh)_mm512_set1_epi32(qe);
          // dpbf16's two products are exact and commute: (k, q) rounds as (q, k) does
          const __m512 z0 = c == 0 ? _mm512_setzero_ps() : __m512(a[r][0]);
          const __m512 z1 = c == 0 ? _mm512_setzero_ps() : __m512(a[r][1]);
          a[r][0] = _mm512_dpbf16_ps(z0, k0, qb);
          a[r][1] = _mm512_dpbf16_ps(z1, k1, qb);
        }
      }
#endif
    } else {
      const auto* kf = static_cast<const float*>(kt);
      for (int c = 0; c < chain; ++c) {
        const int e = c * kVLen + j;
        const fVec k0 = fVec::loadu(kf + e * kTile), k1 = fVec::loadu(kf + e * kTile + kVLen);
        for (int r = 0; r < kRows; ++r) {
          const fVec qe(static_cast<const float*>(qrows[r])[e]);
          if (c == 0) {
            a[r][0] = qe * k0;
            a[r][1] = qe * k1;
          } else {
            a[r][0] = at::vec::fmadd(qe, k0, a[r][0]);
            a[r][1] = at::vec::fmadd(qe, k1, a[r][1]);
          }
        }
      }
    }
  };
  // reduce16's tree, built up as it goes: u[half] = S_{2 half} + S_{2 half + 1}.
  fVec u[2][kRows][2];
  for (int half = 0; half < 2; ++half) {
    fVec first[kRows][2];
    for (int L = 2 * half; L < 2 * half + 2; ++L) {
      fVec a0[kRows][2], a1[kRows][2], t02[kRows][2];
      lane(4 * L, a0);
      lane(4 * L + 2, a1);
      for (int r = 0; r < kRows; ++r)
        for (int h = 0; h < 2; ++h) t02[r][h] = a0[r][h] + a1[r][h];
      lane(4 * L + 1, a0);
      lane(4 * L + 3, a1);
      for (int r = 0; r < kRows; ++r) {
        for (int h = 0; h < 2; ++h) {
          const fVec sl = t02[r][h] + (a0[r][h] + a1[r][h]);
          if (L == 2 * half) {
            first[r][h] = sl;
          } else {
            u[half][r][h] = first[r][h] + sl;
          }
        }
      }
    }
  }
  for (int r = 0; r < kRows; ++r)
    for (int h = 0; h < 2; ++h) (u[0][r][h] + u[1][r][h]).store(out[r] + h * kVLen);
}

// The tile's keys (kv head at koff of the rows ktok) transposed for block_scores; kf as from
// prepare_keys where the scores take fp32 keys.
template <typename T, int kNV>
inline void transpose_keys(const T* const* ktok, int64_t koff, const float* const* kf,
                           int64_t D, void* kt) {
  if constexpr (kDpScores<T, kNV>) {
    auto* dst = static_cast<uint32_t*>(kt);
    for (int64_t i = 0; i < kTile; ++i) {
      const auto* src = reinterpret_cast<const uint32_t*>(ktok[i] + koff);
      for (int64_t e = 0; e < D / 2; ++e) dst[e * kTile + i] = src[e];
    }
  } else {
    auto* dst = static_cast<float*>(kt);
    for (int64_t i = 0; i < kTile; ++i) {
      const float* src = kf[i];
      for (int64_t e = 0; e < D; ++e) dst[e * kTile + i] = src[e];
    }
  }
}

// ---- Prompt chunks: many query rows per sequence, keys shared through tiles ----------------
//
// Sequence s owns query rows [q_starts[s], q_starts[s + 1]) and seq_lens[s] keys; its i-th row
// (position seq_lens[s] - n_q + i) attends causally to the first seq_lens[s] - n_q + i + 1 keys,
// exactly like a decode row with that many keys. A work item is (sequence, kv head, block of
// positions). Without a window every row's tiles start at key 0 and step kTile, its partitions
// at multiples of kPartition (the decode kernel's bounds, since a row's first key is 0), so all
// rows of a block share each tile: its keys are read and widened once for the block, and each
// row runs the decode kernel's per-row arithmetic on it (tile_scores, softmax_tile,
// finish_tile, merge_store) with its own count of valid keys. A row's output is therefore
// bit-identical to the decode kernel's for the same keys, whatever block, item, chunk, thread
// or launch computed it. With a sliding window a row's first key (and so its tile bounds)
// depends on its position, so each row takes the decode kernel's per-row path instead.

// Positions whose scores are computed together before their softmax and values.
constexpr int64_t kSubBlock = 8;

// Scratch of a block of query rows (positions x G heads); grows, never shrinks.
struct BlockScratch {
  std::vector<float> q, acc, scores, m, l, alpha, tile_sum, kbuf, kt, vbuf, partials, merge;
  void ensure(int64_t rows, int64_t G, int64_t D, int64_t parts) {
    auto grow = [](std::vector<float>& v, int64_t n) {
      if (static_cast<int64_t>(v.size()) < n) v.resize(n);
    };
    grow(q, rows * D);
    grow(acc, rows * D);
    grow(scores, kSubBlock * G * kTile);
    grow(kt, kTile * D);
    grow(vbuf, kTile * D);
    grow(m, rows);
    grow(l, rows);
    grow(alpha, rows);
    grow(tile_sum, rows);
    grow(kbuf, kTile * D);
    grow(partials, rows * parts * (D + 2));
    grow(merge, D);
  }
};

struct ChunkItem {
  int64_t seq, kv_head, begin, end;  // positions [begin, end) of the sequence's rows
};

template <typename T, int kNV>
void attend_block(const Problem& p, const int64_t* q_starts, const ChunkItem& it,
                  BlockScratch& w) {
  const int64_t D = p.head_dim, G = p.group, H = p.num_heads, bs = p.block_size;
  const int nv = kNV > 0 ? kNV : static_cast<int>(D / kVLen);
  const int64_t s = it.seq, kh = it.kv_head, i0 = it.begin;
  const int64_t row0 = q_starts[s] + i0;          // packed row of position i0
  const int64_t first = p.ctx_lens[s] - (q_starts[s + 1] - q_starts[s]) + i0 + 1;  // its keys
  const int64_t P = it.end - i0, R = P * G;
  const int64_t n_max = first + P - 1;
  const int64_t max_parts = (n_max + kPartition - 1) / kPartition;
  const int64_t koff = kh * p.k_stride_head, voff = kh * p.v_stride_head;
  const int64_t row_bytes = D * static_cast<int64_t>(sizeof(T));
  const T* qbase = static_cast<const T*>(p.q) + kh * G * p.q_stride_head;
  const T* kbase = static_cast<const T*>(p.k);
  const T* vbase = static_cast<const T*>(p.v);
  const int64_t* table = p.tables + s * p.table_stride;
  T* out = static_cast<T*>(p.out);
  auto q_row = [&](int64_t i) { return qbase + (row0 + i) * p.q_stride_row; };
  auto out_row = [&](int64_t i, int64_t g) { return out + ((row0 + i) * H + kh * G + g) * D; };
  w.ensure(R, G, D, max_parts);
  auto part_at = [&](int64_t r, int64_t part) {
    return w.partials.data() + (r * max_parts + part) * (D + 2);
  };
  auto stash = [&](int64_t r, int64_t part) {
    float* dst = part_at(r, part);
    dst[0] = w.m[r];
    dst[1] = w.l[r];
    std::copy_n(w.acc.data() + r * D, D, dst + 2);
  };

  if (p.window > 0) {
    // Per row, through the decode kernel's own path (attend over each partition, then merge).
    Problem rp = p;
    rp.tables = table;
    rp.table_stride = 0;
    Scratch sc(G, D);
    for (int64_t i = 0; i < P; ++i) {
      const int64_t n = first + i, kb = std::max<int64_t>(0, n - p.window);
      const int64_t parts = (n - kb + kPartition - 1) / kPartition;
      for (int64_t part = 0; part < parts; ++part) {
        const int64_t t_begin = kb + part * kPartition;
        attend<T, kNV>(rp, row0 + i, kh, kh + 1, t_begin, std::min(n, t_begin + kPartition), sc);
        for (int64_t g = 0; g < G; ++g) {
          if (parts == 1) {
            store_out(out_row(i, g), sc.acc.data() + g * D, sc.l[g], D);
          } else {
            float* dst = part_at(i * G + g, part);
            dst[0] = sc.m[g];
            dst[1] = sc.l[g];
            std::copy_n(sc.acc.data() + g * D, D, dst + 2);
          }
        }
      }
      if (parts > 1) {
        for (int64_t g = 0; g < G; ++g) {
          const int64_t r = i * G + g;
          merge_store(out_row(i, g), parts, [&](int64_t part) { return part_at(r, part); }, D,
                      w.merge.data());
        }
      }
    }
    return;
  }

  for (int64_t i = 0; i < P; ++i) {
    for (int64_t g = 0; g < G; ++g) {
      load_row(q_row(i) + g * p.q_stride_head, w.q.data() + (i * G + g) * D, nv);
    }
  }
  std::fill_n(w.acc.begin(), R * D, 0.f);
  std::fill_n(w.m.begin(), R, kNegInf);
  std::fill_n(w.l.begin(), R, 0.f);

  const T* ktok[kTile];
  const T* vtok[kTile];
  const float* kf[kTile];
  constexpr int64_t kLine = 64;
  for (int64_t t0 = 0; t0 < n_max; t0 += kTile) {
    const int64_t cnt_tile = std::min(kTile, n_max - t0);
    // Position i holds first + i keys: it reads this tile when first + i > t0.
    const int64_t a0 = std::max<int64_t>(0, t0 - first + 1);
    if (t0 > 0 && t0 % kPartition == 0) {
      // A new partition for every row that goes on: the decode kernel's split.
      const int64_t part = t0 / kPartition - 1;
      for (int64_t r = a0 * G; r < R; ++r) {
        stash(r, part);
        w.m[r] = kNegInf;
        w.l[r] = 0.f;
        std::fill_n(w.acc.begin() + r * D, D, 0.f);
      }
    }
    for (int64_t j = 0; j < cnt_tile; ++j) {
      const int64_t t = t0 + j, blk = table[t / bs], off = t % bs;
      ktok[j] = kbase + blk * p.k_stride_block + off * p.k_stride_tok;
      vtok[j] = vbase + blk * p.v_stride_block + off * p.v_stride_tok;
    }
    // Rows past cnt_tile repeat row 0: finite data whose scores are masked to -inf.
    for (int64_t j = cnt_tile; j < kTile; ++j) {
      ktok[j] = ktok[0];
      vtok[j] = vtok[0];
    }
    // The next tile's rows: blocks are scattered, so the hardware prefetchers lose the stream.
    for (int64_t t = t0 + kTile, e = std::min(n_max, t0 + 2 * kTile); t < e; ++t) {
      const int64_t blk = table[t / bs], off = t % bs;
      const char* kn = reinterpret_cast<const char*>(kbase + blk * p.k_stride_block +
                                                     off * p.k_stride_tok + koff);
      const char* vn = reinterpret_cast<const char*>(vbase + blk * p.v_stride_block +
                                                     off * p.v_stride_tok + voff);
      for (int64_t c = 0; c < row_bytes; c += kLine) {
        __builtin_prefetch(kn + c, 0, 3);
        __builtin_prefetch(vn + c, 0, 3);
      }
    }
    prepare_keys<T, kNV>(ktok, koff, cnt_tile, nv, D, w.kbuf.data(), kf);
    if constexpr (kAvx512) {
      transpose_keys<T, kNV>(ktok, koff, kf, D, w.kt.data());
      // Values as fp32 rows once for the block, in load_pair's lane order: pv_group then does
      // the same operations on them as on the cache rows.
      const float* vf[kTile];
      for (int64_t j = 0; j < kTile; ++j) {
        if constexpr (std::is_same_v<T, float>) {
          vf[j] = vtok[j] + voff;
        } else {
          if (j < cnt_tile) load_row(vtok[j] + voff, w.vbuf.data() + j * D, nv);
          vf[j] = w.vbuf.data() + (j < cnt_tile ? j : 0) * D;
        }
      }
      for (int64_t i = a0; i < P; i += kSubBlock) {
        const int64_t i_end = std::min(P, i + kSubBlock), r0 = i * G, r1 = i_end * G;
        auto q_of = [&](int64_t r) -> const void* {
          if constexpr (kDpScores<T, kNV>) {
            return q_row(r / G) + r % G * p.q_stride_head;
          } else {
            return w.q.data() + r * D;
          }
        };
        int64_t r = r0;
        for (; r + 2 <= r1; r += 2) {
          const void* qr[2] = {q_of(r), q_of(r + 1)};
          float* so[2] = {w.scores.data() + (r - r0) * kTile,
                          w.scores.data() + (r + 1 - r0) * kTile};
          block_scores<kDpScores<T, kNV>, kNV, 2>(qr, w.kt.data(), nv, so);
        }
        if (r < r1) {
          const void* qr[1] = {q_of(r)};
          float* so[1] = {w.scores.data() + (r - r0) * kTile};
          block_scores<kDpScores<T, kNV>, kNV, 1>(qr, w.kt.data(), nv, so);
        }
        for (int64_t ii = i; ii < i_end; ++ii) {
          const int64_t cnt = std::min(kTile, first + ii - t0), rr = ii * G;
          float* sc = w.scores.data() + (rr - r0) * kTile;
          for (int64_t g = 0; g < G; ++g) {
            softmax_tile(sc + g * kTile, cnt, p.scale, p.softcap, w.m[rr + g], w.alpha[rr + g],
                         w.tile_sum[rr + g]);
          }
          finish_tile<float, kNV>(vf, 0, cnt, nv, D, G, sc, w.alpha.data() + rr,
                                  w.tile_sum.data() + rr, w.l.data() + rr,
                                  w.acc.data() + rr * D, nullptr, nullptr, 0, 0, 0);
        }
      }
      continue;
    }
    for (int64_t i = a0; i < P; ++i) {
      const int64_t cnt = std::min(kTile, first + i - t0), r = i * G;
      tile_scores<T, kNV>(q_row(i), p.q_stride_head, w.q.data() + r * D, G, D, ktok, koff, kf,
                          w.scores.data());
      for (int64_t g = 0; g < G; ++g) {
        softmax_tile(w.scores.data() + g * kTile, cnt, p.scale, p.softcap, w.m[r + g],
                     w.alpha[r + g], w.tile_sum[r + g]);
      }
      finish_tile<T, kNV>(vtok, voff, cnt, nv, D, G, w.scores.data(), w.alpha.data() + r,
                          w.tile_sum.data() + r, w.l.data() + r, w.acc.data() + r * D, nullptr,
                          nullptr, koff, 0, row_bytes);
    }
  }
  for (int64_t i = 0; i < P; ++i) {
    const int64_t parts = (first + i + kPartition - 1) / kPartition;
    for (int64_t g = 0; g < G; ++g) {
      const int64_t r = i * G + g;
      if (parts == 1) {
        store_out(out_row(i, g), w.acc.data() + r * D, w.l[r], D);
      } else {
        stash(r, parts - 1);
        merge_store(out_row(i, g), parts, [&](int64_t part) { return part_at(r, part); }, D,
                    w.merge.data());
      }
    }
  }
}

// Positions per work item: large blocks read each tile for more rows (long contexts are bound
// by reading the cache), small ones give every thread work. Never changes a result.
constexpr int64_t kMaxBlockRows = 64;
constexpr int64_t kMinBlockRows = 8;
// Floats of split-row partitions a block may hold (16 MiB).
constexpr int64_t kMaxPartialFloats = int64_t{4} << 20;

template <typename T, int kNV>
void run_chunks(const Problem& p, const int64_t* q_starts, int64_t num_seqs) {
  const int64_t Hkv = p.num_kv_heads;
  int64_t rows = 0, work = 0;
  for (int64_t s = 0; s < num_seqs; ++s) {
    const int64_t nq = q_starts[s + 1] - q_starts[s];
    rows += nq;
    work += nq * p.ctx_lens[s] * Hkv;
  }
  const int64_t threads =
      work < kMinParallelWork ? 1 : std::max<int64_t>(1, at::get_num_threads());
  int64_t block = kMaxBlockRows, max_len = 1;
  while (block > kMinBlockRows && (rows + block - 1) / block * Hkv < 4 * threads) block /= 2;
  for (int64_t s = 0; s < num_seqs; ++s) max_len = std::max(max_len, p.ctx_lens[s]);
  // A block keeps every partition of each of its rows until the merge: bounded per thread.
  const int64_t per_position =
      p.group * ((max_len + kPartition - 1) / kPartition) * (p.head_dim + 2);
  while (block > 1 && block * per_position > kMaxPartialFloats) block /= 2;
  std::vector<std::pair<int64_t, ChunkItem>> items;  // (cost, item)
  for (int64_t s = 0; s < num_seqs; ++s) {
    const int64_t nq = q_starts[s + 1] - q_starts[s], first = p.ctx_lens[s] - nq;
    for (int64_t b = 0; b < nq; b += block) {
      const int64_t e = std::min(nq, b + block);
      for (int64_t kh = 0; kh < Hkv; ++kh) items.push_back({(e - b) * (first + e), {s, kh, b, e}});
    }
  }
  // The costliest first, so that the last items handed out are short.
  std::stable_sort(items.begin(), items.end(),
                   [](const auto& a, const auto& b) { return a.first > b.first; });
  const int64_t total = static_cast<int64_t>(items.size());
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min(threads, total), 1, [&](int64_t, int64_t) {
    BlockScratch w;
    for (int64_t it = next.fetch_add(1); it < total; it = next.fetch_add(1)) {
      attend_block<T, kNV>(p, q_starts, items[it].second, w);
    }
  });
}

template <typename T>
void dispatch_chunks(const Problem& p, const int64_t* q_starts, int64_t num_seqs) {
  switch (p.head_dim) {
    case 64:
      return run_chunks<T, 64 / kVLen>(p, q_starts, num_seqs);
    case 128:
      return run_chunks<T, 128 / kVLen>(p, q_starts, num_seqs);
    default:
      return run_chunks<T, 0>(p, q_starts, num_seqs);
  }
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

// Checks shared by both entry points; returns the problem without its rows' tables and lengths.
Problem make_problem(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                     double scale, int64_t window, double softcap, const char* op) {
  TORCH_CHECK(q.device().is_cpu() && k_cache.device().is_cpu() && v_cache.device().is_cpu(), op,
              ": CPU tensors only");
  TORCH_CHECK(q.dim() == 3, "q must be [rows, H, D]");
  TORCH_CHECK(k_cache.dim() == 4 && v_cache.dim() == 4,
              "k_cache, v_cache must be [num_blocks, block_size, H_kv, D]");
  TORCH_CHECK(k_cache.sizes() == v_cache.sizes(), "k_cache and v_cache shapes differ");
  const auto dtype = q.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
              "q must be float32, bfloat16 or float16");
  TORCH_CHECK(k_cache.scalar_type() == dtype && v_cache.scalar_type() == dtype,
              "q, k_cache and v_cache must share a dtype");
  TORCH_CHECK(q.stride(2) == 1, "the last (head_dim) dimension of q must be contiguous");
  const int64_t H = q.size(1), D = q.size(2);
  const int64_t Hkv = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == D, "head_dim of q and the cache differ");
  TORCH_CHECK(Hkv >= 1 && H % Hkv == 0, "num_heads must be a multiple of num_kv_heads");
  TORCH_CHECK(D % 32 == 0 && D <= kMaxHeadDim, "head_dim must be a multiple of 32, at most ",
              kMaxHeadDim, "; got ", D);
  // The kernel walks blocks, tokens and heads through strides but reads each head's D values
  // as one contiguous run.
  TORCH_CHECK(k_cache.stride(3) == 1 && v_cache.stride(3) == 1,
              "the last (head_dim) dimension of the caches must be contiguous");
  TORCH_CHECK(window >= 0, "window must be >= 0 (0: none)");
  TORCH_CHECK(softcap >= 0, "softcap must be >= 0 (0: none)");
  Problem p{};
  p.q = q.data_ptr();
  p.q_stride_row = q.stride(0);
  p.q_stride_head = q.stride(1);
  p.k = k_cache.data_ptr();
  p.v = v_cache.data_ptr();
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
  p.block_size = k_cache.size(1);
  p.scale = static_cast<float>(scale);
  p.window = window;
  p.softcap = static_cast<float>(softcap);
  return p;
}

// A bad table entry would read outside the cache, so every block a row reads is checked: row i
// of [0, rows) reads keys [first_key(i), lens[i]).
template <typename FirstKey>
void check_tables(const int64_t* tp, const int64_t* lp, const char* lens_name, int64_t rows,
                  int64_t max_blocks, int64_t block_size, int64_t num_blocks,
                  FirstKey first_key) {
  for (int64_t b = 0; b < rows; ++b) {
    const int64_t n = lp[b];
    TORCH_CHECK(n >= 1 && n <= max_blocks * block_size, lens_name, "[", b, "] = ", n,
                " is outside [1, max_blocks * block_size = ", max_blocks * block_size, "]");
    // blocks behind a sliding window are never read (their entries may be stale)
    for (int64_t j = first_key(b) / block_size, used = (n + block_size - 1) / block_size;
         j < used; ++j) {
      const int64_t blk = tp[b * max_blocks + j];
      TORCH_CHECK(blk >= 0 && blk < num_blocks, "block_tables[", b, ", ", j, "] = ", blk,
                  " is outside [0, ", num_blocks, ")");
    }
  }
}

template <typename F>
void dispatch_dtype(at::ScalarType dtype, F f) {
  switch (dtype) {
    case at::kFloat:
      return f(float{});
    case at::kBFloat16:
      return f(at::BFloat16{});
    default:
      return f(at::Half{});
  }
}

at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& k_cache,
                                  const at::Tensor& v_cache, const at::Tensor& block_tables,
                                  const at::Tensor& ctx_lens, double scale, int64_t window,
                                  double softcap) {
  Problem p = make_problem(q, k_cache, v_cache, scale, window, softcap, "paged_decode_attention");
  const int64_t B = q.size(0);
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && ctx_lens.scalar_type() == at::kLong,
              "block_tables and ctx_lens must be int64");
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.size(0) == B,
              "block_tables must be [B, max_blocks]");
  TORCH_CHECK(ctx_lens.dim() == 1 && ctx_lens.size(0) == B, "ctx_lens must be [B]");
  TORCH_CHECK(block_tables.device().is_cpu() && ctx_lens.device().is_cpu(),
              "block_tables and ctx_lens must be CPU tensors");

  auto out = at::empty_like(q, at::MemoryFormat::Contiguous);
  if (B == 0) return out;
  const auto tables = block_tables.contiguous();
  const auto lens = ctx_lens.contiguous();
  const int64_t max_blocks = tables.size(1);
  const int64_t* tp = tables.data_ptr<int64_t>();
  const int64_t* lp = lens.data_ptr<int64_t>();
  check_tables(tp, lp, "ctx_lens", B, max_blocks, p.block_size, k_cache.size(0), [&](int64_t b) {
    return window > 0 ? std::max<int64_t>(0, lp[b] - window) : int64_t{0};
  });
  p.out = out.data_ptr();
  p.tables = tp;
  p.ctx_lens = lp;
  p.table_stride = max_blocks;
  dispatch_dtype(q.scalar_type(), [&](auto t) { dispatch_head_dim<decltype(t)>(p, B); });
  return out;
}

at::Tensor paged_chunk_attention(const at::Tensor& q, const at::Tensor& k_cache,
                                 const at::Tensor& v_cache, const at::Tensor& block_tables,
                                 const at::Tensor& seq_lens, const at::Tensor& query_start_loc,
                                 double scale, int64_t window, double softcap) {
  Problem p = make_problem(q, k_cache, v_cache, scale, window, softcap, "paged_chunk_attention");
  const int64_t T = q.size(0), S = seq_lens.numel();
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && seq_lens.scalar_type() == at::kLong &&
                  query_start_loc.scalar_type() == at::kLong,
              "block_tables, seq_lens and query_start_loc must be int64");
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.size(0) == S && seq_lens.dim() == 1,
              "block_tables must be [S, max_blocks] and seq_lens [S]");
  TORCH_CHECK(query_start_loc.dim() == 1 && query_start_loc.size(0) == S + 1,
              "query_start_loc must be [S + 1]");
  TORCH_CHECK(block_tables.device().is_cpu() && seq_lens.device().is_cpu() &&
                  query_start_loc.device().is_cpu(),
              "block_tables, seq_lens and query_start_loc must be CPU tensors");
  auto out = at::empty_like(q, at::MemoryFormat::Contiguous);
  const auto tables = block_tables.contiguous();
  const auto lens = seq_lens.contiguous();
  const auto starts = query_start_loc.contiguous();
  const int64_t* tp = tables.data_ptr<int64_t>();
  const int64_t* lp = lens.data_ptr<int64_t>();
  const int64_t* qs = starts.data_ptr<int64_t>();
  TORCH_CHECK(qs[0] == 0 && qs[S] == T, "query_start_loc must run from 0 to rows = ", T);
  for (int64_t s = 0; s < S; ++s) {
    const int64_t nq = qs[s + 1] - qs[s];
    TORCH_CHECK(nq >= 1 && nq <= lp[s], "sequence ", s, " has ", nq,
                " query rows; must be in [1, seq_lens[", s, "] = ", lp[s], "]");
  }
  if (T == 0) return out;
  const int64_t max_blocks = tables.size(1);
  check_tables(tp, lp, "seq_lens", S, max_blocks, p.block_size, k_cache.size(0), [&](int64_t s) {
    // the sequence's first row reads the earliest keys
    const int64_t n0 = lp[s] - (qs[s + 1] - qs[s]) + 1;
    return window > 0 ? std::max<int64_t>(0, n0 - window) : int64_t{0};
  });
  p.out = out.data_ptr();
  p.tables = tp;
  p.ctx_lens = lp;
  p.table_stride = max_blocks;
  dispatch_dtype(q.scalar_type(), [&](auto t) { dispatch_chunks<decltype(t)>(p, qs, S); });
  return out;
}

}  // namespace

TORCH_LIBRARY(tokenmill_cpu_attn, m) {
  m.def(
      "paged_decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
      "Tensor ctx_lens, float scale, int window=0, float softcap=0.) -> Tensor");
  m.def(
      "paged_chunk_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
      "Tensor seq_lens, Tensor query_start_loc, float scale, int window=0, float softcap=0.) "
      "-> Tensor");
}

TORCH_LIBRARY_IMPL(tokenmill_cpu_attn, CPU, m) {
  m.impl("paged_decode_attention", &paged_decode_attention);
  m.impl("paged_chunk_attention", &paged_chunk_attention);
}
