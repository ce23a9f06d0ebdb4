// The AMX int8 path of quant_linear (csrc/quant_linear.cpp, which describes the packed layout):
// for prompt chunks on CPUs with AMX, bit-identical to the AVX512-VNNI tile kernel
// (quant_tiles.h) for every output element.
//
// Why identical: per (activation row m, output row n, block b) both compute the exact int32 dot
// product sum_k xq[m, k] q[n, k] over the block's 32 columns (|sum| <= 32 * 255 * 128 < 2^31,
// so every summation order gives the same integer), then the same float operations in the same
// order: scale = d[n] * dx[m, b]; acc = fma(float(dot), scale, acc); acc = fma(mo[n], sx[m, b],
// acc), blocks in order, with the same intrinsics on the same 16-lane vectors of output rows.
//
// The integer part is one TDPBSUD per (16 activation rows, tile of 16 output rows, block):
// A (signed bytes) = 16 rows of xq x the block's 32 columns (quantized straight into a layout
// where each A tile's 512 bytes are contiguous, amx_quantize_activations);
// B (unsigned bytes) = the record's weights, whose layout is already AMX's "VNNI" B layout
// (row j = 64 bytes: for each of the 16 output rows its 4 weights k = 4j .. 4j + 3); 4-bit
// records are widened to bytes once per tile and call. C [16 act rows][16 out rows] int32 is
// stored and each of its rows is one vector of tile_kernel's accumulator layout.
//
// AMX must be granted by the kernel (arch_prctl, once per process) and some hosts advertise it
// yet fault on use, so amx_usable() probes a tiny product under a SIGILL/SIGSEGV handler once;
// callers fall back to the VNNI kernel where it is false. The tile configuration is per thread:
// every worker loads it at the start of its share and releases it at the end.
#pragma once

#include "quant_tiles.h"

#if defined(TOKENMILL_HAS_VNNI) && defined(__x86_64__) && defined(__linux__) && \
    (defined(__clang__) || __GNUC__ >= 11)
#define TOKENMILL_HAS_AMX 1
#include <cpuid.h>
#include <setjmp.h>
#include <signal.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <mutex>
#endif

namespace {

#ifdef TOKENMILL_HAS_AMX

constexpr int64_t kAmxRows = 16;  // activation rows per C tile
constexpr int64_t kAmxATile = kAmxRows * kBlock;  // bytes of one A tile
#define TOKENMILL_AMX_TARGET __attribute__((target("amx-tile,amx-int8")))

// Tiles: 0-3 = C (four blocks in flight), 4, 5 = A (activations), 6, 7 = B (weights).
struct alignas(64) AmxConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {64, 64, 64, 64, 32, 32, 64, 64};
  uint8_t rows[16] = {16, 16, 16, 16, 16, 16, 8, 8};
};

TOKENMILL_AMX_TARGET inline void amx_begin() {
  static const AmxConfig cfg;
  _tile_loadconfig(&cfg);
}
TOKENMILL_AMX_TARGET inline void amx_end() { _tile_release(); }

// Block b's dot products into C tile `c`: A = xq rows [16 x 32], B = weights [8 x 64].
#define TOKENMILL_AMX_DOT(c, a, bt, b)         \
  do {                                         \
    _tile_loadd(a, xm + (b) * kAmxATile, kBlock); \
    _tile_loadd(bt, wb + (b) * wstride, 64);   \
    _tile_dpbsud(c, a, bt);                    \
  } while (0)

// The float part of one block for 16 activation rows: tile_kernel's operations exactly.
// ds: the 16 rows' dx, then their sx, for this block (see amx_quantize_activations).
inline void amx_float_block(const int32_t (*c)[kRows], const __m512 d, const __m512 mo,
                            const float* ds, __m512* acc) {
#pragma GCC unroll 16
  for (int i = 0; i < kAmxRows; ++i) {
    const __m512 scale = _mm512_mul_ps(d, _mm512_set1_ps(ds[i]));
    acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_load_si512(c[i])), scale, acc[i]);
    acc[i] = _mm512_fmadd_ps(mo, _mm512_set1_ps(ds[kAmxRows + i]), acc[i]);
  }
}

constexpr int64_t kAmxChunk = 8;  // blocks whose dot products are stored before their float part

// The integer part of blocks [b0, b1) for 16 activation rows xm (A tiles) into c: four
// blocks at a time, their stores after all four products (each store waits for its product).
TOKENMILL_AMX_TARGET inline void amx_dots(const int8_t* xm, const uint8_t* wb,
                                          int64_t wstride, int64_t b0, int64_t b1,
                                          int32_t (*c)[kAmxRows][kRows]) {
  int64_t b = b0;
  for (; b + 3 < b1; b += 4) {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    TOKENMILL_AMX_DOT(0, 4, 6, b);
    TOKENMILL_AMX_DOT(1, 5, 7, b + 1);
    TOKENMILL_AMX_DOT(2, 4, 6, b + 2);
    TOKENMILL_AMX_DOT(3, 5, 7, b + 3);
    _tile_stored(0, c[b - b0], 64);
    _tile_stored(1, c[b + 1 - b0], 64);
    _tile_stored(2, c[b + 2 - b0], 64);
    _tile_stored(3, c[b + 3 - b0], 64);
  }
  for (; b < b1; ++b) {
    _tile_zero(0);
    TOKENMILL_AMX_DOT(0, 4, 6, b);
    _tile_stored(0, c[b - b0], 64);
  }
}

// Output tile t (16 rows of n) for activation rows [0, Mp) (Mp a multiple of 16; xq and ds,
// in amx_quantize_activations' layout, hold Mp rows; the rows past M are padding whose results
// are dropped). `wb` holds the tile's nb weight blocks as bytes (B layout, 512 bytes each; for
// 8 bits the packed records' weights themselves, record stride wstride). Per chunk of
// kAmxChunk blocks the dot products (four in flight), then their float part. (Issuing the next
// chunk's, or block b + 4's, dot products before block b's float part measured no faster on a
// Xeon with AMX: each switch between AVX-512 and AMX instructions costs ~20 cycles.)
template <typename OutT>
TOKENMILL_AMX_TARGET void amx_tile(const uint8_t* rec0, int64_t rec_bytes, int64_t w_bytes,
                                   const uint8_t* wb, int64_t wstride, int64_t nb,
                                   const int8_t* xq, const float* ds, int64_t M,
                                   int64_t Mp, int64_t K, OutT* y, int64_t ldy, int64_t nvalid) {
  alignas(64) int32_t c[kAmxChunk][kAmxRows][kRows];
  const __mmask16 mask = nvalid >= kRows ? 0xFFFF : static_cast<__mmask16>((1u << nvalid) - 1);
  for (int64_t m = 0; m < Mp; m += kAmxRows) {
    __m512 acc[kAmxRows];
    for (int i = 0; i < kAmxRows; ++i) acc[i] = _mm512_setzero_ps();
    const int8_t* xm = xq + m * K;  // this tile's [nb][16][32] A tiles
    const float* dsm = ds + m * nb * 2;
    for (int64_t b0 = 0; b0 < nb; b0 += kAmxChunk) {
      const int64_t b1 = std::min(nb, b0 + kAmxChunk);
      amx_dots(xm, wb, wstride, b0, b1, c);
      for (int64_t b = b0; b < b1; ++b) {
        const uint8_t* rec = rec0 + b * rec_bytes;
        const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(rec + w_bytes)));
        const __m512 mo = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(rec + w_bytes + 32)));
        amx_float_block(c[b - b0], d, mo, dsm + b * 2 * kAmxRows, acc);
      }
    }
    const int64_t rows = std::min<int64_t>(kAmxRows, M - m);
    for (int64_t i = 0; i < rows; ++i) store_row16(y + (m + i) * ldy, mask, acc[i]);
  }
}

// 4-bit records -> the B layout in bytes: vector p < 4 holds quad p in its low nibbles and
// quad p + 4 in its high ones (see quant_linear.cpp), B row j is quad j.
inline void widen_nibbles(const uint8_t* rec, uint8_t* out) {
  const __m512i nib = _mm512_set1_epi8(0x0F);
  for (int p = 0; p < 4; ++p) {
    const __m512i v = _mm512_loadu_si512(rec + 64 * p);
    _mm512_store_si512(out + 64 * p, _mm512_and_si512(v, nib));
    _mm512_store_si512(out + 64 * (p + 4), _mm512_and_si512(_mm512_srli_epi16(v, 4), nib));
  }
}

// x [M, K] quantized as quantize_activations does, straight into the AMX layouts (Mp = M
// rounded up to 16; rows past M are zeros with zero scales):
//   xa [Mp / 16][nb][16 rows][32]: each A tile's 512 bytes contiguous (8 cache lines per tile
//      load instead of 16 half-used ones);
//   ds [Mp / 16][nb][dx of the 16 rows, sx of the 16 rows]: the float part reads a block's
//      scales at fixed offsets from one pointer.
template <typename T>
void amx_quantize_activations(const T* x, int64_t M, int64_t Mp, int64_t K, int8_t* xa,
                              float* ds) {
  const int64_t nb = K / kBlock;
  at::parallel_for(0, Mp / kAmxRows, 1, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      for (int64_t i = 0; i < kAmxRows; ++i) {
        const int64_t m = g * kAmxRows + i;
        for (int64_t b = 0; b < nb; ++b) {
          int8_t* dst = xa + (g * nb + b) * kAmxATile + i * kBlock;
          float* sb = ds + (g * nb + b) * 2 * kAmxRows;
          if (m < M) {
            quantize_block(x + m * K + b * kBlock, dst, sb[i], sb[kAmxRows + i]);
          } else {
            std::memset(dst, 0, kBlock);
            sb[i] = sb[kAmxRows + i] = 0.0f;
          }
        }
      }
    }
  });
}

// y [M, n] for xq of Mp = M rounded up to 16 rows (padding rows zero) and ds, both as
// amx_quantize_activations lays them out.
template <int BITS, typename OutT>
TOKENMILL_AMX_TARGET void amx_run_tiles(const uint8_t* packed, int64_t T, int64_t nb, int64_t n,
                                        const int8_t* xq, const float* ds,
                                        int64_t M, int64_t Mp, int64_t K, OutT* y) {
  constexpr int64_t kWBytes = kRows * kBlock * BITS / 8;
  constexpr int64_t kRec = kWBytes + 2 * kRows * 2;
  const int64_t grain = std::max<int64_t>(1, T / (4 * at::get_num_threads()));
  at::parallel_for(0, T, grain, [&](int64_t t0, int64_t t1) {
    uint8_t* wide = nullptr;
    struct alignas(64) WideBlock {
      uint8_t bytes[512];
    };
    std::vector<WideBlock> wide_buf;  // the tile's blocks as bytes (4-bit only; aligned new)
    if constexpr (BITS == 4) {
      wide_buf.resize(nb);
      wide = reinterpret_cast<uint8_t*>(wide_buf.data());
    }
    amx_begin();
    for (int64_t t = t0; t < t1; ++t) {
      const uint8_t* rec = packed + t * nb * kRec;
      const int64_t nvalid = std::min<int64_t>(kRows, n - t * kRows);
      if constexpr (BITS == 4) {
        for (int64_t b = 0; b < nb; ++b) widen_nibbles(rec + b * kRec, wide + b * 512);
        amx_tile<OutT>(rec, kRec, kWBytes, wide, 512, nb, xq, ds, M, Mp, K, y + t * kRows,
                       n, nvalid);
      } else {
        amx_tile<OutT>(rec, kRec, kWBytes, rec, kRec, nb, xq, ds, M, Mp, K, y + t * kRows,
                       n, nvalid);
      }
    }
    amx_end();
  });
}

// A tiny product against its scalar value (both signs, the whole u8 range).
TOKENMILL_AMX_TARGET bool amx_probe_product() {
  alignas(64) int8_t a[kAmxRows][kBlock];
  alignas(64) uint8_t w[8][64];
  alignas(64) int32_t c[kAmxRows][kRows];
  for (int i = 0; i < kAmxRows; ++i)
    for (int k = 0; k < kBlock; ++k) a[i][k] = static_cast<int8_t>((i * 37 + k * 11) % 256 - 128);
  for (int j = 0; j < 8; ++j)
    for (int e = 0; e < 64; ++e) w[j][e] = static_cast<uint8_t>((j * 53 + e * 29) % 256);
  amx_begin();
  _tile_zero(0);
  _tile_loadd(4, a, kBlock);
  _tile_loadd(6, w, 64);
  _tile_dpbsud(0, 4, 6);
  _tile_stored(0, c, 64);
  amx_end();
  for (int i = 0; i < kAmxRows; ++i)
    for (int r = 0; r < kRows; ++r) {
      int32_t s = 0;
      for (int k = 0; k < kBlock; ++k) s += a[i][k] * w[k / 4][4 * r + k % 4];
      if (s != c[i][r]) return false;
    }
  return true;
}

sigjmp_buf amx_probe_jump;
void amx_probe_fault(int) { siglongjmp(amx_probe_jump, 1); }

bool amx_probe() {
  unsigned a, b, c, d;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
  if (!(d & (1u << 24)) || !(d & (1u << 25))) return false;  // AMX-TILE, AMX-INT8
  constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  if (syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) != 0) return false;
  struct sigaction fault = {}, old_ill = {}, old_segv = {}, old_bus = {};
  fault.sa_handler = amx_probe_fault;
  sigemptyset(&fault.sa_mask);
  sigaction(SIGILL, &fault, &old_ill);
  sigaction(SIGSEGV, &fault, &old_segv);
  sigaction(SIGBUS, &fault, &old_bus);
  volatile bool ok = false;  // volatile: read after a siglongjmp
  if (sigsetjmp(amx_probe_jump, 1) == 0) ok = amx_probe_product();
  sigaction(SIGILL, &old_ill, nullptr);
  sigaction(SIGSEGV, &old_segv, nullptr);
  sigaction(SIGBUS, &old_bus, nullptr);
  return ok;
}

// Whether the AMX path may run in this process (probed once, on the first call;
// TOKENMILL_NO_AMX=1 turns it off).
bool amx_usable() {
  static std::once_flag once;
  static bool usable = false;
  std::call_once(once, [] {
    const char* off = std::getenv("TOKENMILL_NO_AMX");
    usable = !(off && *off && std::strcmp(off, "0") != 0) && amx_probe();
  });
  return usable;
}

#else

inline bool amx_usable() { return false; }

#endif  // TOKENMILL_HAS_AMX

}  // namespace
