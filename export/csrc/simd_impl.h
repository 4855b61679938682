// The one SIMD implementation of both activation modes, instantiated by every architecture's
// translation unit with its traits class `A` (compiled with that architecture's -m flags).
//
// A supplies: NB (32-bit lanes = rows per vector), kMT / kMT8 (largest token tile in float / int8
// mode), kMaskedPlanes, kRawTrits (dot() takes u8 values up to 255: raw trits5 states), kDot16
// (two-stage dot products dotp / widen, see I8Acc), the
// vector types VI (int32 lanes) and VF (float lanes), and
//   load4(b, st, out[4])   16 bytes of each of the NB rows b + i * st, transposed into four word
//                          vectors: lane i of out[j] = 32-bit word j of row i
//   load_i(p)              one word vector of NB contiguous 32-bit words (kBlocked16 order)
//   srl<S> / sll<S> / sra<S>   per-lane shifts by a constant (S == 0 allowed for srl / sra)
//   window<S>(lo, hi)      per-lane low 32 bits of (hi : lo) >> S, 0 < S < 32
//   spread3(w)             the 4 x 3-bit fields at bits 0..11 of each lane -> 4 bytes
//   dot(acc, u, x4)        acc += sum over the 4 bytes of each lane of u8(u) * s8(x4 broadcast)
//   dotp(p, u, x4) / widen(acc, p)   (kDot16 only) the same dot as two int16 pair sums per lane
//                          added into p, and acc += the pair sums of p as int32 lanes
//   band, add, sub, set1_i, zero_i; cvt (int32 -> float), fma(a, b, c) = fused a * b + c,
//   add_f, mul_f, set1_f, zero_f, max_eps(s) = (s < eps ? eps : s, NaN kept)
//   levels(tab16, step, bias) / level<B>(v, lv)   float level of the code in the low B bits of v
//   tstate(w) / mul3(s) / trit(s)   trits5 decoding, per byte: tstate makes the decode state of a
//                          word vector's bytes, mul3 multiplies every byte by 3 (mod 256), trit gives
//                          the top trit (s * 3) >> 8 = (s > 85) + (s > 170) of every byte as 0, 1, 2
//   store(dst, v, lo, hi)  lanes [lo, hi) of v to dst[lo .. hi)
//
// Work is split into row blocks of NB consecutive rows (one vector lane per row), each computed
// over the whole of K before the next one, so that the accumulators of one block and token tile
// live in registers and the block streams NB rows in parallel. Integer sums are exact and the
// float operations follow the canonical order of paretoq_kernels.h (fp32 mode: 4 chains by
// k mod 4, then (c0 + c1) + (c2 + c3) per group), so every path is bit-identical to the scalar
// reference in kernels.cpp.
#pragma once
#include "simd_blocks.h"   // row blocks, streams, group bookkeeping
#include "simd_rowbits.h"  // 1/2/3/4-bit kernels
#include "simd_trits.h"    // ternary kernels

namespace paretoq {
namespace simd {

// ---- blocks and row ranges ---------------------------------------------------------------------

template <class A, int B, int MT, int NA, int SH = 0, int R = (MT == 1 ? 2 : 1)>
inline void block(const LinearArgs& a, const Prepared& p, ActMode mode, const Block<A>& t, int64_t m0,
                  const typename A::Levels& lv) {
  if constexpr (B == kTrits) {
    block_trits<A, MT, NA>(a, p, mode, t, m0, lv);
  } else if constexpr (B == 3) {
    const bool ug = a.G == 1 || p.gs % kUnit3Codes == 0;
    if (mode == ActMode::Int8) {
      if (ug) block_i8_units<A, MT, NA, true>(a, p, t, m0);
      else block_i8_units<A, MT, NA, false>(a, p, t, m0);
    } else {
      if (ug) block_f32_units<A, MT, true>(a, p, t, m0, lv);
      else block_f32_units<A, MT, false>(a, p, t, m0, lv);
    }
  } else {
    if (mode == ActMode::Int8) block_i8_words<A, B, MT, NA, SH, R>(a, p, t, m0);
    else block_f32_words<A, B, MT>(a, p, t, m0, lv);
  }
}

// Token tiles of A::kMT (the decoded weight vectors are reused for every token of a tile); M == 1
// uses masked planes where the path and the group allow, else two accumulator chains.
template <class A, int B>
void rows_b(const LinearArgs& a, const Prepared& p, ActMode mode, int64_t n0, int64_t n1) {
  constexpr int MT = A::kMT, MT8 = A::kMT8;
  float tab[16];
  level_table(a.fmt, tab);
  const typename A::Levels lv = A::levels(tab, a.fmt.step, -a.fmt.zero * a.fmt.step);
  constexpr bool kCanMask = A::kMaskedPlanes && B != 3 && B != kTrits;
  const bool masked = kCanMask && mode == ActMode::Int8 && p.gs <= kMaskedMaxGroup;
  Block<A> t;
  for (int64_t n = n0; n < n1; n += A::NB) {
    setup_block<A>(t, a, n, kSpan<B>);
    if constexpr (B == kTrits) {
      // raw states: up to 4 tokens (one tile, no register spills) before staging pays; decoded
      // trits: from the second tile on.
      constexpr int64_t kStageFrom = A::kRawTrits ? 4 : A::kMT8;
      if (mode == ActMode::Int8 && a.M > kStageFrom) {
        tiles_i8_trits_staged<A>(a, p, t);
        continue;
      }
    }
    int64_t m = 0;
    if constexpr (MT8 > MT) {  // int8 accumulators are one register per token: wider token tiles
      if (mode == ActMode::Int8)
        for (; m + MT8 <= a.M; m += MT8) block<A, B, MT8, 1>(a, p, mode, t, m, lv);
    }
    for (; m + MT <= a.M; m += MT) block<A, B, MT, 1>(a, p, mode, t, m, lv);
    for (; m + 2 <= a.M; m += 2) block<A, B, 2, 1>(a, p, mode, t, m, lv);
    if (m < a.M) {
      if constexpr (kCanMask) {
        if (masked) {  // group scales: one set of chains where 4+ planes make enough (block_i8_words)
          if (a.G > 1 && 8 / B >= 4) block<A, B, 1, 8 / B, B, 1>(a, p, mode, t, m, lv);
          else block<A, B, 1, 8 / B, B, 2>(a, p, mode, t, m, lv);
          continue;
        }
      }
      block<A, B, 1, 2>(a, p, mode, t, m, lv);
    }
  }
}

// The two format families, callable separately so that an architecture may compile them in two
// translation units (its SIMD files are most of the build: both cores of a -j2 build stay busy).
template <class A>
void rows_rowbits(const LinearArgs& a, const Prepared& p, ActMode mode, int64_t n0, int64_t n1) {
  switch (a.fmt.code_bits) {
    case 1: return rows_b<A, 1>(a, p, mode, n0, n1);
    case 2: return rows_b<A, 2>(a, p, mode, n0, n1);
    case 3: return rows_b<A, 3>(a, p, mode, n0, n1);
    default: return rows_b<A, 4>(a, p, mode, n0, n1);
  }
}

template <class A>
void rows_trits(const LinearArgs& a, const Prepared& p, ActMode mode, int64_t n0, int64_t n1) {
  rows_b<A, kTrits>(a, p, mode, n0, n1);
}

template <class A>
void rows(const LinearArgs& a, const Prepared& p, ActMode mode, int64_t n0, int64_t n1) {
  if (a.fmt.storage == kTrits5) return rows_trits<A>(a, p, mode, n0, n1);
  rows_rowbits<A>(a, p, mode, n0, n1);
}

}  // namespace simd
}  // namespace paretoq
