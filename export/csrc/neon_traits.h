// NEON traits (AArch64), shared by kernels_neon.cpp (baseline ARMv8: vmull_s8 + pairwise adds)
// and kernels_neondot.cpp (compiled with +dotprod: one sdot per 16 bytes). 4 rows per vector.
#pragma once
#include <arm_neon.h>

#include "simd_impl.h"

namespace paretoq {

template <bool kDot>
struct NeonT {
  static constexpr int NB = 4, kMT8 = 8, kMT = 4;
  static constexpr bool kMaskedPlanes = false;  // s8 x s8 products: codes must stay < 128
  static constexpr bool kRawTrits = false;
  static constexpr bool kDot16 = false;
  using VI = uint32x4_t;
  using VF = float32x4_t;
  struct Levels { VF step, bias; };

  PQ_INLINE static VI load_i(const uint8_t* p) { return vreinterpretq_u32_u8(vld1q_u8(p)); }
  // 16 bytes of rows b + i * st, i = 0..3, transposed: row i in lane i of every word vector.
  PQ_INLINE static void load4(const uint8_t* p, int64_t st, VI out[4]) {
    const VI a = vreinterpretq_u32_u8(vld1q_u8(p)), b = vreinterpretq_u32_u8(vld1q_u8(p + st));
    const VI c = vreinterpretq_u32_u8(vld1q_u8(p + 2 * st)), d = vreinterpretq_u32_u8(vld1q_u8(p + 3 * st));
    const uint32x4x2_t ab = vtrnq_u32(a, b), cd = vtrnq_u32(c, d);  // [a0 b0 a2 b2] [a1 b1 a3 b3]
    out[0] = vcombine_u32(vget_low_u32(ab.val[0]), vget_low_u32(cd.val[0]));
    out[1] = vcombine_u32(vget_low_u32(ab.val[1]), vget_low_u32(cd.val[1]));
    out[2] = vcombine_u32(vget_high_u32(ab.val[0]), vget_high_u32(cd.val[0]));
    out[3] = vcombine_u32(vget_high_u32(ab.val[1]), vget_high_u32(cd.val[1]));
  }
  template <int S> PQ_INLINE static VI srl(VI v) {
    if constexpr (S == 0) return v;
    else return vshrq_n_u32(v, S);
  }
  template <int S> PQ_INLINE static VI sll(VI v) { return vshlq_n_u32(v, S); }
  template <int S> PQ_INLINE static VI sra(VI v) {
    if constexpr (S == 0) return v;
    else return vreinterpretq_u32_s32(vshrq_n_s32(vreinterpretq_s32_u32(v), S));
  }
  template <int S> PQ_INLINE static VI window(VI lo, VI hi) { return vsliq_n_u32(vshrq_n_u32(lo, S), hi, 32 - S); }
  PQ_INLINE static VI spread3(VI w) {
    const VI b0 = vandq_u32(w, vdupq_n_u32(0x7));
    const VI b1 = vandq_u32(vshlq_n_u32(w, 5), vdupq_n_u32(0x700));
    const VI b2 = vandq_u32(vshlq_n_u32(w, 10), vdupq_n_u32(0x70000));
    const VI b3 = vandq_u32(vshlq_n_u32(w, 15), vdupq_n_u32(0x7000000));
    return vorrq_u32(vorrq_u32(b0, b1), vorrq_u32(b2, b3));
  }
  PQ_INLINE static VI dot(VI acc, VI u, const int8_t* x4) {
    int32_t v;
    std::memcpy(&v, x4, 4);
    const int8x16_t x = vreinterpretq_s8_s32(vdupq_n_s32(v));
    const int8x16_t c = vreinterpretq_s8_u32(u);  // codes <= 15: exact as s8
    if constexpr (kDot) {
#if defined(__ARM_FEATURE_DOTPROD)
      return vreinterpretq_u32_s32(vdotq_s32(vreinterpretq_s32_u32(acc), c, x));
#endif
    }
    const int16x8_t lo = vmull_s8(vget_low_s8(c), vget_low_s8(x));
    const int16x8_t hi = vmull_high_s8(c, x);
    const int16x8_t pairs = vpaddq_s16(lo, hi);  // |pair| <= 2 * 15 * 127
    return vreinterpretq_u32_s32(vpadalq_s16(vreinterpretq_s32_u32(acc), pairs));
  }
  PQ_INLINE static VI tstate(VI w) { return w; }
  PQ_INLINE static VI mul3(VI s) { return vreinterpretq_u32_u8(vmulq_u8(vreinterpretq_u8_u32(s), vdupq_n_u8(3))); }
  PQ_INLINE static VI trit(VI s) {  // -(s > 85) - (s > 170)
    const uint8x16_t b = vreinterpretq_u8_u32(s);
    const uint8x16_t gt85 = vcgtq_u8(b, vdupq_n_u8(85)), gt170 = vcgtq_u8(b, vdupq_n_u8(170));
    return vreinterpretq_u32_u8(vsubq_u8(vsubq_u8(vdupq_n_u8(0), gt85), gt170));
  }
  PQ_INLINE static VI band(VI a, VI b) { return vandq_u32(a, b); }
  PQ_INLINE static VI add(VI a, VI b) { return vaddq_u32(a, b); }
  PQ_INLINE static VI sub(VI a, VI b) { return vsubq_u32(a, b); }
  PQ_INLINE static VI set1_i(int32_t v) { return vreinterpretq_u32_s32(vdupq_n_s32(v)); }
  PQ_INLINE static VI zero_i() { return vdupq_n_u32(0); }
  PQ_INLINE static VF load_f(const float* p) { return vld1q_f32(p); }
  PQ_INLINE static VF as_f(VI v) { return vreinterpretq_f32_u32(v); }
  PQ_INLINE static VF cvt(VI v) { return vcvtq_f32_s32(vreinterpretq_s32_u32(v)); }
  PQ_INLINE static VF fma(VF a, VF b, VF c) { return vfmaq_f32(c, a, b); }
  PQ_INLINE static VF add_f(VF a, VF b) { return vaddq_f32(a, b); }
  PQ_INLINE static VF mul_f(VF a, VF b) { return vmulq_f32(a, b); }
  PQ_INLINE static VF set1_f(float v) { return vdupq_n_f32(v); }
  PQ_INLINE static VF zero_f() { return vdupq_n_f32(0.f); }
  PQ_INLINE static VF max_eps(VF s) {  // s < eps ? eps : s, NaN kept
    const uint32x4_t lt = vcltq_f32(s, vdupq_n_f32(kScaleEps));
    return vbslq_f32(lt, vdupq_n_f32(kScaleEps), s);
  }
  PQ_INLINE static Levels levels(const float*, float step, float bias) { return Levels{vdupq_n_f32(step), vdupq_n_f32(bias)}; }
  template <int B> PQ_INLINE static VF level(VI v, const Levels& lv) {
    const VF c = vcvtq_f32_u32(vandq_u32(v, vdupq_n_u32((1u << B) - 1u)));
    return vfmaq_f32(lv.bias, c, lv.step);  // exact: (code - zero) * step
  }
  PQ_INLINE static void store(float* dst, VF v, int lo, int hi) {
    if (lo == 0 && hi == NB) {
      vst1q_f32(dst, v);
      return;
    }
    float t[NB];
    vst1q_f32(t, v);
    std::memcpy(dst + lo, t + lo, sizeof(float) * static_cast<size_t>(hi - lo));
  }
};

}  // namespace paretoq
