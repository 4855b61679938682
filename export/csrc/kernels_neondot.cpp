// NEON path with the ARMv8.2 dot-product instructions (compiled with -march=armv8.2-a+dotprod;
// chosen at run time when the CPU reports asimddp, see neon_traits.h).
#include "neon_traits.h"

namespace paretoq {
void rows_neondot(const LinearArgs& a, const Prepared& p, ActMode mode, int64_t n0, int64_t n1) {
  simd::rows<NeonT<true>>(a, p, mode, n0, n1);
}
}  // namespace paretoq
