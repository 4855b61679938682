// AVX2 traits (compiled with -mavx2 -mfma): 8 rows per vector; u8 x s8 dot products with
// vpmaddubsw + vpmaddwd (codes <= 15, |q| <= 127: int16 pair sums cannot saturate); 3-bit quads
// cut out and spread with shifts and masks; float levels with vpermps (8 entries, codes < 8) or,
// for 4-bit codes, int -> float conversion and one FMA.
// Shared by kernels_avx2.cpp (1/2/3/4-bit codes, the dispatch entry) and kernels_avx2_trits.cpp
// (ternary), two translation units compiled with the same flags.
#pragma once
#include <immintrin.h>

#include "simd_impl.h"

namespace paretoq {
namespace {

struct Avx2 {
  static constexpr int NB = 8, kMT8 = 4, kMT = 2;  // kMT8 4: 3-bit prefill 1.3-1.6x faster than 2 (Zen 1)
  static constexpr bool kMaskedPlanes = false;  // vpmaddubsw int16 pair sums would saturate
  static constexpr bool kRawTrits = false;      // (the same reason)
  static constexpr bool kDot16 = true;          // vpmaddwd once per spill, not once per dot
  using VI = __m256i;
  using VF = __m256;
  struct Levels { VF tab, step, bias; };

  PQ_INLINE static __m128i ld(const uint8_t* p) { return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)); }
  PQ_INLINE static VI ld2(const uint8_t* p0, const uint8_t* p1) {
    return _mm256_inserti128_si256(_mm256_castsi128_si256(ld(p0)), ld(p1), 1);
  }
  // 16 bytes of rows b + i * st, i = 0..7; 128-bit lane l of A/B/C/D holds rows 4l .. 4l+3, and the
  // 4x4 transpose inside each 128-bit lane puts row i in lane i of every word vector.
  PQ_INLINE static VI load_i(const uint8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
  PQ_INLINE static void load4(const uint8_t* b, int64_t st, VI out[4]) {
    const int64_t s3 = 3 * st, s5 = 5 * st, s7 = 7 * st;
    const VI A = ld2(b, b + 4 * st), B = ld2(b + st, b + s5), C = ld2(b + 2 * st, b + 2 * s3), D = ld2(b + s3, b + s7);
    const VI t0 = _mm256_unpacklo_epi32(A, B), t1 = _mm256_unpackhi_epi32(A, B);
    const VI t2 = _mm256_unpacklo_epi32(C, D), t3 = _mm256_unpackhi_epi32(C, D);
    out[0] = _mm256_unpacklo_epi64(t0, t2);
    out[1] = _mm256_unpackhi_epi64(t0, t2);
    out[2] = _mm256_unpacklo_epi64(t1, t3);
    out[3] = _mm256_unpackhi_epi64(t1, t3);
  }
  template <int S> PQ_INLINE static VI srl(VI v) {
    if constexpr (S == 0) return v;
    else return _mm256_srli_epi32(v, S);
  }
  template <int S> PQ_INLINE static VI sll(VI v) { return _mm256_slli_epi32(v, S); }
  template <int S> PQ_INLINE static VI sra(VI v) {
    if constexpr (S == 0) return v;
    else return _mm256_srai_epi32(v, S);
  }
  template <int S> PQ_INLINE static VI window(VI lo, VI hi) {
    return _mm256_or_si256(_mm256_srli_epi32(lo, S), _mm256_slli_epi32(hi, 32 - S));
  }
  PQ_INLINE static VI spread3(VI w) {
    const VI b0 = _mm256_and_si256(w, _mm256_set1_epi32(0x7));
    const VI b1 = _mm256_and_si256(_mm256_slli_epi32(w, 5), _mm256_set1_epi32(0x700));
    const VI b2 = _mm256_and_si256(_mm256_slli_epi32(w, 10), _mm256_set1_epi32(0x70000));
    const VI b3 = _mm256_and_si256(_mm256_slli_epi32(w, 15), _mm256_set1_epi32(0x7000000));
    return _mm256_or_si256(_mm256_or_si256(b0, b1), _mm256_or_si256(b2, b3));
  }
  PQ_INLINE static VI dotp(VI p, VI u, const int8_t* x4) {
    int32_t v;
    std::memcpy(&v, x4, 4);
    return _mm256_add_epi16(p, _mm256_maddubs_epi16(u, _mm256_set1_epi32(v)));
  }
  PQ_INLINE static VI widen(VI acc, VI p) { return _mm256_add_epi32(acc, _mm256_madd_epi16(p, _mm256_set1_epi16(1))); }
  PQ_INLINE static VI dot(VI acc, VI u, const int8_t* x4) { return widen(acc, dotp(zero_i(), u, x4)); }
  // trits5 state: the bytes with their top bit flipped, so that signed byte compares order them as
  // unsigned; 3 * (s ^ 0x80) == (3 * s) ^ 0x80 (mod 256), so mul3 keeps the bias.
  PQ_INLINE static VI tstate(VI w) { return _mm256_xor_si256(w, _mm256_set1_epi8(static_cast<char>(0x80))); }
  PQ_INLINE static VI mul3(VI s) { return _mm256_add_epi8(_mm256_add_epi8(s, s), s); }
  PQ_INLINE static VI trit(VI s) {  // -(s > 85) - (s > 170), compares on the biased bytes
    const VI gt85 = _mm256_cmpgt_epi8(s, _mm256_set1_epi8(85 - 128));
    const VI gt170 = _mm256_cmpgt_epi8(s, _mm256_set1_epi8(170 - 128));
    return _mm256_sub_epi8(_mm256_sub_epi8(_mm256_setzero_si256(), gt85), gt170);
  }
  PQ_INLINE static VI band(VI a, VI b) { return _mm256_and_si256(a, b); }
  PQ_INLINE static VI add(VI a, VI b) { return _mm256_add_epi32(a, b); }
  PQ_INLINE static VI sub(VI a, VI b) { return _mm256_sub_epi32(a, b); }
  PQ_INLINE static VI set1_i(int32_t v) { return _mm256_set1_epi32(v); }
  PQ_INLINE static VI zero_i() { return _mm256_setzero_si256(); }
  PQ_INLINE static VF load_f(const float* p) { return _mm256_loadu_ps(p); }
  PQ_INLINE static VF as_f(VI v) { return _mm256_castsi256_ps(v); }
  PQ_INLINE static VF cvt(VI v) { return _mm256_cvtepi32_ps(v); }
  PQ_INLINE static VF fma(VF a, VF b, VF c) { return _mm256_fmadd_ps(a, b, c); }
  PQ_INLINE static VF add_f(VF a, VF b) { return _mm256_add_ps(a, b); }
  PQ_INLINE static VF mul_f(VF a, VF b) { return _mm256_mul_ps(a, b); }
  PQ_INLINE static VF set1_f(float v) { return _mm256_set1_ps(v); }
  PQ_INLINE static VF zero_f() { return _mm256_setzero_ps(); }
  PQ_INLINE static VF max_eps(VF s) { return _mm256_max_ps(_mm256_set1_ps(kScaleEps), s); }
  PQ_INLINE static Levels levels(const float* tab, float step, float bias) {
    return Levels{_mm256_loadu_ps(tab), _mm256_set1_ps(step), _mm256_set1_ps(bias)};
  }
  template <int B> PQ_INLINE static VF level(VI v, const Levels& lv) {
    if constexpr (B <= 3) {
      return _mm256_permutevar8x32_ps(lv.tab, v);
    } else {  // (code - zero) * step == fma(code, step, -zero * step), exact for every format
      const VF c = _mm256_cvtepi32_ps(_mm256_and_si256(v, _mm256_set1_epi32(15)));
      return _mm256_fmadd_ps(c, lv.step, lv.bias);
    }
  }
  PQ_INLINE static void store(float* dst, VF v, int lo, int hi) {
    if (lo == 0 && hi == NB) {
      _mm256_storeu_ps(dst, v);
      return;
    }
    alignas(32) float t[NB];
    _mm256_store_ps(t, v);
    std::memcpy(dst + lo, t + lo, sizeof(float) * static_cast<size_t>(hi - lo));
  }
};

}  // namespace
}  // namespace paretoq
