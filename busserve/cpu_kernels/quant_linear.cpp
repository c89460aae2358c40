// Weight-only quantized linear layers on x86 CPUs with AVX-512: y = x · dequant(W)ᵀ (+ b), the weights read at
// their quantized size and dequantized in registers (MARLIN's principle, on a CPU).
//
// Why it exists: a CPU decode step is the weights streaming through the matmuls. The 135M model's linear weights
// are ~210 MB in bf16 but ~66 MB as the GGUF's Q4_1; reading them at their own size is what keeps one stream as
// fast as llama.cpp (docs/BENCHMARKS.md, "Quantized weights").
//
// Layouts (engine/quantized.py converts every supported GGUF type into one of them; the tests hold both to a
// torch reference):
//  * int4: W [N, K] as uint8 [N, K/2], groups of 32 weights along K in 16 bytes — byte t holds weight t in its
//    low nibble and weight t+16 in its high nibble (GGUF's Q4_0/Q4_1 block order) — and per group an fp16 scale
//    and min: w = scale * q + min, q in 0..15. Q4_0 (min = -8·d), Q4_1 and Q4_K (scale = d·sc, min = -dmin·m) all
//    land here.
//  * int8: W as int8 [N, K] with an fp16 scale per group of G (16 or 32) weights: w = scale * q. Q8_0 (G = 32) and
//    Q6_K (G = 16, q - 32) land here.
//
// Loop: output rows split across threads (at::parallel_for); x, converted to fp32 once, is taken in blocks of
// kBlockRows rows, and within a block in passes of up to kPassRows rows whose fp32 accumulators stay in registers,
// so one weight row is read from memory once per block and from L1 for the other passes. Each output y[m, n] is
// one accumulator summed over K in a fixed order whatever the number of rows: the product is batch-invariant (the
// deterministic mode relies on it).
// Built by busserve/cpu_kernels/__init__.py; registered as torch.ops.busserve.{quant_linear, quant_linear_x16,
// quant_linear_x16_available, dense_linear_x16}.

#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

namespace {

constexpr int kPassRows = 16;    // accumulators in registers: 16 of AVX-512's 32
constexpr int64_t kBlockRows = 32;

inline float half_to_float(uint16_t h) { return _cvtsh_ss(h); }

// 32 int4 weights in fp32 from their 16 bytes (byte t: weight t low, weight t+16 high): lo = weights 0..15,
// hi = 16..31, each s * q + m (per lane, so also 16 outputs' weights of one input in the x16 layout).
inline void dequant_int4(const uint8_t* bytes, __m512 s, __m512 m, __m512& lo, __m512& hi) {
  const __m512i packed = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes)));
  lo = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(packed, _mm512_set1_epi32(0xF))), s, m);
  hi = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(packed, 4)), s, m);
}

// One weight row against `rows` rows of x (rows <= R): out[i] = sum_k x[i, k] * w[k].
template <int R>
inline void int4_row(const float* x, int64_t ldx, const uint8_t* q, const uint16_t* scale, const uint16_t* mins,
                     int64_t groups, float* out) {
  __m512 acc[R];
  for (int i = 0; i < R; ++i) acc[i] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m512 lo, hi;
    dequant_int4(q + g * 16, _mm512_set1_ps(half_to_float(scale[g])), _mm512_set1_ps(half_to_float(mins[g])), lo,
                 hi);
    const float* xg = x + g * 32;
    for (int i = 0; i < R; ++i) {
      acc[i] = _mm512_fmadd_ps(lo, _mm512_loadu_ps(xg + i * ldx), acc[i]);
      acc[i] = _mm512_fmadd_ps(hi, _mm512_loadu_ps(xg + i * ldx + 16), acc[i]);
    }
  }
  for (int i = 0; i < R; ++i) out[i] = _mm512_reduce_add_ps(acc[i]);
}

template <int R>
inline void int8_row(const float* x, int64_t ldx, const int8_t* q, const uint16_t* scale, int64_t chunks,
                     int64_t chunks_per_group, float* out) {
  __m512 acc[R];
  for (int i = 0; i < R; ++i) acc[i] = _mm512_setzero_ps();
  for (int64_t c = 0; c < chunks; ++c) {  // 16 weights per chunk
    const __m512i v = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + c * 16)));
    const __m512 w = _mm512_mul_ps(_mm512_cvtepi32_ps(v), _mm512_set1_ps(half_to_float(scale[c / chunks_per_group])));
    const float* xc = x + c * 16;
    for (int i = 0; i < R; ++i) acc[i] = _mm512_fmadd_ps(w, _mm512_loadu_ps(xc + i * ldx), acc[i]);
  }
  for (int i = 0; i < R; ++i) out[i] = _mm512_reduce_add_ps(acc[i]);
}

#if defined(__AVX512BF16__)
constexpr bool kBf16Dot = true;

// bf16 activations (x as the model holds them): the 32 weights of a group are dequantized in fp32, rounded to bf16
// and multiplied with vdpbf16ps, one instruction per row per group instead of two FMAs; products exact, sums fp32.
template <int R>
inline void int4_row_bf16(const uint16_t* x, int64_t ldx, const uint8_t* q, const uint16_t* scale,
                          const uint16_t* mins, int64_t groups, float* out) {
  __m512 acc[R];
  for (int i = 0; i < R; ++i) acc[i] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m512 lo, hi;
    dequant_int4(q + g * 16, _mm512_set1_ps(half_to_float(scale[g])), _mm512_set1_ps(half_to_float(mins[g])), lo,
                 hi);
    const __m512bh w = _mm512_cvtne2ps_pbh(hi, lo);  // weights 0..31 in order, as x's 32 values are
    const uint16_t* xg = x + g * 32;
    for (int i = 0; i < R; ++i) {
      acc[i] = _mm512_dpbf16_ps(acc[i], w, (__m512bh)_mm512_loadu_si512(xg + i * ldx));
    }
  }
  for (int i = 0; i < R; ++i) out[i] = _mm512_reduce_add_ps(acc[i]);
}

template <int R>
inline void int8_row_bf16(const uint16_t* x, int64_t ldx, const int8_t* q, const uint16_t* scale, int64_t chunks,
                          int64_t chunks_per_group, float* out) {
  __m512 acc[R];
  for (int i = 0; i < R; ++i) acc[i] = _mm512_setzero_ps();
  for (int64_t c = 0; c + 1 < chunks; c += 2) {  // 32 weights per step, two chunks of 16
    const __m512 s0 = _mm512_set1_ps(half_to_float(scale[c / chunks_per_group]));
    const __m512 s1 = _mm512_set1_ps(half_to_float(scale[(c + 1) / chunks_per_group]));
    const __m512 w0 = _mm512_mul_ps(
        _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + c * 16)))), s0);
    const __m512 w1 = _mm512_mul_ps(
        _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + c * 16 + 16)))),
        s1);
    const __m512bh w = _mm512_cvtne2ps_pbh(w1, w0);
    const uint16_t* xc = x + c * 16;
    for (int i = 0; i < R; ++i) {
      acc[i] = _mm512_dpbf16_ps(acc[i], w, (__m512bh)_mm512_loadu_si512(xc + i * ldx));
    }
  }
  for (int i = 0; i < R; ++i) out[i] = _mm512_reduce_add_ps(acc[i]);
}
#else
constexpr bool kBf16Dot = false;
#endif

template <int R>
void row_pass(int bits, const void* x, int64_t ldx, bool bf16, const uint8_t* q, const uint16_t* scale,
              const uint16_t* mins, int64_t K, int64_t group, float* out) {
#if defined(__AVX512BF16__)
  if (bf16) {
    const auto* xb = static_cast<const uint16_t*>(x);
    if (bits == 4) {
      int4_row_bf16<R>(xb, ldx, q, scale, mins, K / 32, out);
    } else {
      int8_row_bf16<R>(xb, ldx, reinterpret_cast<const int8_t*>(q), scale, K / 16, group / 16, out);
    }
    return;
  }
#endif
  const auto* xf = static_cast<const float*>(x);
  if (bits == 4) {
    int4_row<R>(xf, ldx, q, scale, mins, K / 32, out);
  } else {
    int8_row<R>(xf, ldx, reinterpret_cast<const int8_t*>(q), scale, K / 16, group / 16, out);
  }
}

using PassFn = void (*)(int, const void*, int64_t, bool, const uint8_t*, const uint16_t*, const uint16_t*, int64_t,
                        int64_t, float*);
template <int... R>
constexpr std::array<PassFn, sizeof...(R) + 1> make_passes(std::integer_sequence<int, R...>) {
  return {nullptr, row_pass<R + 1>...};
}
constexpr auto kPasses = make_passes(std::make_integer_sequence<int, kPassRows>{});

at::Tensor quant_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                        const c10::optional<at::Tensor>& mins, int64_t bits, int64_t group,
                        const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(bits == 4 || bits == 8, "quant_linear: bits must be 4 or 8, got ", bits);
  TORCH_CHECK(x.dim() == 2 && x.device().is_cpu(), "quant_linear: x must be a 2-D CPU tensor");
  TORCH_CHECK(qweight.dim() == 2 && qweight.is_contiguous() && qweight.element_size() == 1,
              "quant_linear: qweight must be a contiguous 2-D byte tensor");
  TORCH_CHECK(scales.scalar_type() == at::kHalf && scales.is_contiguous(), "quant_linear: scales must be fp16");
  const int64_t M = x.size(0), K = x.size(1), N = qweight.size(0);
  if (bits == 4) {
    TORCH_CHECK(group == 32, "quant_linear: int4 groups are 32 weights, got ", group);
    TORCH_CHECK(mins.has_value() && mins->scalar_type() == at::kHalf && mins->is_contiguous(),
                "quant_linear: int4 needs fp16 mins");
    TORCH_CHECK(qweight.size(1) * 2 == K, "quant_linear: x has ", K, " features, the int4 weight ",
                qweight.size(1) * 2);
  } else {
    TORCH_CHECK(group % 16 == 0 && group > 0, "quant_linear: int8 groups must be a multiple of 16, got ", group);
    TORCH_CHECK(qweight.size(1) == K, "quant_linear: x has ", K, " features, the int8 weight ", qweight.size(1));
  }
  TORCH_CHECK(K % group == 0, "quant_linear: ", K, " features are not whole groups of ", group);
  TORCH_CHECK(scales.numel() == N * (K / group), "quant_linear: expected ", N * (K / group), " scales, got ",
              scales.numel());
  if (bias.has_value()) TORCH_CHECK(bias->numel() == N, "quant_linear: bias must have ", N, " values");

  // bf16 activations stay bf16 where the CPU has vdpbf16ps; everything else is multiplied in fp32.
  // (The bf16 int8 loop takes 32 weights a step: a K of odd 16-chunks goes the fp32 way.)
  const bool bf16 = kBf16Dot && x.scalar_type() == at::kBFloat16 && (bits == 4 || K % 32 == 0);
  const at::Tensor xf = bf16 ? x.contiguous() : x.to(at::kFloat).contiguous();
  at::Tensor y = at::empty({M, N}, x.options().dtype(at::kFloat));
  const at::Tensor b = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
  const char* xp = static_cast<const char*>(xf.data_ptr());
  const int64_t x_row_bytes = K * xf.element_size();
  float* yp = y.data_ptr<float>();
  const uint8_t* qp = static_cast<const uint8_t*>(qweight.data_ptr());
  const uint16_t* sp = reinterpret_cast<const uint16_t*>(scales.data_ptr<at::Half>());
  const uint16_t* mp = bits == 4 ? reinterpret_cast<const uint16_t*>(mins->data_ptr<at::Half>()) : nullptr;
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  const int64_t row_bytes = qweight.size(1), groups = K / group;

  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    float out[kPassRows];
    for (int64_t m0 = 0; m0 < M; m0 += kBlockRows) {
      const int64_t m1 = std::min(M, m0 + kBlockRows);
      for (int64_t n = n0; n < n1; ++n) {
        const uint8_t* qn = qp + n * row_bytes;
        const uint16_t* sn = sp + n * groups;
        const uint16_t* mn = mp ? mp + n * groups : nullptr;
        const float add = bp ? bp[n] : 0.0f;
        for (int64_t m = m0; m < m1; m += kPassRows) {
          const int rows = static_cast<int>(std::min<int64_t>(kPassRows, m1 - m));
          kPasses[rows](static_cast<int>(bits), xp + m * x_row_bytes, K, bf16, qn, sn, mn, K, group, out);
          for (int i = 0; i < rows; ++i) yp[(m + i) * N + n] = out[i] + add;
        }
      }
    }
  });
  return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
}


// ---- int4, 16 outputs per vector ("x16" layout) -------------------------------------------------------------------
//
// For bf16 activations on CPUs with AVX512-BF16 the int4 weights are re-laid once at load so that one vector holds
// 16 outputs: per block of 16 output rows and per pair of inputs (k, k+1), 16 bytes — byte j = q[n0+j, k] |
// q[n0+j, k+1] << 4 — and per group of 32 inputs the 16 outputs' fp16 scales and mins. A 32-bit lane of
// `(b | b << 12) & 0x000F000F | 0x43004300` is then the bf16 pair (128 + q_k, 128 + q_k+1): four instructions turn
// 32 weights into vdpbf16ps operands, the x pair is a broadcast, and the lanes are the 16 outputs, so no horizontal
// sums are left. Per group and output, sum_k w x = s * D + (m - 128 s) * sum_k x, with D the dot of (128 + q)
// with x (exact products, fp32 sums) and sum_k x computed once per row and group.
#if defined(__AVX512BF16__)
template <int R>
inline void int4_x16_pass(const uint16_t* x, int64_t ldx, const float* xsum, int64_t groups, const uint8_t* q,
                          const uint16_t* scale, const uint16_t* mins, const float* bias, int lanes, uint16_t* out,
                          int64_t ldo) {
  // Two dot chains per row hide vdpbf16ps's latency when rows are few; the count is fixed, never chosen by R,
  // so that a row's summation order is the same in a pass of any size.
  constexpr int kChains = 2;
  const __m512i value_bits = _mm512_set1_epi32(0x000F000F);
  const __m512i magic = _mm512_set1_epi32(0x43004300);
  __m512 acc[R];
  for (int i = 0; i < R; ++i) acc[i] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    const __m512 s = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(scale + g * 16)));
    const __m512 m = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(mins + g * 16)));
    const __m512 offset = _mm512_fmadd_ps(_mm512_set1_ps(-128.0f), s, m);
    __m512 dot[R][kChains];
    for (int i = 0; i < R; ++i)
      for (int c = 0; c < kChains; ++c) dot[i][c] = _mm512_setzero_ps();
    for (int half = 0; half < 2; ++half) {
      __m512i w[8];
      for (int p = 0; p < 8; ++p) {
        const __m512i b = _mm512_cvtepu8_epi32(
            _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + (g * 16 + half * 8 + p) * 16)));
        // (b | b << 12) & value_bits in one vpternlogd (0xA8 is (A | B) & C in its truth table), then | magic
        w[p] = _mm512_or_si512(_mm512_ternarylogic_epi32(b, _mm512_slli_epi32(b, 12), value_bits, 0xA8), magic);
      }
      for (int i = 0; i < R; ++i) {
        const uint16_t* xp = x + i * ldx + g * 32 + half * 16;
        for (int p = 0; p < 8; ++p) {
          int32_t pair;
          std::memcpy(&pair, xp + 2 * p, sizeof pair);  // x[k], x[k+1] as one 32-bit lane (no aliasing cast)
          const __m512i xx = _mm512_set1_epi32(pair);
          dot[i][p % kChains] = _mm512_dpbf16_ps(dot[i][p % kChains], (__m512bh)w[p], (__m512bh)xx);
        }
      }
    }
    for (int i = 0; i < R; ++i) {
      __m512 d = dot[i][0];
      d = _mm512_add_ps(d, dot[i][1]);
      acc[i] = _mm512_fmadd_ps(d, s, acc[i]);
      acc[i] = _mm512_fmadd_ps(offset, _mm512_set1_ps(xsum[i * groups + g]), acc[i]);
    }
  }
  // Bias in fp32, one rounding to bf16, and a masked store for the last block's padding lanes.
  const __mmask16 keep = lanes == 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << lanes) - 1);
  const __m512 b = bias ? _mm512_maskz_loadu_ps(keep, bias) : _mm512_setzero_ps();
  for (int i = 0; i < R; ++i) {
    const __m256i y = (__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(acc[i], b));
    _mm256_mask_storeu_epi16(out + i * ldo, keep, y);
  }
}

using X16PassFn = void (*)(const uint16_t*, int64_t, const float*, int64_t, const uint8_t*, const uint16_t*,
                           const uint16_t*, const float*, int, uint16_t*, int64_t);
constexpr int kX16Rows = 6;  // 8 weight vectors, 2 x 6 dot chains, 6 accumulators and the group's scales: 32 zmm
template <int... R>
constexpr std::array<X16PassFn, sizeof...(R) + 1> make_x16_passes(std::integer_sequence<int, R...>) {
  return {nullptr, int4_x16_pass<R + 1>...};
}
constexpr auto kX16Passes = make_x16_passes(std::make_integer_sequence<int, kX16Rows>{});

// The whole weight as bf16 [K, N padded to 16] (k-major: 16 outputs' values side by side, as the x16 lanes lie),
// for prefill-sized products: from ~64-128 rows oneDNN's bf16 GEMM over the dequantized layer beats the register
// kernel, and one layer's dense weight (a few MB) stays in the last-level cache between being written here and
// read by the GEMM, so the dequantization costs little beside a product of hundreds of rows.
at::Tensor dequantize_x16_kn(const at::Tensor& qweight, const at::Tensor& scales, const at::Tensor& mins) {
  const int64_t blocks = qweight.size(0), K = qweight.size(1) * 2, groups = K / 32, N = blocks * 16;
  at::Tensor w = at::empty({K, N}, qweight.options().dtype(at::kBFloat16));
  auto* wp = reinterpret_cast<uint16_t*>(w.data_ptr<at::BFloat16>());
  const auto* qp = static_cast<const uint8_t*>(qweight.data_ptr());
  const auto* scp = reinterpret_cast<const uint16_t*>(scales.data_ptr<at::Half>());
  const auto* mnp = reinterpret_cast<const uint16_t*>(mins.data_ptr<at::Half>());
  at::parallel_for(0, blocks, 4, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      for (int64_t g = 0; g < groups; ++g) {
        const uint16_t* sg = scp + (b * groups + g) * 16;
        const uint16_t* mg = mnp + (b * groups + g) * 16;
        const __m512 s = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sg)));
        const __m512 m = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(mg)));
        for (int p = 0; p < 16; ++p) {
          const int64_t k = g * 32 + 2 * p;
          __m512 lo, hi;
          dequant_int4(qp + (b * (K / 2) + k / 2) * 16, s, m, lo, hi);
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(wp + k * N + b * 16), (__m256i)_mm512_cvtneps_pbh(lo));
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(wp + (k + 1) * N + b * 16), (__m256i)_mm512_cvtneps_pbh(hi));
        }
      }
    }
  });
  return w;
}

at::Tensor quant_linear_x16(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                            const at::Tensor& mins, int64_t out_features, const c10::optional<at::Tensor>& bias,
                            int64_t gemm_from_rows) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16, "quant_linear_x16: x must be 2-D bf16");
  TORCH_CHECK(qweight.dim() == 3 && qweight.size(2) == 16 && qweight.is_contiguous() &&
                  qweight.scalar_type() == at::kByte,
              "quant_linear_x16: qweight must be [N/16, K/2, 16] uint8");
  const int64_t M = x.size(0), K = x.size(1), blocks = qweight.size(0), groups = K / 32;
  TORCH_CHECK(K % 32 == 0 && qweight.size(1) * 2 == K, "quant_linear_x16: x has ", K, " features, the weight ",
              qweight.size(1) * 2);
  TORCH_CHECK(scales.scalar_type() == at::kHalf && mins.scalar_type() == at::kHalf && scales.is_contiguous() &&
                  mins.is_contiguous() && scales.numel() == blocks * groups * 16 && mins.numel() == scales.numel(),
              "quant_linear_x16: scales and mins must be fp16 [N/16, K/32, 16]");
  TORCH_CHECK(out_features <= blocks * 16 && out_features > (blocks - 1) * 16, "quant_linear_x16: ", out_features,
              " outputs do not fill ", blocks, " blocks of 16");
  TORCH_CHECK(!bias.has_value() || (bias->scalar_type() == at::kFloat && bias->is_contiguous() &&
                                    bias->numel() == out_features),
              "quant_linear_x16: bias must be ", out_features, " contiguous fp32 values");
  if (gemm_from_rows > 0 && M >= gemm_from_rows) {
    at::Tensor y = at::matmul(x, dequantize_x16_kn(qweight, scales, mins).narrow(1, 0, out_features));
    return bias.has_value() ? (y.to(at::kFloat) + *bias).to(at::kBFloat16) : y;
  }
  // Per-call work outside the weight stream is kept to plain loops: a decode step makes ~200 of these calls.
  const at::Tensor xc = x.contiguous();
  const auto* xp = reinterpret_cast<const uint16_t*>(xc.data_ptr<at::BFloat16>());
  // sum_k x per row and group, in fp32 (the offset term of every output of that group).
  std::vector<float> xsum(static_cast<size_t>(M * groups));
  for (int64_t i = 0; i < M * groups; ++i) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xp + i * 32) + 0);
    const __m256i v2 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xp + i * 32) + 1);
    const __m512 lo = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
    const __m512 hi = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v2), 16));
    xsum[i] = _mm512_reduce_add_ps(_mm512_add_ps(lo, hi));
  }
  at::Tensor y = at::empty({M, out_features}, x.options());
  auto* yp = reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>());
  const auto* qp = static_cast<const uint8_t*>(qweight.data_ptr());
  const auto* scp = reinterpret_cast<const uint16_t*>(scales.data_ptr<at::Half>());
  const auto* mnp = reinterpret_cast<const uint16_t*>(mins.data_ptr<at::Half>());
  const float* bp = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t m0 = 0; m0 < M; m0 += kBlockRows) {
      const int64_t m1 = std::min(M, m0 + kBlockRows);
      for (int64_t b = b0; b < b1; ++b) {
        const int lanes = static_cast<int>(std::min<int64_t>(16, out_features - b * 16));
        for (int64_t m = m0; m < m1; m += kX16Rows) {
          const int rows = static_cast<int>(std::min<int64_t>(kX16Rows, m1 - m));
          kX16Passes[rows](xp + m * K, K, xsum.data() + m * groups, groups, qp + b * (K / 2) * 16,
                           scp + b * groups * 16, mnp + b * groups * 16, bp ? bp + b * 16 : nullptr, lanes,
                           yp + m * out_features + b * 16, out_features);
        }
      }
    }
  });
  return y;
}

// ---- dense bf16, 16 outputs per vector (the deterministic mode's dense layers) --------------------------------------
//
// The weights as bf16 pairs, [N/16, K/2, 16] 32-bit lanes (lane j of a pair: output j's weights k, k+1) — the x16
// arrangement without quantization — so a row's output is one fixed chain of vdpbf16ps over K whatever the number
// of rows: oneDNN picks its kernels (and so its summation order) by the shape, which makes the same row come out
// differently in a different batch.
template <int R>
inline void dense_x16_pass(const uint16_t* x, int64_t ldx, int64_t pairs, const uint32_t* w, const float* bias,
                           int lanes, uint16_t* out, int64_t ldo) {
  constexpr int kChains = 2;  // fixed, as in int4_x16_pass
  __m512 dot[R][kChains];
  for (int i = 0; i < R; ++i)
    for (int c = 0; c < kChains; ++c) dot[i][c] = _mm512_setzero_ps();
  for (int64_t p = 0; p < pairs; ++p) {
    const __m512i wp = _mm512_loadu_si512(w + p * 16);
    for (int i = 0; i < R; ++i) {
      int32_t pair;
      std::memcpy(&pair, x + i * ldx + 2 * p, sizeof pair);
      const __m512i xx = _mm512_set1_epi32(pair);
      dot[i][p % kChains] = _mm512_dpbf16_ps(dot[i][p % kChains], (__m512bh)wp, (__m512bh)xx);
    }
  }
  const __mmask16 keep = lanes == 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << lanes) - 1);
  const __m512 b = bias ? _mm512_maskz_loadu_ps(keep, bias) : _mm512_setzero_ps();
  for (int i = 0; i < R; ++i) {
    const __m512 d = _mm512_add_ps(dot[i][0], dot[i][1]);
    _mm256_mask_storeu_epi16(out + i * ldo, keep, (__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(d, b)));
  }
}

using DensePassFn = void (*)(const uint16_t*, int64_t, int64_t, const uint32_t*, const float*, int, uint16_t*,
                             int64_t);
template <int... R>
constexpr std::array<DensePassFn, sizeof...(R) + 1> make_dense_passes(std::integer_sequence<int, R...>) {
  return {nullptr, dense_x16_pass<R + 1>...};
}
constexpr int kDenseRows = 8;
constexpr auto kDensePasses = make_dense_passes(std::make_integer_sequence<int, kDenseRows>{});

at::Tensor dense_linear_x16(const at::Tensor& x, const at::Tensor& weight, int64_t out_features,
                            const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16, "dense_linear_x16: x must be 2-D bf16");
  TORCH_CHECK(weight.dim() == 4 && weight.size(2) == 16 && weight.size(3) == 2 &&
                  weight.scalar_type() == at::kBFloat16 && weight.is_contiguous(),
              "dense_linear_x16: weight must be bf16 [N/16, K/2, 16, 2]");
  const int64_t M = x.size(0), K = x.size(1), blocks = weight.size(0), pairs = K / 2;
  TORCH_CHECK(K % 2 == 0 && weight.size(1) == pairs, "dense_linear_x16: x has ", K, " features, the weight ",
              weight.size(1) * 2);
  TORCH_CHECK(out_features <= blocks * 16 && out_features > (blocks - 1) * 16, "dense_linear_x16: ", out_features,
              " outputs do not fill ", blocks, " blocks of 16");
  TORCH_CHECK(!bias.has_value() || (bias->scalar_type() == at::kFloat && bias->is_contiguous() &&
                                    bias->numel() == out_features),
              "dense_linear_x16: bias must be ", out_features, " contiguous fp32 values");
  const at::Tensor xc = x.contiguous();
  const auto* xp = reinterpret_cast<const uint16_t*>(xc.data_ptr<at::BFloat16>());
  at::Tensor y = at::empty({M, out_features}, x.options());
  auto* yp = reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>());
  const auto* wp = reinterpret_cast<const uint32_t*>(weight.data_ptr<at::BFloat16>());
  const float* bp = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t m0 = 0; m0 < M; m0 += kBlockRows) {
      const int64_t m1 = std::min(M, m0 + kBlockRows);
      for (int64_t b = b0; b < b1; ++b) {
        const int lanes = static_cast<int>(std::min<int64_t>(16, out_features - b * 16));
        for (int64_t m = m0; m < m1; m += kDenseRows) {
          const int rows = static_cast<int>(std::min<int64_t>(kDenseRows, m1 - m));
          kDensePasses[rows](xp + m * K, K, pairs, wp + b * pairs * 16, bp ? bp + b * 16 : nullptr, lanes,
                             yp + m * out_features + b * 16, out_features);
        }
      }
    }
  });
  return y;
}
#else
at::Tensor quant_linear_x16(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t,
                            const c10::optional<at::Tensor>&, int64_t) {
  TORCH_CHECK(false, "quant_linear_x16: this build has no AVX512-BF16");
}
at::Tensor dense_linear_x16(const at::Tensor&, const at::Tensor&, int64_t, const c10::optional<at::Tensor>&) {
  TORCH_CHECK(false, "dense_linear_x16: this build has no AVX512-BF16");
}
#endif

bool quant_linear_x16_available() { return kBf16Dot; }

}  // namespace

TORCH_LIBRARY_FRAGMENT(busserve, m) {
  m.def("quant_linear(Tensor x, Tensor qweight, Tensor scales, Tensor? mins, int bits, int group, Tensor? bias) "
        "-> Tensor");
  m.def("quant_linear_x16(Tensor x, Tensor qweight, Tensor scales, Tensor mins, int out_features, Tensor? bias, "
        "int gemm_from_rows) -> Tensor");
  m.def("quant_linear_x16_available() -> bool", &quant_linear_x16_available);
  m.def("dense_linear_x16(Tensor x, Tensor weight, int out_features, Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(busserve, CPU, m) {
  m.impl("quant_linear", &quant_linear);
  m.impl("quant_linear_x16", &quant_linear_x16);
  m.impl("dense_linear_x16", &dense_linear_x16);
}


