// NEON path, baseline ARMv8-A (see neon_traits.h).
#include "neon_traits.h"

namespace paretoq {
void rows_neon(const LinearArgs& a, const Prepared& p, ActMode mode, int64_t n0, int64_t n1) {
  simd::rows<NeonT<false>>(a, p, mode, n0, n1);
}
}  // namespace paretoq
