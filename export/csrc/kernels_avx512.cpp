// AVX-512 VNNI path (compiled with -mavx512f -mavx512bw -mavx512vnni): 64-byte vectors,
// u8 x s8 -> s32 with one vpdpbusd.
#include <immintrin.h>
#include "simd_impl.h"

namespace paretoq {
namespace {
struct Avx512 {
  static constexpr int W = 64;
  using V = __m512i;
  using Acc = __m512i;
  static V load(const void* p) { return _mm512_loadu_si512(p); }
  static Acc zero() { return _mm512_setzero_si512(); }
  // vpdpbusd takes u8 codes up to 255 (4 * 255 * 127 per lane and step): planes can be
  // extracted with one AND, pre-scaled by 2^(p*B) (see simd_impl.h).
  static constexpr bool kMaskPlanes = true;
  static constexpr int kRows = 4;
  static constexpr bool kPairSums = false;
  static V set1(char c) { return _mm512_set1_epi8(c); }
  static V band(V v, V m) { return _mm512_and_si512(v, m); }
  static V shr(V v, int s) { return s == 0 ? v : _mm512_srli_epi16(v, s); }
  static Acc add32(Acc a, Acc b) { return _mm512_add_epi32(a, b); }
  static Acc sra32(Acc a, int s) { return _mm512_srai_epi32(a, s); }
  static Acc dot(Acc acc, V u, V x) {
#if defined(__GNUC__) && !defined(__clang__)
    // GCC (12) does not tie the accumulator of the intrinsic to its loop-carried register and
    // emits two vmovdqa per vpdpbusd in the blocked loops; the asm form keeps it in place.
    __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(u), "vm"(x));
    return acc;
#else
    return _mm512_dpbusd_epi32(acc, u, x);
#endif
  }
  static int64_t reduce(Acc acc) { return _mm512_reduce_add_epi32(acc); }
};
}  // namespace

void rows_int8_avx512(const LinearArgs& a, const Prepared& p, int64_t n0, int64_t n1) {
  simd::rows_dispatch<Avx512>(a, p, n0, n1);
}
}  // namespace paretoq
