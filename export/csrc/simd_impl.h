// One templated int8-activation kernel for every SIMD path (included by the per-architecture
// translation units, each compiled with its own -m flags). `A` supplies the vector type and
// the primitives: load(W bytes), shr(v, s) (logical shift right; s is a constant after unrolling),
// band(v, mask), set1(byte), dot(acc, u8 codes, s8 activations), add32 / sra32(acc, s) on the
// accumulators and reduce(acc); A::kMaskPlanes says whether dot() can take codes pre-scaled by
// up to 2^(8-B) (u8 up to 255: true for VNNI vpdpbusd, false for AVX2 vpmaddubsw whose int16
// pair sums would saturate), A::kPairSums whether it offers mul16 / add16 / widen_add (int16
// pair sums, accumulated over the planes of a chunk before widening). Results are bit-identical
// to rows_int8_scalar (integer dot products, same float epilogue); only the order of exact
// integer additions differs.
//
// Blocking: NR output rows x MT tokens per inner loop, NR * MT (* planes) int32 accumulators in
// registers; every weight vector is loaded once per block and every activation vector is reused
// for all NR rows.
//   * MT == 1 (decode) with kMaskPlanes: plane p is extracted with a single AND (v & (mask << p*B),
//     i.e. codes scaled by 2^(p*B)) into its own accumulator; the scale is removed with an exact
//     arithmetic shift once per group (every partial sum is a multiple of 2^(p*B)).
//   * MT == 1 with kPairSums (AVX2): int16 pair sums of all planes of a chunk are added before
//     one widening to int32.
//   * otherwise: plane p = (v >> p*B) & mask, computed once per row and reused for MT tokens.
// int32 lanes cannot overflow before K reaches millions of codes (<= 4 * 255 * 127 per lane and
// chunk).
#pragma once
#include <cmath>
#include "paretoq_kernels.h"

namespace paretoq {
namespace simd {

template <int B>
inline void unpack3(const uint8_t* p, int n, uint8_t* dst) {  // n codes, multiple of 8
  for (int i = 0; i < n / 8; ++i) {
    const uint32_t w = p[3 * i] | (p[3 * i + 1] << 8) | (p[3 * i + 2] << 16);
    for (int j = 0; j < 8; ++j) dst[8 * i + j] = static_cast<uint8_t>((w >> (3 * j)) & 7u);
  }
}

// NR rows (row pointers rows[r], scales srows[r]) x MT tokens starting at m0.
template <class A, int B, int NR, int MT>
inline void tile(const LinearArgs& a, const Prepared& p, const uint8_t* const* rows,
                 const float* const* srows, int64_t m0, int zero2, float (*res)[4]) {
  constexpr int W = A::W;
  constexpr int CPB = (B == 3) ? 1 : 8 / B;
  constexpr int C = W * CPB;
  constexpr bool kMask = A::kMaskPlanes && MT == 1 && B != 3;
  constexpr int NA = kMask ? CPB : 1;  // accumulators per (row, token)
  constexpr bool kPair = A::kPairSums && MT == 1 && B != 3;
  using V = typename A::V;
  using Acc = typename A::Acc;
  const int64_t K = a.K, gs = p.gs, nfull = gs / C;
  for (int r = 0; r < NR; ++r)
    for (int t = 0; t < MT; ++t) res[r][t] = 0.f;
  const V mask = A::set1(static_cast<char>((1 << B) - 1));
  for (int64_t g = 0; g < a.G; ++g) {
    const int64_t g0 = g * gs;
    const int64_t woff = (g0 * B) / 8;
    Acc acc[NR][MT][NA];
    for (int r = 0; r < NR; ++r)
      for (int t = 0; t < MT; ++t)
        for (int i = 0; i < NA; ++i) acc[r][t][i] = A::zero();
    const int8_t* qb = p.q + m0 * K + g0;
    if (B == 3) {
      alignas(64) uint8_t buf[NR][W];
      for (int64_t c = 0; c < nfull; ++c) {
        for (int r = 0; r < NR; ++r) unpack3<B>(rows[r] + woff + c * (3 * W / 8), W, buf[r]);
        for (int t = 0; t < MT; ++t) {
          const V x = A::load(qb + t * K + c * C);
          for (int r = 0; r < NR; ++r) acc[r][t][0] = A::dot(acc[r][t][0], A::load(buf[r]), x);
        }
      }
    } else {
      const uint8_t* wp[NR];
      for (int r = 0; r < NR; ++r) wp[r] = rows[r] + woff;
      for (int64_t c = 0; c < nfull; ++c) {
        V v[NR];
        for (int r = 0; r < NR; ++r) {
          v[r] = A::load(wp[r] + c * W);
          // next row block, same offset (a prefetch past the range or the buffer is harmless)
          __builtin_prefetch(wp[r] + NR * a.row_bytes + c * W);
        }
        const int8_t* qc = qb + c * C;
        if constexpr (kPair) {
          // u8 x s8 pair sums of all planes of the chunk added in int16 (<= 8 * 254, 4 * 762,
          // 2 * 3810: no overflow), widened to int32 once per chunk and row.
#pragma GCC unroll 4
          for (int r = 0; r < NR; ++r) {
            V s16 = A::mul16(A::band(v[r], mask), A::load(qc));
#pragma GCC unroll 8
            for (int pl = 1; pl < CPB; ++pl)
              s16 = A::add16(s16, A::mul16(A::band(A::shr(v[r], pl * B), mask), A::load(qc + pl * W)));
            acc[r][0][0] = A::widen_add(acc[r][0][0], s16);
          }
        } else if (kMask) {
#pragma GCC unroll 8
          for (int pl = 0; pl < CPB; ++pl) {
            const V m = A::set1(static_cast<char>(((1 << B) - 1) << (pl * B)));
            const V x = A::load(qc + pl * W);
#pragma GCC unroll 4
            for (int r = 0; r < NR; ++r)
              acc[r][0][pl % NA] = A::dot(acc[r][0][pl % NA], A::band(v[r], m), x);
          }
        } else {
#pragma GCC unroll 8
          for (int pl = 0; pl < CPB; ++pl) {
            V x[MT];
#pragma GCC unroll 4
            for (int t = 0; t < MT; ++t) x[t] = A::load(qc + t * K + pl * W);
#pragma GCC unroll 4
            for (int r = 0; r < NR; ++r) {
              const V u = A::band(A::shr(v[r], pl * B), mask);
#pragma GCC unroll 4
              for (int t = 0; t < MT; ++t) acc[r][t][0] = A::dot(acc[r][t][0], u, x[t]);
            }
          }
        }
      }
    }
    for (int r = 0; r < NR; ++r) {
      for (int t = 0; t < MT; ++t) {
        Acc s = acc[r][t][0];
        for (int i = 1; i < NA; ++i) s = A::add32(s, A::sra32(acc[r][t][i], i * B));
        int64_t dot = A::reduce(s);
        const int8_t* q = p.q + (m0 + t) * K;
        for (int64_t k = g0 + nfull * C; k < g0 + gs; ++k) dot += code_at(rows[r], k, B) * q[k];
        res[r][t] += group_term(srows[r][g], dot, p.gsum[(m0 + t) * a.G + g], zero2);
      }
    }
  }
}

template <class A, int B, int NR>
inline void row_block(const LinearArgs& a, const Prepared& p, int64_t n, int zero2) {
  const uint8_t* rows[NR];
  const float* srows[NR];
  for (int r = 0; r < NR; ++r) {
    rows[r] = a.w + (n + r) * a.row_bytes;
    srows[r] = a.scale + (n + r) * a.G;
  }
  float res[NR][4];
  for (int64_t m0 = 0; m0 < a.M; m0 += 4) {
    const int64_t mt = a.M - m0 < 4 ? a.M - m0 : 4;
    switch (mt) {
      case 1: tile<A, B, NR, 1>(a, p, rows, srows, m0, zero2, res); break;
      case 2: tile<A, B, NR, 2>(a, p, rows, srows, m0, zero2, res); break;
      case 3: tile<A, B, NR, 3>(a, p, rows, srows, m0, zero2, res); break;
      default: tile<A, B, NR, 4>(a, p, rows, srows, m0, zero2, res); break;
    }
    for (int r = 0; r < NR; ++r)
      for (int64_t t = 0; t < mt; ++t)
        a.out[(m0 + t) * a.N + n + r] = res[r][t] * a.fmt.step * p.d[m0 + t];
  }
}

template <class A, int B>
void rows(const LinearArgs& a, const Prepared& p, int64_t n0, int64_t n1) {
  const int zero2 = static_cast<int>(std::lrint(2.0 * a.fmt.zero));
  // 1-bit decode with masked planes keeps 8 accumulators per row: 2 rows fit the registers.
  constexpr int NR = (B == 1 && A::kMaskPlanes) ? 2 : A::kRows;
  int64_t n = n0;
  for (; n + NR <= n1; n += NR) row_block<A, B, NR>(a, p, n, zero2);
  for (; n < n1; ++n) row_block<A, B, 1>(a, p, n, zero2);
}

template <class A>
void rows_dispatch(const LinearArgs& a, const Prepared& p, int64_t n0, int64_t n1) {
  switch (a.fmt.code_bits) {
    case 1: return rows<A, 1>(a, p, n0, n1);
    case 2: return rows<A, 2>(a, p, n0, n1);
    case 3: return rows<A, 3>(a, p, n0, n1);
    default: return rows<A, 4>(a, p, n0, n1);
  }
}

}  // namespace simd
}  // namespace paretoq
