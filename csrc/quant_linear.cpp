// Weight-only quantized linear for CPU (tokenmill_cpu_quant): y = x W^T with W kept in 4-bit or
// 8-bit blocks of 32 along K, never dequantized to a matrix.
//
// quant_linear(x [M, K] float32/bfloat16, packed [T, K/32, rec] uint8, n, bits) -> y [M, n]
//   (from kAmxMinRows rows on the AMX path of quant_amx.h where the CPU has AMX: the same bits)
// quant_linear_vnni / quant_linear_amx: the same on one path (tests, benchmarks); amx_usable()
// grouped_quant_linear(x [M, K], packed[G], counts[G], n, bits) -> y [M, n]: row group g (the
//   next counts[g] rows) times packed[g], the matmul of every active expert of a MoE layer
// fill_gguf_tiles(packed, blocks, fmt, rows, row0): GGUF blocks written into packed's rows
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
// grouped_quant_linear stays on the VNNI kernel (MoE expert groups are mostly a few rows).
#include "quant_tiles.h"
#include "quant_amx.h"

#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

namespace {

#ifdef TOKENMILL_HAS_VNNI

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

// quant_linear on the VNNI tile kernel (amx false) or the AMX path (bit-identical, see
// quant_amx.h; the caller checks amx_usable()).
at::Tensor quant_linear_on(const at::Tensor& x, const at::Tensor& packed, int64_t n, int64_t bits,
                           bool amx) {
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
  TORCH_CHECK(!amx || amx_usable(), "quant_linear_amx: AMX is not usable on this host");
  auto y = at::empty({M, n}, x.options());  // written in x's dtype by the tile kernel
  if (M == 0) return y;
  // Per-call scratch for the quantized activations, kept by the calling thread: at decode a
  // call is ~20-60 us, and three allocations were a tenth of it.
  thread_local std::vector<int8_t> xq;
  thread_local std::vector<float> dx, sx;
  const uint8_t* w = packed.data_ptr<uint8_t>();
  auto run = [&](auto* xp, auto* yp) {
    using OutT = std::remove_pointer_t<decltype(yp)>;
#ifdef TOKENMILL_HAS_AMX
    if (amx) {
      // The AMX path reads whole tiles of 16 rows: the rows past M are zeros (their results
      // are dropped).
      const int64_t Mp = (M + 15) / 16 * 16;
      thread_local std::vector<float> ds;
      ds.resize(Mp * nb * 2);
      xq.resize(Mp * K);
      amx_quantize_activations(xp, M, Mp, K, xq.data(), ds.data());
      (bits == 4 ? amx_run_tiles<4, OutT> : amx_run_tiles<8, OutT>)(w, T, nb, n, xq.data(),
                                                                    ds.data(), M, Mp, K, yp);
      return;
    }
#endif
    xq.resize(M * K);
    dx.resize(M * nb);
    sx.resize(M * nb);
    quantize_activations(xp, M, K, xq.data(), dx.data(), sx.data());
    (bits == 4 ? run_tiles<4, OutT> : run_tiles<8, OutT>)(w, T, nb, n, xq.data(), dx.data(),
                                                          sx.data(), M, K, yp);
  };
  if (x.scalar_type() == at::kFloat)
    run(x.data_ptr<float>(), y.data_ptr<float>());
  else
    run(x.data_ptr<at::BFloat16>(), y.data_ptr<at::BFloat16>());
  return y;
#endif
}

// From this many rows (prompt chunks, large decode batches) quant_linear takes the AMX path where
// it is usable: measured faster than the VNNI kernel from ~32 rows on a Xeon with AMX (below,
// its 16-row tiles are mostly padding). Either path gives the same bits.
constexpr int64_t kAmxMinRows = 32;

at::Tensor quant_linear(const at::Tensor& x, const at::Tensor& packed, int64_t n, int64_t bits) {
  const bool amx = x.dim() == 2 && x.size(0) >= kAmxMinRows && amx_usable();
  return quant_linear_on(x, packed, n, bits, amx);
}

at::Tensor quant_linear_vnni(const at::Tensor& x, const at::Tensor& packed, int64_t n,
                             int64_t bits) {
  return quant_linear_on(x, packed, n, bits, false);
}

at::Tensor quant_linear_amx(const at::Tensor& x, const at::Tensor& packed, int64_t n,
                            int64_t bits) {
  return quant_linear_on(x, packed, n, bits, true);
}

bool quant_amx_usable() { return amx_usable(); }

// Expert-grouped quantized linear (a mixture-of-experts layer's matmul in one call): x's rows
// are grouped, group g being the next counts[g] rows, and group g is multiplied by packed[g]
// (all with the same n, K and bits). The activations are quantized once; one parallel loop
// runs over every (group, tile) pair, so the active experts of a layer share the threads
// without a call, a thread pool wake-up and an allocation per expert. Each group's rows go
// through run_tile exactly as quant_linear(x[group rows], packed[g]) sends them (passes of
// kMR rows from the group's first row), so the results are bit-identical to that.
at::Tensor grouped_quant_linear(const at::Tensor& x, at::TensorList packed, at::IntArrayRef counts,
                                int64_t n, int64_t bits) {
#ifndef TOKENMILL_HAS_VNNI
  TORCH_CHECK(false, "tokenmill_cpu_quant was built without AVX512-VNNI");
#else
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 && x.is_contiguous(),
              "grouped_quant_linear: x must be a contiguous CPU [M, K]");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "grouped_quant_linear: x must be float32 or bfloat16");
  TORCH_CHECK(bits == 4 || bits == 8, "grouped_quant_linear: bits must be 4 or 8");
  TORCH_CHECK(packed.size() == counts.size(), "grouped_quant_linear: ", packed.size(),
              " weights for ", counts.size(), " groups");
  const int64_t M = x.size(0), K = x.size(1), nb = K / kBlock, G = counts.size();
  const int64_t rec = kRows * kBlock * bits / 8 + 2 * kRows * 2;
  const int64_t T = (n + kRows - 1) / kRows;
  TORCH_CHECK(K % kBlock == 0 && n > 0, "grouped_quant_linear: K = ", K, ", n = ", n);
  std::vector<int64_t> offsets(G + 1, 0);  // group g: rows [offsets[g], offsets[g + 1])
  std::vector<const uint8_t*> weights(G);
  for (int64_t g = 0; g < G; ++g) {
    const at::Tensor& w = packed[g];
    TORCH_CHECK(counts[g] >= 0, "grouped_quant_linear: negative count");
    offsets[g + 1] = offsets[g] + counts[g];
    TORCH_CHECK(w.device().is_cpu() && w.scalar_type() == at::kByte && w.dim() == 3 &&
                    w.is_contiguous() && w.size(0) == T && w.size(1) == nb && w.size(2) == rec,
                "grouped_quant_linear: weight ", g, " is not a packed [", T, ", ", nb, ", ", rec,
                "] uint8 tensor");
    weights[g] = w.data_ptr<uint8_t>();
  }
  TORCH_CHECK(offsets[G] == M, "grouped_quant_linear: counts add up to ", offsets[G], ", not ", M);
  auto y = at::empty({M, n}, x.options());
  if (M == 0) return y;
  thread_local std::vector<int8_t> xq;
  thread_local std::vector<float> dx, sx;
  xq.resize(M * K);
  dx.resize(M * nb);
  sx.resize(M * nb);
  std::vector<int64_t> active;  // the groups with rows: work item i is (active[i / T], i % T)
  for (int64_t g = 0; g < G; ++g)
    if (counts[g] > 0) active.push_back(g);
  const int64_t items = static_cast<int64_t>(active.size()) * T;
  const int64_t grain = std::max<int64_t>(1, items / (4 * at::get_num_threads()));
  // Pointers taken here: inside the parallel loop `xq` would name the worker's own thread_local.
  int8_t* xqp = xq.data();
  float* dxp = dx.data();
  float* sxp = sx.data();
  auto run = [&](auto* xp, auto* yp, auto tile) {
    quantize_activations(xp, M, K, xqp, dxp, sxp);
    at::parallel_for(0, items, grain, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t g = active[i / T], m0 = offsets[g];
        tile(weights[g], i % T, nb, n, xqp + m0 * K, dxp + m0 * nb, sxp + m0 * nb, counts[g], K,
             yp + m0 * n);
      }
    });
  };
  if (x.scalar_type() == at::kFloat)
    run(x.data_ptr<float>(), y.data_ptr<float>(), bits == 4 ? run_tile<4, float> : run_tile<8, float>);
  else
    run(x.data_ptr<at::BFloat16>(), y.data_ptr<at::BFloat16>(),
        bits == 4 ? run_tile<4, at::BFloat16> : run_tile<8, at::BFloat16>);
  return y;
#endif
}

// GGUF blocks (fmt 0: Q4_0, 1: Q4_1, 2: Q8_0; blocks [rows, nb * block bytes] uint8) written
// into rows row0 .. row0 + rows of packed (row0 a multiple of 16), in place: the record's
// weight bytes are the GGUF quant bytes rearranged (a 4-bit byte 4j + c already holds elements
// 4j + c and 16 + 4j + c; Q8_0's int8 + 128 is the byte XOR 0x80), d is copied, and m is
// Q4_1's or -8 d / -128 d rounded to fp16 as torch rounds it (the products are exact). What
// quant/gguf_tiles.py does with torch ops, for an offloaded expert's slot load.
void fill_gguf_tiles(at::Tensor packed, const at::Tensor& blocks, int64_t fmt, int64_t rows,
                     int64_t row0) {
  TORCH_CHECK(fmt >= 0 && fmt <= 2, "fill_gguf_tiles: unknown format ", fmt);
  TORCH_CHECK(packed.dim() == 3 && packed.is_contiguous() && packed.scalar_type() == at::kByte,
              "fill_gguf_tiles: packed must be contiguous uint8 [tiles, nb, record]");
  const int64_t nb = packed.size(1), record = packed.size(2);
  const int64_t size = fmt == 0 ? 18 : fmt == 1 ? 20 : 34;
  const int64_t qoff = fmt == 1 ? 4 : 2, qbytes = fmt == 2 ? 32 : 16;
  const int64_t wbytes = kRows * qbytes;
  TORCH_CHECK(blocks.scalar_type() == at::kByte && blocks.is_contiguous() &&
                  blocks.numel() == rows * nb * size,
              "fill_gguf_tiles: blocks must be contiguous uint8 of rows x nb blocks");
  TORCH_CHECK(record == wbytes + 4 * kRows && row0 % kRows == 0 &&
                  row0 + rows <= packed.size(0) * kRows,
              "fill_gguf_tiles: rows do not fit the packed layout");
  const uint8_t* src = blocks.data_ptr<uint8_t>();
  uint8_t* dst = packed.data_ptr<uint8_t>();
  const float scale = fmt == 2 ? -128.0f : -8.0f;
  const int64_t tiles = (rows + kRows - 1) / kRows, t0 = row0 / kRows;
  // Record by record (each written whole, by one thread), its rows read from 16 block rows.
  at::parallel_for(0, tiles, 16, [&](int64_t tile0, int64_t tile1) {
    for (int64_t t = tile0; t < tile1; ++t) {
      const int64_t nrows = std::min(kRows, rows - t * kRows);
      for (int64_t b = 0; b < nb; ++b) {
        uint8_t* rec = dst + ((t0 + t) * nb + b) * record;
        for (int64_t tr = 0; tr < nrows; ++tr) {
          const uint8_t* s = src + ((t * kRows + tr) * nb + b) * size;
          for (int64_t j = 0; j < qbytes / 4; ++j) {
            uint32_t w;
            std::memcpy(&w, s + qoff + 4 * j, 4);
            if (fmt == 2) w ^= 0x80808080u;
            std::memcpy(rec + (j * kRows + tr) * 4, &w, 4);
          }
          c10::Half d, m;
          std::memcpy(&d, s, 2);
          if (fmt == 1)
            std::memcpy(&m, s + 2, 2);
          else
            m = c10::Half(static_cast<float>(d) * scale);
          std::memcpy(rec + wbytes + 2 * tr, &d, 2);
          std::memcpy(rec + wbytes + 2 * kRows + 2 * tr, &m, 2);
        }
      }
    }
  });
}

}  // namespace

TORCH_LIBRARY(tokenmill_cpu_quant, m) {
  m.def("quant_linear(Tensor x, Tensor packed, int n, int bits) -> Tensor");
  m.def("quant_linear_vnni(Tensor x, Tensor packed, int n, int bits) -> Tensor");
  m.def("quant_linear_amx(Tensor x, Tensor packed, int n, int bits) -> Tensor");
  m.def("amx_usable() -> bool", &quant_amx_usable);
  m.def("dequantize_packed(Tensor packed, int n, int bits) -> Tensor");
  m.def("grouped_quant_linear(Tensor x, Tensor[] packed, int[] counts, int n, int bits) -> Tensor");
  m.def("fill_gguf_tiles(Tensor(a!) packed, Tensor blocks, int fmt, int rows, int row0) -> ()");
}

TORCH_LIBRARY_IMPL(tokenmill_cpu_quant, CPU, m) {
  m.impl("quant_linear", &quant_linear);
  m.impl("quant_linear_vnni", &quant_linear_vnni);
  m.impl("quant_linear_amx", &quant_linear_amx);
  m.impl("dequantize_packed", &dequantize_packed);
  m.impl("grouped_quant_linear", &grouped_quant_linear);
  m.impl("fill_gguf_tiles", &fill_gguf_tiles);
}
