// Paged decode attention for x86 CPUs with AVX-512: each decoding sequence's one query token attends over its
// context straight from the KV pages (no padded copy), K and V each read once.
//
// Why it exists: the torch path (attention_backends.TorchDecode) gathers every context into a padded batch with
// index_select and then runs SDPA over the copy, so the KV is read twice and written once per layer and step; on a
// decode engine holding a few 1,000-token contexts that is a third of the step (docs/BENCHMARKS.md, "The paper's experiment").
//
// Layout (the same as every other backend): one layer's cache is [slots, kv_heads, head_dim], contiguous; `slots`
// is [batch, max_len] int64 — the pool slot of each context position (built once per step by the backend's
// prepare()); `lens` is [batch] int64. Queries are [batch, heads, head_dim]; heads kv_head*G .. kv_head*G+G-1
// share K/V head kv_head (GQA). Scores and softmax are fp32; K/V may be bf16, fp16 or fp32.
//
// Per sequence: pass 1 computes all scores 16 positions at a time (one horizontal-sum tree per 16 positions
// instead of one reduction each), softmax in place with a polynomial exp, pass 2 accumulates P·V in registers.
// Built on first use by busserve/cpu_kernels/__init__.py (g++ -O3 -march=native) and registered as
// torch.ops.busserve.paged_decode.

#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#if !defined(__AVX512F__)
#error "busserve's CPU paged decode kernel needs AVX-512 (it is built with -march=native)"
#endif

namespace {

inline __m512 load16(const c10::BFloat16* p) {
  __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}
inline __m512 load16(const c10::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }

// e^x for x <= 0 (softmax after the max is subtracted): 2^n * poly(r), |r| <= ln2 / 2, relative error ~1e-7.
inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);
  __m512 p = _mm512_set1_ps(1.f / 720);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

// Sixteen vectors -> one vector whose lane i is the sum of a[i]'s sixteen lanes (a transpose tree).
inline __m512 hsum16(const __m512* a) {
  __m512 r[8], s[4];
  for (int i = 0; i < 8; ++i)
    r[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]), _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
  for (int j = 0; j < 4; ++j) {
    const __m512d x = _mm512_castps_pd(r[2 * j]), y = _mm512_castps_pd(r[2 * j + 1]);
    s[j] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
  }
  const __m512 t01 = _mm512_add_ps(_mm512_shuffle_f32x4(s[0], s[1], 0x88), _mm512_shuffle_f32x4(s[0], s[1], 0xDD));
  const __m512 t23 = _mm512_add_ps(_mm512_shuffle_f32x4(s[2], s[3], 0x88), _mm512_shuffle_f32x4(s[2], s[3], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(t01, t23, 0x88), _mm512_shuffle_f32x4(t01, t23, 0xDD));
}

// One sequence: C = head_dim / 16 vectors per head.
template <typename T, int C>
void attend_one(const T* q, const T* k, const T* v, T* out, const int64_t* slots, int64_t len, int64_t heads,
                int64_t kv_heads, float scale, std::vector<__m512>& qv, std::vector<__m512>& part,
                std::vector<__m512>& acc, std::vector<float>& scores, int64_t stride) {
  constexpr int64_t D = C * 16;
  const int64_t G = heads / kv_heads;
  const int64_t row = kv_heads * D;
  for (int64_t h = 0; h < heads; ++h)
    for (int c = 0; c < C; ++c) qv[h * C + c] = _mm512_mul_ps(load16(q + h * D + c * 16), _mm512_set1_ps(scale));

  // Pass 1: scores[h][t] = q_h . k_t, sixteen positions per block (the tail block repeats the last position; its
  // scores are overwritten with -inf below).
  for (int64_t t0 = 0; t0 < len; t0 += 16) {
    for (int i = 0; i < 16; ++i) {
      const T* kr = k + slots[std::min<int64_t>(t0 + i, len - 1)] * row;
      for (int64_t kh = 0; kh < kv_heads; ++kh) {
        __m512 kc[C];
        for (int c = 0; c < C; ++c) kc[c] = load16(kr + kh * D + c * 16);
        for (int64_t g = 0; g < G; ++g) {
          const int64_t h = kh * G + g;
          __m512 x = _mm512_mul_ps(qv[h * C], kc[0]);
          for (int c = 1; c < C; ++c) x = _mm512_fmadd_ps(qv[h * C + c], kc[c], x);
          part[h * 16 + i] = x;
        }
      }
    }
    for (int64_t h = 0; h < heads; ++h) _mm512_storeu_ps(&scores[h * stride + t0], hsum16(&part[h * 16]));
  }

  // Softmax in place; inv[h] = 1 / sum.
  const int64_t padded = (len + 15) / 16 * 16;
  std::vector<float> inv(heads);
  for (int64_t h = 0; h < heads; ++h) {
    float* s = &scores[h * stride];
    for (int64_t t = len; t < padded; ++t) s[t] = -std::numeric_limits<float>::infinity();
    __m512 vmax = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    for (int64_t t = 0; t < padded; t += 16) vmax = _mm512_max_ps(vmax, _mm512_loadu_ps(s + t));
    vmax = _mm512_set1_ps(_mm512_reduce_max_ps(vmax));
    __m512 vsum = _mm512_setzero_ps();
    for (int64_t t = 0; t < padded; t += 16) {
      const __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(s + t), vmax));
      _mm512_storeu_ps(s + t, e);
      vsum = _mm512_add_ps(vsum, e);
    }
    inv[h] = 1.f / _mm512_reduce_add_ps(vsum);
  }

  // Pass 2: out_h = sum_t p[h][t] * v_t.
  std::fill(acc.begin(), acc.end(), _mm512_setzero_ps());
  for (int64_t t = 0; t < len; ++t) {
    const T* vr = v + slots[t] * row;
    for (int64_t kh = 0; kh < kv_heads; ++kh) {
      __m512 vc[C];
      for (int c = 0; c < C; ++c) vc[c] = load16(vr + kh * D + c * 16);
      for (int64_t g = 0; g < G; ++g) {
        const int64_t h = kh * G + g;
        const __m512 p = _mm512_set1_ps(scores[h * stride + t]);
        for (int c = 0; c < C; ++c) acc[h * C + c] = _mm512_fmadd_ps(p, vc[c], acc[h * C + c]);
      }
    }
  }
  for (int64_t h = 0; h < heads; ++h) {
    alignas(64) float tmp[16];
    for (int c = 0; c < C; ++c) {
      _mm512_store_ps(tmp, _mm512_mul_ps(acc[h * C + c], _mm512_set1_ps(inv[h])));
      T* o = out + h * D + c * 16;
      for (int i = 0; i < 16; ++i) o[i] = static_cast<T>(tmp[i]);
    }
  }
}

template <typename T, int C>
void attend_all(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out,
                const at::Tensor& slots, const at::Tensor& lens, int64_t max_len, float scale) {
  const int64_t batch = q.size(0), heads = q.size(1), kv_heads = k.size(1), D = q.size(2);
  const int64_t stride = (max_len + 15) / 16 * 16;
  const T* qp = q.data_ptr<T>();
  const T* kp = k.data_ptr<T>();
  const T* vp = v.data_ptr<T>();
  T* op = out.data_ptr<T>();
  const int64_t* sp = slots.data_ptr<int64_t>();
  const int64_t* lp = lens.data_ptr<int64_t>();
  at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
    std::vector<__m512> qv(heads * C), part(heads * 16), acc(heads * C);
    std::vector<float> scores(heads * stride);
    for (int64_t b = begin; b < end; ++b)
      attend_one<T, C>(qp + b * heads * D, kp, vp, op + b * heads * D, sp + b * max_len, lp[b], heads, kv_heads,
                       scale, qv, part, acc, scores, stride);
  });
}

template <typename T>
void dispatch_dim(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out,
                  const at::Tensor& slots, const at::Tensor& lens, int64_t max_len, float scale) {
  switch (q.size(2)) {
    case 16: return attend_all<T, 1>(q, k, v, out, slots, lens, max_len, scale);
    case 32: return attend_all<T, 2>(q, k, v, out, slots, lens, max_len, scale);
    case 64: return attend_all<T, 4>(q, k, v, out, slots, lens, max_len, scale);
    case 128: return attend_all<T, 8>(q, k, v, out, slots, lens, max_len, scale);
    default: TORCH_CHECK(false, "paged_decode: head_dim must be 16, 32, 64 or 128, got ", q.size(2));
  }
}

at::Tensor paged_decode(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                        const at::Tensor& slots, const at::Tensor& lens, int64_t max_len, double scale) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 3 && v_cache.dim() == 3, "paged_decode: q and caches must be 3-D");
  TORCH_CHECK(q.is_contiguous() && k_cache.is_contiguous() && v_cache.is_contiguous(),
              "paged_decode: q and caches must be contiguous");
  TORCH_CHECK(k_cache.scalar_type() == q.scalar_type() && v_cache.scalar_type() == q.scalar_type(),
              "paged_decode: q and caches must share a dtype");
  TORCH_CHECK(k_cache.size(2) == q.size(2) && q.size(1) % k_cache.size(1) == 0,
              "paged_decode: head_dim must match and heads must be a multiple of kv_heads");
  TORCH_CHECK(slots.scalar_type() == at::kLong && lens.scalar_type() == at::kLong && slots.is_contiguous() &&
                  lens.is_contiguous() && slots.numel() == q.size(0) * max_len && lens.numel() == q.size(0),
              "paged_decode: slots must be int64 [batch * max_len], lens int64 [batch]");
  at::Tensor out = at::empty_like(q);
  const float s = static_cast<float>(scale);
  switch (q.scalar_type()) {
    case at::kBFloat16: dispatch_dim<c10::BFloat16>(q, k_cache, v_cache, out, slots, lens, max_len, s); break;
    case at::kHalf: dispatch_dim<c10::Half>(q, k_cache, v_cache, out, slots, lens, max_len, s); break;
    case at::kFloat: dispatch_dim<float>(q, k_cache, v_cache, out, slots, lens, max_len, s); break;
    default: TORCH_CHECK(false, "paged_decode: dtype must be bfloat16, float16 or float32, got ", q.scalar_type());
  }
  return out;
}

}  // namespace

TORCH_LIBRARY(busserve, m) {
  m.def("paged_decode(Tensor q, Tensor k_cache, Tensor v_cache, Tensor slots, Tensor lens, int max_len, float scale)"
        " -> Tensor");
}

TORCH_LIBRARY_IMPL(busserve, CPU, m) { m.impl("paged_decode", &paged_decode); }
