// AVX-512 path: 1/2/3/4-bit codes and the entry point (traits in avx512_traits.h).
#include "avx512_traits.h"

namespace paretoq {

void rows_avx512(const LinearArgs& a, const Prepared& p, ActMode mode, int64_t n0, int64_t n1) {
  if (a.fmt.storage == kTrits5) return rows_avx512_trits(a, p, mode, n0, n1);  // kernels_avx512_trits.cpp
  simd::rows_rowbits<Avx512>(a, p, mode, n0, n1);
}

uint64_t stream_read_avx512(const uint8_t* p, size_t n) {
  __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
  size_t i = 0;
  for (; i + 256 <= n; i += 256) {
    a0 = _mm512_add_epi64(a0, _mm512_loadu_si512(p + i));
    a1 = _mm512_add_epi64(a1, _mm512_loadu_si512(p + i + 64));
    a2 = _mm512_add_epi64(a2, _mm512_loadu_si512(p + i + 128));
    a3 = _mm512_add_epi64(a3, _mm512_loadu_si512(p + i + 192));
  }
  uint64_t s = static_cast<uint64_t>(_mm512_reduce_add_epi64(_mm512_add_epi64(_mm512_add_epi64(a0, a1), _mm512_add_epi64(a2, a3))));
  return s + stream_read_scalar(p + i, n - i);
}

}  // namespace paretoq
