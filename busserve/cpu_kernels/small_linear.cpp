// Linear layers for the few rows of a decode step, bf16 on x86 CPUs with AMX: y = x · Wᵀ (+ b), the weights
// streamed once per call at what one core can read.
//
// Why it exists: a CPU decode step is the weights streaming through the matmuls (the 135M model reads ~270 MB per
// step). oneDNN's packed bf16 linear (engine/packed_linear.py) streams them at ~10 GB/s for 1-16 rows on one core
// of the benchmark machine; this kernel reads the same bytes at ~15 GB/s, about what the core streams at all
// (a plain sum over the same 270 MB: 12-14 GB/s), so the linear layers of a decode step take ~18 ms instead of
// ~26 (docs/BENCHMARKS.md, "Decode-step linears on AMX"; benchmarks/linear_rows_bench.py). From ~128 rows on
// oneDNN's blocked kernels are faster (17% at 256), so prefill stays there: packed_linear.py picks by row count.
//
// Layout ("VNNI", what AMX's bf16 tiles consume): W [N, K] is packed once into [N/16 blocks][K/2 pairs][16][2],
// zero-padded to whole blocks, so the 16 pairs of one 32-wide K step of a block are one contiguous 1 KB B tile.
// x rows are A tiles as they lie (row stride = x's). Accumulation is fp32 in the C tiles and the output is rounded
// to bf16 once; for 1-16 rows of the model's shapes the products came out bit-identical to oneDNN's in our checks,
// though nothing promises it (tests/engine/test_small_linear.py holds the kernel to a fp32 reference).
//
// Loop: groups of three output blocks split across threads (at::parallel_for); per group, each tile of up to 16
// rows of x runs the K loop with three C tiles, one A tile and three B tiles (7 of AMX's 8). Each thread loads
// its own tile configuration and releases the tiles when done, so oneDNN's own AMX kernels find them free.
// Built by busserve/cpu_kernels/__init__.py; registered as torch.ops.busserve.{small_linear_available, pack_vnni,
// small_linear}.

#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>

namespace {

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
constexpr bool kBuiltWithAmx = true;

// Linux hands a process AMX's tile state only when asked (arch_prctl ARCH_REQ_XCOMP_PERM, XTILEDATA); oneDNN asks
// too, and asking twice is harmless.
bool amx_permitted() {
  static const bool ok = [] {
    constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return ok;
}

struct alignas(64) TileConfig {
  uint8_t palette_id = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

constexpr int kGroup = 3;  // output blocks per pass: C tiles 0-2, A tile 3, B tiles 4-6

void configure(int rows) {
  TileConfig cfg;
  for (int t = 0; t < kGroup; ++t) { cfg.rows[t] = rows; cfg.colsb[t] = 64; }                  // C: rows x 16 fp32
  cfg.rows[kGroup] = rows; cfg.colsb[kGroup] = 64;                                             // A: rows x 32 bf16
  for (int t = kGroup + 1; t <= 2 * kGroup; ++t) { cfg.rows[t] = 16; cfg.colsb[t] = 64; }     // B: 16 pairs x 16 x 2
  _tile_loadconfig(&cfg);
}

// Rows [m0, m0 + rows) of x against output blocks [b0, b0 + NB).
template <int NB>
void tile_rows(const c10::BFloat16* x, int64_t x_stride, int64_t k, const c10::BFloat16* w, int64_t kp, int64_t b0,
               int64_t m0, int rows, int64_t n, const float* bias, c10::BFloat16* out) {
  _tile_zero(0);
  if constexpr (NB > 1) _tile_zero(1);
  if constexpr (NB > 2) _tile_zero(2);
  const c10::BFloat16* xr = x + m0 * x_stride;
  const c10::BFloat16* wb = w + b0 * kp * 32;
  for (int64_t s = 0; s < k / 32; ++s) {
    _tile_loadd(3, xr + 32 * s, x_stride * 2);
    _tile_loadd(4, wb + 16 * s * 32, 64);
    _tile_dpbf16ps(0, 3, 4);
    if constexpr (NB > 1) {
      _tile_loadd(5, wb + (kp + 16 * s) * 32, 64);
      _tile_dpbf16ps(1, 3, 5);
    }
    if constexpr (NB > 2) {
      _tile_loadd(6, wb + (2 * kp + 16 * s) * 32, 64);
      _tile_dpbf16ps(2, 3, 6);
    }
  }
  alignas(64) float c[NB][16][16];
  _tile_stored(0, c[0], 64);
  if constexpr (NB > 1) _tile_stored(1, c[1], 64);
  if constexpr (NB > 2) _tile_stored(2, c[2], 64);
  for (int j = 0; j < NB; ++j) {
    const int64_t n0 = (b0 + j) * 16;
    const int64_t valid = std::min<int64_t>(16, n - n0);
    const __mmask16 mask = valid >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << valid) - 1);
    const __m512 b = bias ? _mm512_maskz_loadu_ps(mask, bias + n0) : _mm512_setzero_ps();
    for (int i = 0; i < rows; ++i) {
      const __m256i y = (__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(_mm512_load_ps(c[j][i]), b));
      _mm256_mask_storeu_epi16(out + (m0 + i) * n + n0, mask, y);
    }
  }
}

void run(const c10::BFloat16* x, int64_t x_stride, int64_t m, int64_t k, const c10::BFloat16* w, int64_t blocks,
         int64_t n, const float* bias, c10::BFloat16* out) {
  const int64_t kp = k / 2;
  at::parallel_for(0, (blocks + kGroup - 1) / kGroup, 1, [&](int64_t begin, int64_t end) {
    int configured = 0;
    for (int64_t g = begin; g < end; ++g) {
      const int64_t b0 = g * kGroup, nb = std::min<int64_t>(kGroup, blocks - b0);
      // Tiles of 16 rows, then the rest: the group's weights come from memory for the first and from cache after.
      for (int64_t m0 = 0; m0 < m; m0 += 16) {
        const int rows = static_cast<int>(std::min<int64_t>(16, m - m0));
        if (rows != configured) {
          configure(rows);
          configured = rows;
        }
        if (nb == 3) tile_rows<3>(x, x_stride, k, w, kp, b0, m0, rows, n, bias, out);
        else if (nb == 2) tile_rows<2>(x, x_stride, k, w, kp, b0, m0, rows, n, bias, out);
        else tile_rows<1>(x, x_stride, k, w, kp, b0, m0, rows, n, bias, out);
      }
    }
    if (configured) _tile_release();
  });
}
#else
constexpr bool kBuiltWithAmx = false;
bool amx_permitted() { return false; }
#endif

bool small_linear_available() { return kBuiltWithAmx && amx_permitted(); }

at::Tensor pack_vnni(const at::Tensor& w) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kBFloat16, "pack_vnni: weight must be 2-D bfloat16");
  const int64_t n = w.size(0), k = w.size(1);
  TORCH_CHECK(k % 32 == 0 && k > 0, "pack_vnni: in_features must be a positive multiple of 32, got ", k);
  const int64_t blocks = (n + 15) / 16;
  at::Tensor src = at::zeros({blocks * 16, k}, w.options());
  src.narrow(0, 0, n).copy_(w);
  // [blocks, 16, k/2, 2] -> [blocks, k/2, 16, 2]
  return src.view({blocks, 16, k / 2, 2}).permute({0, 2, 1, 3}).contiguous();
}

at::Tensor small_linear(const at::Tensor& x, const at::Tensor& packed, int64_t n,
                        const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(small_linear_available(), "small_linear: needs AMX (a CPU with amx_bf16 and the kernel built for it)");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16 && x.stride(1) == 1,
              "small_linear: x must be 2-D bfloat16 with contiguous rows");
  TORCH_CHECK(packed.dim() == 4 && packed.scalar_type() == at::kBFloat16 && packed.is_contiguous() &&
                  packed.size(2) == 16 && packed.size(3) == 2,
              "small_linear: the weight must come from pack_vnni");
  const int64_t m = x.size(0), k = x.size(1), blocks = packed.size(0);
  TORCH_CHECK(k == 2 * packed.size(1) && n > 0 && (n + 15) / 16 == blocks, "small_linear: x has ", k,
              " features and n = ", n, ", the weight packs ", 2 * packed.size(1), " x ", 16 * blocks);
  at::Tensor out = at::empty({m, n}, x.options());
  at::Tensor b32;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->numel() == n, "small_linear: bias has ", bias->numel(), " elements, expected ", n);
    b32 = bias->to(at::kFloat).contiguous();
  }
#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
  if (m > 0)
    run(x.data_ptr<c10::BFloat16>(), x.stride(0), m, k, packed.data_ptr<c10::BFloat16>(), blocks, n,
        b32.defined() ? b32.data_ptr<float>() : nullptr, out.data_ptr<c10::BFloat16>());
#endif
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(busserve, m) {
  m.def("small_linear_available() -> bool", &small_linear_available);
  m.def("pack_vnni(Tensor w) -> Tensor");
  m.def("small_linear(Tensor x, Tensor packed, int n, Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(busserve, CPU, m) {
  m.impl("pack_vnni", &pack_vnni);
  m.impl("small_linear", &small_linear);
}
