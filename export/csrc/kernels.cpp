// Scalar reference kernels, activation quantization and run-time dispatch.
#include "paretoq_kernels.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <vector>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace paretoq {

bool format_for_bits(double bits, Format* f) {
  // Mirrors paretoq_ao/formats.py: (code_bits, zero, step).
  struct E { double bits; Format f; };
  static const E table[] = {
      {1.0, {1, 0.5f, 2.0f}},
      {1.58, {2, 1.0f, 1.0f / 1.5f}},
      {2.0, {2, 1.5f, 0.5f}},
      {3.0, {3, 4.0f, 1.0f}},
      {4.0, {4, 8.0f, 1.0f}},
  };
  for (const E& e : table)
    if (std::fabs(e.bits - bits) < 1e-6) { *f = e.f; return true; }
  return false;
}

const char* path_name(Path p) {
  switch (p) {
    case Path::Auto: return "auto";
    case Path::Scalar: return "scalar";
    case Path::AVX2: return "avx2";
    case Path::AVX512: return "avx512vnni";
    case Path::NEON: return "neon";
  }
  return "?";
}

bool path_available(Path p) {
  switch (p) {
    case Path::Scalar: return true;
#if defined(PARETOQ_HAVE_X86)
    case Path::AVX2: return __builtin_cpu_supports("avx2");
    case Path::AVX512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vnni");
#endif
#if defined(PARETOQ_HAVE_NEON)
    case Path::NEON: return true;
#endif
    default: return false;
  }
}

static Path detect() {
  if (const char* env = std::getenv("PARETOQ_KERNEL_PATH")) {
    for (Path p : {Path::Scalar, Path::AVX2, Path::AVX512, Path::NEON})
      if (std::strcmp(env, path_name(p)) == 0 && path_available(p)) return p;
  }
  for (Path p : {Path::AVX512, Path::AVX2, Path::NEON})
    if (path_available(p)) return p;
  return Path::Scalar;
}

Path best_path() {
  static const Path p = detect();
  return p;
}

static std::atomic<int> g_mode{static_cast<int>(ActMode::Int8)};
void set_activation_mode(ActMode m) { g_mode.store(static_cast<int>(m)); }
ActMode activation_mode() { return static_cast<ActMode>(g_mode.load()); }

int chunk_codes(Path p, int code_bits) {
  int w = 0;
  switch (p) {
    case Path::AVX2: w = 32; break;
    case Path::AVX512: w = 64; break;
    case Path::NEON: w = 16; break;
    default: return 0;
  }
  return code_bits == 3 ? w : w * (8 / code_bits);
}

void quantize_activations(const LinearArgs& a, int chunk, Prepared* p, int8_t* qbuf, float* dbuf,
                          int32_t* gbuf) {
  quantize_activations_begin(a, chunk, p, qbuf, dbuf, gbuf);
  quantize_tokens(a, *p, 0, a.M);
}

void quantize_activations_begin(const LinearArgs& a, int chunk, Prepared* p, int8_t* qbuf,
                                float* dbuf, int32_t* gbuf) {
  p->M = a.M; p->K = a.K; p->G = a.G; p->gs = a.K / a.G; p->chunk = chunk;
  p->q = qbuf; p->d = dbuf; p->gsum = gbuf; p->x = a.x;
}

void quantize_tokens(const LinearArgs& a, const Prepared& p, int64_t m0, int64_t m1) {
  const int64_t K = a.K, G = a.G, gs = K / G;
  const int b = a.fmt.code_bits;
  const int chunk = p.chunk;
  int8_t* qbuf = p.q;
  float* dbuf = p.d;
  int32_t* gbuf = p.gsum;
  const int cpb = (b == 3) ? 1 : 8 / b;
  const int W = chunk ? chunk / cpb : 0;
  thread_local std::vector<int8_t> nat_buf;
  nat_buf.resize(static_cast<size_t>(K));
  int8_t* nat = nat_buf.data();
  // Round to nearest, ties to even (== std::nearbyint in the default rounding mode) for
  // |v| < 2^22: adding and subtracting 1.5 * 2^23 rounds the fraction away exactly. Written
  // this way (no libm call) the loop vectorizes; results are identical.
  const float kMagic = 12582912.0f;
  for (int64_t m = m0; m < m1; ++m) {
    const float* x = a.x + m * K;
    float amax = 0.f;
    int64_t k0 = 0;
#if defined(__SSE2__)
    {  // max is exact and order-free; maxps(v, a) keeps a for NaN v, like std::max(a, v)
      const __m128 sign = _mm_set1_ps(-0.f);
      __m128 m4 = _mm_setzero_ps();
      for (; k0 + 4 <= K; k0 += 4) m4 = _mm_max_ps(_mm_andnot_ps(sign, _mm_loadu_ps(x + k0)), m4);
      alignas(16) float t[4];
      _mm_store_ps(t, m4);
      for (float v : t) amax = std::max(amax, v);
    }
#endif
    for (int64_t k = k0; k < K; ++k) amax = std::max(amax, std::fabs(x[k]));
    const float d = amax / 127.0f;
    dbuf[m] = d;
    if (d > 0.f) {
      int64_t k1 = 0;
#if defined(__SSE2__)
      {  // same operations as the scalar loop below, 16 at a time
        const __m128 vd = _mm_set1_ps(d), lo = _mm_set1_ps(-127.f), hi = _mm_set1_ps(127.f);
        const __m128 mg = _mm_set1_ps(kMagic);
        for (; k1 + 16 <= K; k1 += 16) {
          __m128i r[4];
          for (int i = 0; i < 4; ++i) {
            __m128 v = _mm_div_ps(_mm_loadu_ps(x + k1 + 4 * i), vd);
            v = _mm_min_ps(_mm_max_ps(v, lo), hi);  // NaN -> -127 like std::max(-127, NaN)
            v = _mm_sub_ps(_mm_add_ps(v, mg), mg);
            r[i] = _mm_cvttps_epi32(v);
          }
          const __m128i w = _mm_packs_epi16(_mm_packs_epi32(r[0], r[1]), _mm_packs_epi32(r[2], r[3]));
          _mm_storeu_si128(reinterpret_cast<__m128i*>(nat + k1), w);
        }
      }
#endif
      for (int64_t k = k1; k < K; ++k) {
        float v = x[k] / d;  // |v| <= 127 (+ rounding), or NaN/inf for non-finite inputs
        v = std::min(127.f, std::max(-127.f, v));
        v = (v + kMagic) - kMagic;
        nat[k] = static_cast<int8_t>(static_cast<int>(v));
      }
    } else {
      std::memset(nat, 0, static_cast<size_t>(K));
    }
    int8_t* q = qbuf + m * K;
    for (int64_t g = 0; g < G; ++g) {
      const int64_t g0 = g * gs;
      int32_t s = 0;
      for (int64_t k = g0; k < g0 + gs; ++k) s += nat[k];
      gbuf[m * G + g] = s;
      const int64_t nfull = chunk ? gs / chunk : 0;
      for (int64_t c = 0; c < nfull; ++c) {
        const int64_t base = g0 + c * chunk;
        if (b == 3) {
          std::memcpy(q + base, nat + base, static_cast<size_t>(chunk));
        } else {
          // position pl * W + j holds activation cpb * j + pl
          for (int pl = 0; pl < cpb; ++pl)
            for (int j = 0; j < W; ++j) q[base + pl * W + j] = nat[base + cpb * j + pl];
        }
      }
      const int64_t t0 = g0 + nfull * chunk;
      if (g0 + gs > t0) std::memcpy(q + t0, nat + t0, static_cast<size_t>(g0 + gs - t0));
    }
  }
}

void rows_int8_scalar(const LinearArgs& a, const Prepared& p, int64_t n0, int64_t n1) {
  const int b = a.fmt.code_bits;
  const int zero2 = static_cast<int>(std::lrint(2.0 * a.fmt.zero));
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = a.w + n * a.row_bytes;
    const float* s = a.scale + n * a.G;
    for (int64_t m = 0; m < a.M; ++m) {
      const int8_t* q = p.q + m * a.K;
      float res = 0.f;
      for (int64_t g = 0; g < a.G; ++g) {
        int64_t dot = 0;
        for (int64_t k = g * p.gs; k < (g + 1) * p.gs; ++k) dot += code_at(row, k, b) * q[k];
        res += group_term(s[g], dot, p.gsum[m * a.G + g], zero2);
      }
      a.out[m * a.N + n] = res * a.fmt.step * p.d[m];
    }
  }
}

void rows_fp32_scalar(const LinearArgs& a, int64_t n0, int64_t n1) {
  const int b = a.fmt.code_bits;
  const int64_t gs = a.K / a.G;
  std::vector<float> wrow(static_cast<size_t>(a.K));
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = a.w + n * a.row_bytes;
    const float* s = a.scale + n * a.G;
    for (int64_t k = 0; k < a.K; ++k)
      wrow[k] = ((static_cast<float>(code_at(row, k, b)) - a.fmt.zero) * a.fmt.step) *
                clamp_scale(s[k / gs]);
    for (int64_t m = 0; m < a.M; ++m) {
      const float* x = a.x + m * a.K;
      float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      int64_t k = 0;
      for (; k + 8 <= a.K; k += 8)
        for (int i = 0; i < 8; ++i) acc[i] += x[k + i] * wrow[k + i];
      float r = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
      for (; k < a.K; ++k) r += x[k] * wrow[k];
      a.out[m * a.N + n] = r;
    }
  }
}

#if !defined(PARETOQ_HAVE_X86)
void rows_int8_avx2(const LinearArgs& a, const Prepared& p, int64_t n0, int64_t n1) { rows_int8_scalar(a, p, n0, n1); }
void rows_int8_avx512(const LinearArgs& a, const Prepared& p, int64_t n0, int64_t n1) { rows_int8_scalar(a, p, n0, n1); }
#endif
#if !defined(PARETOQ_HAVE_NEON)
void rows_int8_neon(const LinearArgs& a, const Prepared& p, int64_t n0, int64_t n1) { rows_int8_scalar(a, p, n0, n1); }
#endif

namespace {
struct Job {
  const LinearArgs* a;
  const Prepared* p;
  Path path;
  ActMode mode;
};
// Tokens are quantized in parallel (M >= 2) through the same "parallel for" as the rows: the
// range [0, M * kTokenSpan) is split by the caller, each piece maps to whole tokens
// [ceil(b / kTokenSpan), ceil(e / kTokenSpan)) -- a partition of [0, M) for any split.
constexpr int64_t kTokenSpan = 64;
struct QJob {
  const LinearArgs* a;
  const Prepared* p;
};
void run_quant(void* ctx, int64_t b, int64_t e) {
  const QJob& j = *static_cast<const QJob*>(ctx);
  quantize_tokens(*j.a, *j.p, (b + kTokenSpan - 1) / kTokenSpan, (e + kTokenSpan - 1) / kTokenSpan);
}
void run_range(void* ctx, int64_t n0, int64_t n1) {
  const Job& j = *static_cast<const Job*>(ctx);
  if (j.mode == ActMode::Fp32) return rows_fp32_scalar(*j.a, n0, n1);
  switch (j.path) {
    case Path::AVX2: return rows_int8_avx2(*j.a, *j.p, n0, n1);
    case Path::AVX512: return rows_int8_avx512(*j.a, *j.p, n0, n1);
    case Path::NEON: return rows_int8_neon(*j.a, *j.p, n0, n1);
    default: return rows_int8_scalar(*j.a, *j.p, n0, n1);
  }
}
}  // namespace

const char* linear(const LinearArgs& a, Path path, ActMode mode, ParallelFor pf) {
  if (a.K <= 0 || a.G <= 0 || a.K % a.G) return "K must be a positive multiple of the group count";
  if (a.row_bytes != (a.K * a.fmt.code_bits + 7) / 8) return "row_bytes does not match K";
  if (a.M == 0 || a.N == 0) return nullptr;
  if (path == Path::Auto) path = best_path();
  if (!path_available(path)) return "requested kernel path is not available on this CPU/build";
  const int64_t gs = a.K / a.G;
  int chunk = chunk_codes(path, a.fmt.code_bits);
  // Chunks must start on a byte boundary inside every group, else the whole call is scalar.
  if (a.G > 1 && (gs * a.fmt.code_bits) % 8 != 0) chunk = 0;
  if (chunk == 0) path = Path::Scalar;
  thread_local std::vector<int8_t> qbuf;
  thread_local std::vector<float> dbuf;
  thread_local std::vector<int32_t> gbuf;
  Prepared prep;
  if (mode == ActMode::Int8) {
    qbuf.resize(static_cast<size_t>(a.M * a.K));
    dbuf.resize(static_cast<size_t>(a.M));
    gbuf.resize(static_cast<size_t>(a.M * a.G));
    quantize_activations_begin(a, chunk, &prep, qbuf.data(), dbuf.data(), gbuf.data());
    if (pf && a.M >= 2) {
      QJob qj{&a, &prep};
      pf(a.M * kTokenSpan, run_quant, &qj);
    } else {
      quantize_tokens(a, prep, 0, a.M);
    }
  }
  Job job{&a, &prep, path, mode};
  if (pf) pf(a.N, run_range, &job);
  else run_range(&job, 0, a.N);
  return nullptr;
}

}  // namespace paretoq
