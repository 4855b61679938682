// AVX-512 traits (compiled with -mavx512f -mavx512bw -mavx512vl -mavx512vnni -mavx512vbmi
// -mavx512vbmi2 -mfma): 16 rows per vector; u8 x s8 dot products with vpdpbusd; 3-bit quads cut
// out with vpshrdd (funnel shift) and spread into bytes with one vpmultishiftqb; float levels
// looked up with vpermps (16-entry table indexed by the low 4 bits of each lane).
// Shared by kernels_avx512.cpp (1/2/3/4-bit codes, the dispatch entry) and kernels_avx512_trits.cpp
// (ternary), two translation units compiled with the same flags.
#pragma once
#include <immintrin.h>

#include "simd_impl.h"

namespace paretoq {
namespace {

struct Avx512 {
  static constexpr int NB = 16, kMT8 = 8, kMT = 4;
  static constexpr bool kMaskedPlanes = true;  // vpdpbusd takes u8 codes up to 255
  static constexpr bool kRawTrits = true;      // and raw trits5 states up to 255
  static constexpr bool kDot16 = false;
  using VI = __m512i;
  using VF = __m512;
  struct Levels { VF tab; };

  PQ_INLINE static __m128i ld(const uint8_t* p) { return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)); }
  PQ_INLINE static VI ld4(const uint8_t* p0, const uint8_t* p1, const uint8_t* p2, const uint8_t* p3) {
    VI v = _mm512_castsi128_si512(ld(p0));
    v = _mm512_inserti32x4(v, ld(p1), 1);
    v = _mm512_inserti32x4(v, ld(p2), 2);
    return _mm512_inserti32x4(v, ld(p3), 3);
  }
  // 16 bytes of rows b + i * st, i = 0..15. 128-bit lane l of A/B/C/D holds rows 4l / 4l+1 / 4l+2 /
  // 4l+3; the 4x4 transpose inside each 128-bit lane then puts row i in lane i of every word vector.
  // Every row address is one x86 addressing mode over b, b + 8 st and the multiples st, 3st, 5st, 7st.
  PQ_INLINE static VI load_i(const uint8_t* p) { return _mm512_loadu_si512(p); }
  PQ_INLINE static void load4(const uint8_t* b, int64_t st, VI out[4]) {
    const int64_t s3 = 3 * st, s5 = 5 * st, s7 = 7 * st;
    const uint8_t* b8 = b + 8 * st;
    const VI A = ld4(b, b + 4 * st, b8, b8 + 4 * st);
    const VI B = ld4(b + st, b + s5, b8 + st, b8 + s5);
    const VI C = ld4(b + 2 * st, b + 2 * s3, b8 + 2 * st, b8 + 2 * s3);
    const VI D = ld4(b + s3, b + s7, b8 + s3, b8 + s7);
    const VI t0 = _mm512_unpacklo_epi32(A, B), t1 = _mm512_unpackhi_epi32(A, B);
    const VI t2 = _mm512_unpacklo_epi32(C, D), t3 = _mm512_unpackhi_epi32(C, D);
    out[0] = _mm512_unpacklo_epi64(t0, t2);
    out[1] = _mm512_unpackhi_epi64(t0, t2);
    out[2] = _mm512_unpacklo_epi64(t1, t3);
    out[3] = _mm512_unpackhi_epi64(t1, t3);
  }
  template <int S> PQ_INLINE static VI srl(VI v) {
    if constexpr (S == 0) return v;
    else return _mm512_srli_epi32(v, S);
  }
  template <int S> PQ_INLINE static VI sll(VI v) { return _mm512_slli_epi32(v, S); }
  template <int S> PQ_INLINE static VI sra(VI v) {
    if constexpr (S == 0) return v;
    else return _mm512_srai_epi32(v, S);
  }
  template <int S> PQ_INLINE static VI window(VI lo, VI hi) { return _mm512_shrdi_epi32(lo, hi, S); }
  PQ_INLINE static VI spread3(VI w) {
    // byte offsets of the 4 codes of the low lane (0, 3, 6, 9) and of the high lane (32 + ...)
    const VI ctrl = _mm512_set1_epi64(0x2926232009060300LL);
    return _mm512_and_si512(_mm512_multishift_epi64_epi8(ctrl, w), _mm512_set1_epi8(7));
  }
  PQ_INLINE static VI dot(VI acc, VI u, const int8_t* x4) {
#if defined(__GNUC__)
    // The activation dword as an embedded {1to16} broadcast memory operand, accumulator in place
    // (the intrinsic form costs a broadcast and, with GCC 12, register copies per vpdpbusd).
    __asm__("vpdpbusd %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(u), "m"(*reinterpret_cast<const int32_t*>(x4)));
    return acc;
#else
    int32_t v;
    std::memcpy(&v, x4, 4);
    return _mm512_dpbusd_epi32(acc, u, _mm512_set1_epi32(v));
#endif
  }
  PQ_INLINE static VI tstate(VI w) { return w; }
  PQ_INLINE static VI mul3(VI s) { return _mm512_add_epi8(_mm512_add_epi8(s, s), s); }
  PQ_INLINE static VI trit(VI s) {
    const VI one = _mm512_set1_epi8(1);
    const __mmask64 gt85 = _mm512_cmpgt_epu8_mask(s, _mm512_set1_epi8(85));
    const __mmask64 gt170 = _mm512_cmpgt_epu8_mask(s, _mm512_set1_epi8(static_cast<char>(170)));
    const VI t = _mm512_maskz_mov_epi8(gt85, one);
    return _mm512_mask_add_epi8(t, gt170, t, one);
  }
  PQ_INLINE static VI band(VI a, VI b) { return _mm512_and_si512(a, b); }
  PQ_INLINE static VI add(VI a, VI b) { return _mm512_add_epi32(a, b); }
  PQ_INLINE static VI sub(VI a, VI b) { return _mm512_sub_epi32(a, b); }
  PQ_INLINE static VI set1_i(int32_t v) { return _mm512_set1_epi32(v); }
  PQ_INLINE static VI zero_i() { return _mm512_setzero_si512(); }
  PQ_INLINE static VF load_f(const float* p) { return _mm512_loadu_ps(p); }
  PQ_INLINE static VF as_f(VI v) { return _mm512_castsi512_ps(v); }
  PQ_INLINE static VF cvt(VI v) { return _mm512_cvtepi32_ps(v); }
  PQ_INLINE static VF fma(VF a, VF b, VF c) { return _mm512_fmadd_ps(a, b, c); }
  PQ_INLINE static VF add_f(VF a, VF b) { return _mm512_add_ps(a, b); }
  PQ_INLINE static VF mul_f(VF a, VF b) { return _mm512_mul_ps(a, b); }
  PQ_INLINE static VF set1_f(float v) { return _mm512_set1_ps(v); }
  PQ_INLINE static VF zero_f() { return _mm512_setzero_ps(); }
  PQ_INLINE static VF max_eps(VF s) { return _mm512_max_ps(_mm512_set1_ps(kScaleEps), s); }  // NaN s stays NaN
  PQ_INLINE static Levels levels(const float* tab, float, float) { return Levels{_mm512_loadu_ps(tab)}; }
  template <int B> PQ_INLINE static VF level(VI v, const Levels& lv) { return _mm512_permutexvar_ps(v, lv.tab); }
  // lanes [lo, hi) of v to dst[lo .. hi)
  PQ_INLINE static void store(float* dst, VF v, int lo, int hi) {
    if (lo == 0 && hi == NB) _mm512_storeu_ps(dst, v);
    else _mm512_mask_storeu_ps(dst, static_cast<__mmask16>(((1u << hi) - 1u) & ~((1u << lo) - 1u)), v);
  }
};

}  // namespace
}  // namespace paretoq
