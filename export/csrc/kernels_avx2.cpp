// AVX2 path: 1/2/3/4-bit codes and the entry point (traits in avx2_traits.h).
#include "avx2_traits.h"

namespace paretoq {

uint64_t stream_read_avx2(const uint8_t* p, size_t n) {
  __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
  size_t i = 0;
  for (; i + 128 <= n; i += 128) {
    a0 = _mm256_add_epi64(a0, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i)));
    a1 = _mm256_add_epi64(a1, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i + 32)));
    a2 = _mm256_add_epi64(a2, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i + 64)));
    a3 = _mm256_add_epi64(a3, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i + 96)));
  }
  alignas(32) uint64_t lanes[4];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), _mm256_add_epi64(_mm256_add_epi64(a0, a1), _mm256_add_epi64(a2, a3)));
  return lanes[0] + lanes[1] + lanes[2] + lanes[3] + stream_read_scalar(p + i, n - i);
}

void rows_avx2(const LinearArgs& a, const Prepared& p, ActMode mode, int64_t n0, int64_t n1) {
  if (a.fmt.storage == kTrits5) return rows_avx2_trits(a, p, mode, n0, n1);  // kernels_avx2_trits.cpp
  simd::rows_rowbits<Avx2>(a, p, mode, n0, n1);
}

}  // namespace paretoq
