// One templated int8-activation kernel for every SIMD path (included by the per-architecture
// translation units, each compiled with its own -m flags). `A` supplies the vector type and
// four primitives: load(W bytes), plane<B>(v, p) (shift by p*B bits and mask to B bits, per
// byte), dot(acc, u8 codes, s8 activations) and reduce(acc). Results are bit-identical to
// rows_int8_scalar (integer dot products, same float epilogue).
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

template <class A, int B, int MT>
inline void tile(const LinearArgs& a, const Prepared& p, const uint8_t* row, const float* srow,
                 int64_t m0, int zero2, float* res) {
  constexpr int W = A::W;
  constexpr int CPB = (B == 3) ? 1 : 8 / B;
  constexpr int C = W * CPB;
  const int64_t K = a.K, gs = p.gs, nfull = gs / C;
  alignas(64) uint8_t buf[W];
  for (int t = 0; t < MT; ++t) res[t] = 0.f;
  for (int64_t g = 0; g < a.G; ++g) {
    const int64_t g0 = g * gs;
    const uint8_t* wp = row + (g0 * B) / 8;
    typename A::Acc acc[MT];
    for (int t = 0; t < MT; ++t) acc[t] = A::zero();
    const int8_t* qb = p.q + m0 * K + g0;
    for (int64_t c = 0; c < nfull; ++c) {
      if (B == 3) {
        unpack3<B>(wp + c * (3 * W / 8), W, buf);
        const typename A::V u = A::load(buf);
        for (int t = 0; t < MT; ++t) acc[t] = A::dot(acc[t], u, A::load(qb + t * K + c * C));
      } else {
        const typename A::V v = A::load(wp + c * W);
        for (int pl = 0; pl < CPB; ++pl) {
          const typename A::V u = A::template plane<B>(v, pl);
          for (int t = 0; t < MT; ++t)
            acc[t] = A::dot(acc[t], u, A::load(qb + t * K + c * C + pl * W));
        }
      }
    }
    for (int t = 0; t < MT; ++t) {
      int64_t dot = A::reduce(acc[t]);
      const int8_t* q = p.q + (m0 + t) * K;
      for (int64_t k = g0 + nfull * C; k < g0 + gs; ++k) dot += code_at(row, k, B) * q[k];
      res[t] += group_term(srow[g], dot, p.gsum[(m0 + t) * a.G + g], zero2);
    }
  }
}

template <class A, int B>
void rows(const LinearArgs& a, const Prepared& p, int64_t n0, int64_t n1) {
  const int zero2 = static_cast<int>(std::lrint(2.0 * a.fmt.zero));
  float res[4];
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = a.w + n * a.row_bytes;
    const float* srow = a.scale + n * a.G;
    for (int64_t m0 = 0; m0 < a.M; m0 += 4) {
      const int64_t mt = a.M - m0 < 4 ? a.M - m0 : 4;
      switch (mt) {
        case 1: tile<A, B, 1>(a, p, row, srow, m0, zero2, res); break;
        case 2: tile<A, B, 2>(a, p, row, srow, m0, zero2, res); break;
        case 3: tile<A, B, 3>(a, p, row, srow, m0, zero2, res); break;
        default: tile<A, B, 4>(a, p, row, srow, m0, zero2, res); break;
      }
      for (int64_t t = 0; t < mt; ++t) a.out[(m0 + t) * a.N + n] = res[t] * a.fmt.step * p.d[m0 + t];
    }
  }
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
