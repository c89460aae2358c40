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
// Built by busserve/cpu_kernels/__init__.py; registered as torch.ops.busserve.quant_linear.

#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <utility>

namespace {

constexpr int kPassRows = 16;    // accumulators in registers: 16 of AVX-512's 32
constexpr int64_t kBlockRows = 32;

inline float half_to_float(uint16_t h) { return _cvtsh_ss(h); }

// One weight row against `rows` rows of x (rows <= R): out[i] = sum_k x[i, k] * w[k].
template <int R>
inline void int4_row(const float* x, int64_t ldx, const uint8_t* q, const uint16_t* scale, const uint16_t* mins,
                     int64_t groups, float* out) {
  const __m512i low_mask = _mm512_set1_epi32(0xF);
  __m512 acc[R];
  for (int i = 0; i < R; ++i) acc[i] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    const __m512i packed = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + g * 16)));
    const __m512 s = _mm512_set1_ps(half_to_float(scale[g]));
    const __m512 m = _mm512_set1_ps(half_to_float(mins[g]));
    const __m512 lo = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(packed, low_mask)), s, m);
    const __m512 hi = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(packed, 4)), s, m);
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
  const __m512i low_mask = _mm512_set1_epi32(0xF);
  __m512 acc[R];
  for (int i = 0; i < R; ++i) acc[i] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    const __m512i packed = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + g * 16)));
    const __m512 s = _mm512_set1_ps(half_to_float(scale[g]));
    const __m512 m = _mm512_set1_ps(half_to_float(mins[g]));
    const __m512 lo = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(packed, low_mask)), s, m);
    const __m512 hi = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(packed, 4)), s, m);
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
  const bool bf16 = kBf16Dot && x.scalar_type() == at::kBFloat16;
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

}  // namespace

TORCH_LIBRARY_FRAGMENT(busserve, m) {
  m.def("quant_linear(Tensor x, Tensor qweight, Tensor scales, Tensor? mins, int bits, int group, Tensor? bias) "
        "-> Tensor");
}

TORCH_LIBRARY_IMPL(busserve, CPU, m) { m.impl("quant_linear", &quant_linear); }
