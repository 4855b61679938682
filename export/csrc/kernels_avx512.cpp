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
  template <int B>
  static V plane(V v, int pl) {
    const V mask = _mm512_set1_epi8(static_cast<char>((1 << B) - 1));
    return _mm512_and_si512(_mm512_srl_epi16(v, _mm_cvtsi32_si128(pl * B)), mask);
  }
  static Acc dot(Acc acc, V u, V x) { return _mm512_dpbusd_epi32(acc, u, x); }
  static int64_t reduce(Acc acc) { return _mm512_reduce_add_epi32(acc); }
};
}  // namespace

void rows_int8_avx512(const LinearArgs& a, const Prepared& p, int64_t n0, int64_t n1) {
  simd::rows_dispatch<Avx512>(a, p, n0, n1);
}
}  // namespace paretoq
