// Driver (argument checks, activation preparation, threading, path choice) and the scalar
// reference kernels: the canonical arithmetic of paretoq_kernels.h, one code at a time.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "kernels_internal.h"
#if defined(__SSE2__)
#include <emmintrin.h>
#endif
#if defined(PARETOQ_HAVE_NEON) && defined(__linux__)
#include <sys/auxv.h>
#ifndef HWCAP_ASIMDDP
#define HWCAP_ASIMDDP (1 << 20)
#endif
#endif

namespace paretoq {

bool format_for_bits(double bits, Format* f) {
  for (const FormatEntry& e : kFormats)
    if (std::fabs(e.bits - bits) < 1e-6) {
      *f = Format{e.code_bits, e.n_codes, e.zero, e.step, e.storage};
      return true;
    }
  return false;
}

void level_table(const Format& f, float tab[16]) {
  const int mask = (1 << f.code_bits) - 1;
  for (int j = 0; j < 16; ++j) tab[j] = (static_cast<float>(j & mask) - f.zero) * f.step;
}

const char* path_name(Path p) {
  switch (p) {
    case Path::Auto: return "auto";
    case Path::Scalar: return "scalar";
    case Path::AVX2: return "avx2";
    case Path::AVX512: return "avx512";
    case Path::NEON: return "neon";
    case Path::NEONDOT: return "neondot";
  }
  return "?";
}

bool path_available(Path p) {
  switch (p) {
    case Path::Scalar: return true;
#if defined(PARETOQ_HAVE_X86)
    case Path::AVX2: return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    case Path::AVX512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni") &&
             __builtin_cpu_supports("avx512vbmi") && __builtin_cpu_supports("avx512vbmi2") &&
             __builtin_cpu_supports("fma");
#endif
#if defined(PARETOQ_HAVE_NEON)
    case Path::NEON: return true;
    case Path::NEONDOT:
#if defined(__linux__)
      return (getauxval(AT_HWCAP) & HWCAP_ASIMDDP) != 0;
#else
      return false;
#endif
#endif
    default: return false;
  }
}

static Path detect() {
  const Path order[] = {Path::AVX512, Path::AVX2, Path::NEONDOT, Path::NEON};
  if (const char* env = std::getenv("PARETOQ_KERNEL_PATH")) {
    if (std::strcmp(env, "scalar") == 0) return Path::Scalar;
    for (Path p : order)
      if (std::strcmp(env, path_name(p)) == 0 && path_available(p)) return p;
  }
  for (Path p : order)
    if (path_available(p)) return p;
  return Path::Scalar;
}

Path best_path() {
  static const Path p = detect();
  return p;
}

int rows_per_tile(Path p, int64_t) {
  switch (p) {
    case Path::AVX512: return 16;
    case Path::AVX2: return 8;
    case Path::NEON:
    case Path::NEONDOT: return 4;
    default: return 16;
  }
}

int64_t padded_codes(int64_t row_bytes, const Format& f, bool simd) {
  if (!simd) return -1;
  if (f.storage == kTrits5) return (row_bytes + 3) / 4 * 20;
  if (f.code_bits == 3) return (row_bytes + kUnit3Bytes - 1) / kUnit3Bytes * kUnit3Codes;
  return (row_bytes + 3) / 4 * (32 / f.code_bits);
}

static bool trits5_groups_ok(const LinearArgs& a, const char** why) {
  const int64_t gs = a.K / a.G, tail = a.K % 20;
  static thread_local char buf[160];
  if (gs % 4 == 0 && gs >= tail) return true;
  if (why) {
    if (gs % 4)
      std::snprintf(buf, sizeof(buf), "group_size %lld is not a multiple of 4 codes (trits5 planes)", (long long)gs);
    else
      std::snprintf(buf, sizeof(buf), "group_size %lld is smaller than the %lld codes of the row's short last word",
                    (long long)gs, (long long)tail);
    *why = buf;
  }
  return false;
}

bool simd_groups_ok(const LinearArgs& a, const char** why) {
  if (a.G == 1) return true;
  if (a.fmt.storage == kTrits5) return trits5_groups_ok(a, why);
  const int64_t gs = a.K / a.G;
  const int b = a.fmt.code_bits;
  if (b == 3 ? gs % 4 == 0 : (gs * b) % 32 == 0) return true;
  if (why) {
    static thread_local char buf[160];
    if (b == 3)
      std::snprintf(buf, sizeof(buf), "group_size %lld is not a multiple of 4 codes at 3-bit codes", (long long)gs);
    else
      std::snprintf(buf, sizeof(buf), "group_size %lld is not a whole number of 32-bit words at %d-bit codes "
                    "(needs a multiple of %d)", (long long)gs, b, 32 / b);
    *why = buf;
  }
  return false;
}

const char* check_args(const LinearArgs& a) {
  static thread_local char buf[256];
  const int b = a.fmt.code_bits;
  if (b < 1 || b > 4 || (a.fmt.storage != kRowBits && a.fmt.storage != kTrits5))
    return "unknown weight format (code_bits must be 1..4, storage rowbits or trits5)";
  if (a.order != kRowsOrder && a.order != kBlocked16) return "unknown weight order (rows or blocked16)";
  if (a.M < 0 || a.K < 0 || a.N < 0) {
    std::snprintf(buf, sizeof(buf), "negative size: M=%lld K=%lld N=%lld", (long long)a.M, (long long)a.K, (long long)a.N);
    return buf;
  }
  const int64_t want = row_bytes_for(a.fmt, a.K);
  if (a.row_bytes != want) {
    const bool legacy = a.fmt.storage == kTrits5 && a.row_bytes == (a.K * 2 + 7) / 8;
    std::snprintf(buf, sizeof(buf), "input has K=%lld but the packed rows hold %lld bytes (%s needs %lld)%s",
                  (long long)a.K, (long long)a.row_bytes, a.fmt.storage == kTrits5 ? "ternary, 5 codes per byte," : "this format",
                  (long long)want, legacy ? "; that is the 2-bit-field ternary of paretoq-rowbits-v1: export the model again" : "");
    return buf;
  }
  if (a.G < 1 || (a.K > 0 && a.K % a.G != 0)) {
    std::snprintf(buf, sizeof(buf), "scale has G=%lld columns, which does not divide K=%lld", (long long)a.G, (long long)a.K);
    return buf;
  }
  if (a.K > 0 && a.K / a.G > kMaxGroup) {
    std::snprintf(buf, sizeof(buf), "group of %lld inputs exceeds the kernels' limit of %lld (int32 accumulators)",
                  (long long)(a.K / a.G), (long long)kMaxGroup);
    return buf;
  }
  if ((a.M * a.N > 0 && !a.out) || (a.M * a.K > 0 && !a.x) || (a.N * a.row_bytes > 0 && !a.w) || (a.N > 0 && !a.scale))
    return "null data pointer";
  return nullptr;
}

const char* plan(const LinearArgs& a, Path path, ActMode mode, char* buf, size_t n) {
  const Path p = path == Path::Auto ? best_path() : path;
  const char* why = nullptr;
  const char* m = mode == ActMode::Int8 ? "int8" : "fp32";
  if (p == Path::Scalar) {
    std::snprintf(buf, n, "scalar %s", m);
  } else if (!simd_groups_ok(a, &why)) {
    std::snprintf(buf, n, "scalar %s (%s)", m, why);
  } else {
    std::snprintf(buf, n, "%s %s, %d rows per vector", path_name(p), m, rows_per_tile(p, a.M));
  }
  return buf;
}

// ---- activation preparation (int8 mode) --------------------------------------------------------

namespace {

inline int code_at(const uint8_t* row, int64_t k, int b) {
  const int64_t bit = k * b;
  const int64_t byte = bit >> 3;
  const int sh = static_cast<int>(bit & 7);
  unsigned v = row[byte];
  if (sh + b > 8) v |= static_cast<unsigned>(row[byte + 1]) << 8;
  return static_cast<int>((v >> sh) & ((1u << b) - 1u));
}

// trits5: byte and trit of code k (packing.py), and the fp32 chain (slot j) it goes to.
struct TritPos {
  int64_t byte;
  int trit, chain;
};
inline TritPos trit_pos(int64_t k, int64_t row_bytes) {
  const int64_t w = k / 20, o = k % 20, left = row_bytes - 4 * w, nb = left < 4 ? left : 4;
  return TritPos{4 * w + o % nb, static_cast<int>(o / nb), static_cast<int>(o % nb)};
}
inline int trit_of(unsigned byte, int i) {
  static const unsigned kPow3[5] = {1, 3, 9, 27, 81};
  return static_cast<int>((((byte * kPow3[i]) & 255u) * 3u) >> 8);
}

inline float clamp_scale(float s) { return s < kScaleEps ? kScaleEps : s; }

// |x| max and whether every value is finite.
float absmax(const float* x, int64_t K, bool* finite) {
  float amax = 0.f;
  bool ok = true;
  int64_t k = 0;
#if defined(__SSE2__)
  const __m128 sign = _mm_set1_ps(-0.f);
  __m128 m4 = _mm_setzero_ps(), bad = _mm_setzero_ps();
  for (; k + 4 <= K; k += 4) {
    const __m128 v = _mm_loadu_ps(x + k);
    const __m128 z = _mm_sub_ps(v, v);  // NaN exactly where v is NaN or +-Inf
    bad = _mm_or_ps(bad, _mm_cmpunord_ps(z, z));
    m4 = _mm_max_ps(_mm_andnot_ps(sign, v), m4);
  }
  alignas(16) float t[4];
  _mm_store_ps(t, m4);
  for (float v : t) amax = std::max(amax, v);
  ok = _mm_movemask_ps(bad) == 0;
#endif
  for (; k < K; ++k) {
    ok = ok && std::isfinite(x[k]);
    amax = std::max(amax, std::fabs(x[k]));
  }
  *finite = ok;
  return amax;
}

// q = round-half-even(x / d) clamped to +-127, natural order (nat has room for K values).
void quantize_row(const float* x, int64_t K, float d, int8_t* nat) {
  const float kMagic = 12582912.0f;  // 1.5 * 2^23: (v + M) - M rounds |v| < 2^22 half-to-even
  int64_t k = 0;
#if defined(__SSE2__)
  const __m128 vd = _mm_set1_ps(d), lo = _mm_set1_ps(-127.f), hi = _mm_set1_ps(127.f), mg = _mm_set1_ps(kMagic);
  for (; k + 16 <= K; k += 16) {
    __m128i r[4];
    for (int i = 0; i < 4; ++i) {
      __m128 v = _mm_div_ps(_mm_loadu_ps(x + k + 4 * i), vd);
      v = _mm_min_ps(_mm_max_ps(v, lo), hi);
      v = _mm_sub_ps(_mm_add_ps(v, mg), mg);
      r[i] = _mm_cvttps_epi32(v);
    }
    _mm_storeu_si128(reinterpret_cast<__m128i*>(nat + k),
                     _mm_packs_epi16(_mm_packs_epi32(r[0], r[1]), _mm_packs_epi32(r[2], r[3])));
  }
#endif
  for (; k < K; ++k) {
    float v = x[k] / d;
    v = std::min(127.f, std::max(-127.f, v));
    v = (v + kMagic) - kMagic;
    nat[k] = static_cast<int8_t>(static_cast<int>(v));
  }
}

struct QuantJob {
  const LinearArgs* a;
  Prepared* p;
  int8_t* q;
  float* d;
  int32_t* zq2;
  unsigned char* finite;
  bool permute;
};

void quantize_tokens(void* ctx, int64_t m0, int64_t m1) {
  const QuantJob& j = *static_cast<const QuantJob*>(ctx);
  const LinearArgs& a = *j.a;
  const int64_t K = a.K, G = a.G, gs = K / G, kq = j.p->kq;
  const int b = a.fmt.code_bits, cpb = 8 / b, cpw = 32 / b;
  const int zero2 = static_cast<int>(std::lrint(2.0 * a.fmt.zero));
  std::vector<int8_t> nat(static_cast<size_t>(kq), 0);
  for (int64_t m = m0; m < m1; ++m) {
    const float* x = a.x + m * K;
    bool fin = true;
    const float d = absmax(x, K, &fin) / 127.0f;
    int8_t* q = j.q + m * kq;
    j.finite[m] = fin ? 1 : 0;
    if (!fin || !(d > 0.f)) {  // NaN/Inf tokens are redone in fp32 mode; all-zero tokens give 0
      std::memset(q, 0, static_cast<size_t>(kq));
      j.d[m] = 0.f;
      for (int64_t g = 0; g < G; ++g) j.zq2[m * G + g] = 0;
      continue;
    }
    j.d[m] = d;
    quantize_row(x, K, d, nat.data());
    for (int64_t g = 0; g < G; ++g) {
      int32_t s = 0;
      for (int64_t k = g * gs; k < (g + 1) * gs; ++k) s += nat[k];
      j.zq2[m * G + g] = zero2 * s;
    }
    if (j.permute && a.fmt.storage == kTrits5) {  // slot order (identity but in a short last word)
      for (int64_t s = 0; s < kq; ++s) {
        const int64_t k = trits5_slot_code(s, K, a.row_bytes);
        q[s] = k < 0 ? 0 : nat[k];
      }
      continue;
    }
    if (!j.permute || b == 3) {
      std::memcpy(q, nat.data(), static_cast<size_t>(kq));
      continue;
    }
    for (int64_t w = 0; w < kq / cpw; ++w)
      for (int t = 0; t < cpb; ++t)
        for (int i = 0; i < 4; ++i) q[w * cpw + 4 * t + i] = nat[w * cpw + cpb * i + t];
  }
}

}  // namespace

// ---- scalar reference --------------------------------------------------------------------------

// The canonical arithmetic, one code at a time. code(row, k) gives code k of a row and the fp32
// chain it goes to: k mod 4 (rowbits), the slot j of its word (trits5).
struct CodeChain {
  int code, chain;
};

// Row n of kBlocked16 buffers in kRows order: its row_bytes code bytes and G scales.
static void gather_blocked_row(const LinearArgs& a, int64_t n, std::vector<uint8_t>* row, std::vector<float>* sc) {
  const int64_t rbp = blocked_row_bytes(a.fmt, a.row_bytes);
  const int64_t blk = n / kBlockRows, lane = n % kBlockRows;
  const uint8_t* wb = a.w + blk * rbp * kBlockRows + lane * 4;
  row->resize(static_cast<size_t>(a.row_bytes));
  for (int64_t b = 0; b < a.row_bytes; ++b) (*row)[b] = wb[(b / 4) * 4 * kBlockRows + b % 4];
  const float* sb = a.scale + blk * a.G * kBlockRows + lane;
  sc->resize(static_cast<size_t>(a.G));
  for (int64_t g = 0; g < a.G; ++g) (*sc)[g] = sb[g * kBlockRows];
}

template <class CodeFn>
static void rows_scalar_impl(const LinearArgs& a, const Prepared& p, ActMode mode, int64_t n0, int64_t n1,
                             CodeFn code) {
  const int64_t gs = a.K / a.G;
  float tab[16];
  level_table(a.fmt, tab);
  const float c = 0.5f * a.fmt.step;
  std::vector<uint8_t> rowbuf;
  std::vector<float> scbuf;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = a.w + n * a.row_bytes;
    const float* s = a.scale + n * a.G;
    if (a.order == kBlocked16) {
      gather_blocked_row(a, n, &rowbuf, &scbuf);
      row = rowbuf.data();
      s = scbuf.data();
    }
    for (int64_t m = 0; m < a.M; ++m) {
      float res = 0.f;
      if (mode == ActMode::Int8) {
        const int8_t* q = p.q + m * p.kq;
        for (int64_t g = 0; g < a.G; ++g) {
          int64_t dot = 0;
          for (int64_t k = g * gs; k < (g + 1) * gs; ++k) dot += code(row, k).code * q[k];
          const int32_t v2 = static_cast<int32_t>(2 * dot - p.zq2[m * a.G + g]);
          res = std::fma(clamp_scale(s[g]), static_cast<float>(v2), res);
        }
        a.out[m * a.N + n] = (res * c) * p.d[m];
      } else {
        const float* x = p.xf + m * p.kq;
        for (int64_t g = 0; g < a.G; ++g) {
          float acc[4] = {0.f, 0.f, 0.f, 0.f};
          for (int64_t k = g * gs; k < (g + 1) * gs; ++k) {
            const CodeChain cc = code(row, k);
            acc[cc.chain] = std::fma(tab[cc.code], x[k], acc[cc.chain]);
          }
          res = std::fma(clamp_scale(s[g]), (acc[0] + acc[1]) + (acc[2] + acc[3]), res);
        }
        a.out[m * a.N + n] = res;
      }
    }
  }
}

void rows_scalar(const LinearArgs& a, const Prepared& p, ActMode mode, int64_t n0, int64_t n1) {
  if (a.fmt.storage == kTrits5) {
    const int64_t rb = a.row_bytes;
    return rows_scalar_impl(a, p, mode, n0, n1, [rb](const uint8_t* row, int64_t k) {
      const TritPos t = trit_pos(k, rb);
      return CodeChain{trit_of(row[t.byte], t.trit), t.chain};
    });
  }
  const int b = a.fmt.code_bits;
  rows_scalar_impl(a, p, mode, n0, n1, [b](const uint8_t* row, int64_t k) {
    return CodeChain{code_at(row, k, b), static_cast<int>(k & 3)};
  });
}

#if !defined(PARETOQ_HAVE_X86)
void rows_avx2(const LinearArgs& a, const Prepared& p, ActMode m, int64_t n0, int64_t n1) { rows_scalar(a, p, m, n0, n1); }
void rows_avx512(const LinearArgs& a, const Prepared& p, ActMode m, int64_t n0, int64_t n1) { rows_scalar(a, p, m, n0, n1); }
#endif
#if !defined(PARETOQ_HAVE_NEON)
void rows_neon(const LinearArgs& a, const Prepared& p, ActMode m, int64_t n0, int64_t n1) { rows_scalar(a, p, m, n0, n1); }
void rows_neondot(const LinearArgs& a, const Prepared& p, ActMode m, int64_t n0, int64_t n1) { rows_scalar(a, p, m, n0, n1); }
#endif

uint64_t stream_read_scalar(const uint8_t* p, size_t n) {
  uint64_t acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  size_t i = 0;
  for (; i + 64 <= n; i += 64)
    for (int j = 0; j < 8; ++j) {
      uint64_t v;
      std::memcpy(&v, p + i + 8 * j, 8);
      acc[j] += v;
    }
  uint64_t s = 0;
  for (int j = 0; j < 8; ++j) s += acc[j];
  for (; i < n; ++i) s += p[i];
  return s;
}

uint64_t stream_read(const uint8_t* p, size_t n) {
#if defined(PARETOQ_HAVE_X86)
  if (best_path() == Path::AVX512) return stream_read_avx512(p, n);  // full-width loads
  if (best_path() == Path::AVX2) return stream_read_avx2(p, n);
#endif
  return stream_read_scalar(p, n);
}

// ---- driver ------------------------------------------------------------------------------------

namespace {

struct RowJob {
  const LinearArgs* a;
  const Prepared* p;
  Path path;
  ActMode mode;
  int64_t tile;
};

void run_rows(void* ctx, int64_t t0, int64_t t1) {
  const RowJob& j = *static_cast<const RowJob*>(ctx);
  const int64_t n0 = t0 * j.tile, n1 = std::min(j.a->N, t1 * j.tile);
  if (n0 >= n1) return;
  switch (j.path) {
    case Path::AVX2: return rows_avx2(*j.a, *j.p, j.mode, n0, n1);
    case Path::AVX512: return rows_avx512(*j.a, *j.p, j.mode, n0, n1);
    case Path::NEON: return rows_neon(*j.a, *j.p, j.mode, n0, n1);
    case Path::NEONDOT: return rows_neondot(*j.a, *j.p, j.mode, n0, n1);
    default: return rows_scalar(*j.a, *j.p, j.mode, n0, n1);
  }
}

void serial(int64_t n, RangeFn fn, void* ctx) { fn(ctx, 0, n); }

}  // namespace

const char* linear(const LinearArgs& a, Path path, ActMode mode, ParallelFor pf) {
  if (const char* e = check_args(a)) return e;
  if (!pf) pf = serial;
  if (a.M == 0 || a.N == 0) return nullptr;
  if (a.K == 0) {
    std::fill(a.out, a.out + a.M * a.N, 0.f);
    return nullptr;
  }
  Path p = path == Path::Auto ? best_path() : path;
  if (!path_available(p)) return "the requested kernel path is not available on this CPU";
  if (p != Path::Scalar && !simd_groups_ok(a, nullptr)) p = Path::Scalar;
  const bool simd = p != Path::Scalar;
  Prepared pr;
  pr.M = a.M; pr.K = a.K; pr.G = a.G; pr.gs = a.K / a.G;
  pr.kq = simd ? padded_codes(a.row_bytes, a.fmt, true) : a.K;
  thread_local std::vector<int8_t> qbuf;
  thread_local std::vector<float> dbuf, xbuf;
  thread_local std::vector<int32_t> zbuf;
  thread_local std::vector<unsigned char> fbuf;
  // The first row block is not prefetched by the block before it: start its reads now, so that
  // they overlap the activation preparation (the kernels prefetch each next block themselves).
  const int64_t first = std::min<int64_t>(a.N, 16) * a.row_bytes;
  for (int64_t i = 0; i < first; i += 64) __builtin_prefetch(a.w + i, 0, 2);
  for (int64_t i = 0; i < std::min<int64_t>(a.N, 16) * a.G * 4; i += 64)
    __builtin_prefetch(reinterpret_cast<const uint8_t*>(a.scale) + i, 0, 2);
  if (mode == ActMode::Int8) {
    qbuf.resize(static_cast<size_t>(a.M * pr.kq));
    dbuf.resize(static_cast<size_t>(a.M));
    zbuf.resize(static_cast<size_t>(a.M * a.G));
    fbuf.resize(static_cast<size_t>(a.M));
    QuantJob qj{&a, &pr, qbuf.data(), dbuf.data(), zbuf.data(), fbuf.data(), simd};
    pf(a.M, quantize_tokens, &qj);
    pr.q = qbuf.data(); pr.d = dbuf.data(); pr.zq2 = zbuf.data();
  } else if (pr.kq == a.K) {
    pr.xf = a.x;
  } else if (simd && a.fmt.storage == kTrits5) {  // slot order, zero where no code
    xbuf.assign(static_cast<size_t>(a.M * pr.kq), 0.f);
    const int64_t full = a.K / 20 * 20;  // whole words: the identity
    for (int64_t m = 0; m < a.M; ++m) {
      float* dst = xbuf.data() + m * pr.kq;
      const float* src = a.x + m * a.K;
      std::memcpy(dst, src, sizeof(float) * full);
      for (int64_t s = full; s < pr.kq; ++s) {
        const int64_t k = trits5_slot_code(s, a.K, a.row_bytes);
        if (k >= 0) dst[s] = src[k];
      }
    }
    pr.xf = xbuf.data();
  } else {
    xbuf.assign(static_cast<size_t>(a.M * pr.kq), 0.f);
    for (int64_t m = 0; m < a.M; ++m) std::memcpy(xbuf.data() + m * pr.kq, a.x + m * a.K, sizeof(float) * a.K);
    pr.xf = xbuf.data();
  }
  const int64_t tile = rows_per_tile(p, a.M);
  RowJob rj{&a, &pr, p, mode, tile};
  pf((a.N + tile - 1) / tile, run_rows, &rj);
  if (mode == ActMode::Int8) {
    for (int64_t m = 0; m < a.M; ++m) {
      if (fbuf[m]) continue;
      LinearArgs one = a;  // a token with NaN/Inf: float activations, so they propagate as in eager
      one.x = a.x + m * a.K;
      one.M = 1;
      one.out = a.out + m * a.N;
      if (const char* e = linear(one, path, ActMode::Fp32, pf)) return e;
    }
  }
  return nullptr;
}

}  // namespace paretoq
