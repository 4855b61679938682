// NEON path (AArch64): 16-byte vectors, u8 codes x s8 activations via vmull_s8 / vmlal_high_s8
// (codes <= 15 so reinterpreting them as s8 is exact), pairwise-accumulated into int32.
#include <arm_neon.h>
#include "simd_impl.h"

namespace paretoq {
namespace {
struct Neon {
  static constexpr int W = 16;
  using V = int8x16_t;
  using Acc = int32x4_t;
  static V load(const void* p) { return vld1q_s8(static_cast<const int8_t*>(p)); }
  static Acc zero() { return vdupq_n_s32(0); }
  static constexpr bool kMaskPlanes = false;  // vmull_s8 needs codes < 128
  static constexpr int kRows = 4;
  static constexpr bool kPairSums = false;
  static V set1(char c) { return vdupq_n_s8(static_cast<int8_t>(c)); }
  static V band(V v, V m) { return vandq_s8(v, m); }
  static V shr(V v, int s) {  // per byte (the caller masks anyway)
    return vreinterpretq_s8_u8(vshlq_u8(vreinterpretq_u8_s8(v), vdupq_n_s8(static_cast<int8_t>(-s))));
  }
  static Acc add32(Acc a, Acc b) { return vaddq_s32(a, b); }
  static Acc sra32(Acc a, int s) { return vshlq_s32(a, vdupq_n_s32(-s)); }
  static Acc dot(Acc acc, V u, V x) {
    int16x8_t s = vmull_s8(vget_low_s8(u), vget_low_s8(x));
    s = vmlal_high_s8(s, u, x);  // |sum| <= 2 * 15 * 127
    return vpadalq_s16(acc, s);
  }
  static int64_t reduce(Acc acc) { return vaddvq_s32(acc); }
};
}  // namespace

void rows_int8_neon(const LinearArgs& a, const Prepared& p, int64_t n0, int64_t n1) {
  simd::rows_dispatch<Neon>(a, p, n0, n1);
}
}  // namespace paretoq
