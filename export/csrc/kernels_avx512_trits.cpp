// AVX-512 path, ternary (trits5) codes: its own translation unit (see simd_impl.h, rows_trits).
#include "avx512_traits.h"

namespace paretoq {
void rows_avx512_trits(const LinearArgs& a, const Prepared& p, ActMode mode, int64_t n0, int64_t n1) {
  simd::rows_trits<Avx512>(a, p, mode, n0, n1);
}
}  // namespace paretoq
