// Part of the one SIMD implementation (simd_impl.h): the kernels of the rowbits formats (1, 2, 4-bit
// words and 3-bit units), int8 and float activations, and the accumulators the ternary kernels share.
#pragma once
#include "simd_blocks.h"

namespace paretoq {
namespace simd {

// ---- int8 activations --------------------------------------------------------------------------
//
// NA accumulators per token. With SH == 0 they are independent chains, summed at the end of a
// group. With SH == B (decode, M == 1, "masked planes", where dot() takes u8 codes up to 255)
// plane t of a word is extracted with a single AND of the mask shifted by t * B, i.e. codes scaled
// by 2^(t*B); accumulator t then holds 2^(t*B) times its sum and is shifted back, exactly, once per
// group. kMaskedMaxGroup keeps 2^(t*B) * sum inside int32.

constexpr int64_t kMaskedMaxGroup = 131072;

// Two-stage dot products (A::kDot16, AVX2): dotp() leaves the products of each lane's 4 bytes as two
// int16 pair sums and widen() adds those pairs into int32 lanes, so the widening multiply runs once
// per spill instead of once per dot (on AVX2 vpmaddwd + vpaddd per dot were two of its three
// instructions, and the multiply port is the limit). One int16 chain per token then suffices (its
// latency is one add). A pair sum is at most 2 * 127 * MAXU (MAXU: the largest u of the kernel), so
// a chain takes at most kCap dots before it must be spilled into the token's int32 total; the
// kernels call tick<D>() after every step of at most D dots per token.
template <int MAXU>
constexpr int kDot16Cap = 32767 / (2 * 127 * MAXU);

template <class A, int MT, int NA, int SH, int R = 1, int MAXU = 255>
struct I8Acc {
  using VI = typename A::VI;
  static constexpr bool kP = A::kDot16;
  static_assert(!kP || (SH == 0 && kDot16Cap<MAXU> >= 1), "two-stage dots: no masked planes, u < 129");
  // R replicas of the NA accumulators (independent chains: decode alternates them word by word so
  // that the dot-product latency is not the limit); replica r's accumulator i is acc[.][r * NA + i].
  // Two-stage dots: one int16 chain per token, acc[.][0], and its int32 total tot[.].
  static constexpr int NACC = kP ? 1 : NA * R;
  VI acc[MT][NACC];
  VI tot[MT];
  typename A::VF res[MT];
  int pending = 0;  // two-stage: dots per chain since the last spill (an upper bound)
  PQ_INLINE I8Acc() {
    unroll<MT>([&](auto M) {
      res[M.value] = A::zero_f();
      tot[M.value] = A::zero_i();
      unroll<NACC>([&](auto I) { acc[M.value][I.value] = A::zero_i(); });
    });
  }
  // acc_i += u . x4 for token mt
  template <int I>
  PQ_INLINE void dot(int mt, VI u, const int8_t* x4) {
    if constexpr (kP) acc[mt][0] = A::dotp(acc[mt][0], u, x4);
    else acc[mt][I] = A::dot(acc[mt][I], u, x4);
  }
  PQ_INLINE void spill() {
    unroll<MT>([&](auto M) {
      tot[M.value] = A::widen(tot[M.value], acc[M.value][0]);
      acc[M.value][0] = A::zero_i();
    });
    pending = 0;
  }
  // After a step that added at most D dots to each chain: spill if the next such step could overflow.
  template <int D>
  PQ_INLINE void tick() {
    if constexpr (kP) {
      static_assert(D <= kDot16Cap<MAXU>, "a step must fit in one int16 chain");
      pending += D;
      if (pending + D > kDot16Cap<MAXU>) spill();
    }
  }
  PQ_INLINE void flush(const Prepared& p, int64_t m0, int64_t g, typename A::VF s) {
    if constexpr (kP) spill();
    unroll<MT>([&](auto M) {
      constexpr int mt = M.value;
      VI sum;
      if constexpr (kP) {
        sum = tot[mt];
        tot[mt] = A::zero_i();
      } else {
        // replicas of accumulator i first (same scale 2^(i SH), so their sum shifts back exactly)
        VI part[NA];
        unroll<NA>([&](auto I) {
          part[I.value] = acc[mt][I.value];
          unroll<R - 1>([&](auto Rc) { part[I.value] = A::add(part[I.value], acc[mt][(Rc.value + 1) * NA + I.value]); });
        });
        sum = part[0];
        unroll<NA - 1>([&](auto I) {
          constexpr int i = I.value + 1;
          sum = A::add(sum, A::template sra<i * SH>(part[i]));
        });
        unroll<NA * R>([&](auto I) { acc[mt][I.value] = A::zero_i(); });
      }
      const VI v2 = A::sub(A::template sll<1>(sum), A::set1_i(p.zq2[(m0 + mt) * p.G + g]));
      res[mt] = A::fma(s, A::cvt(v2), res[mt]);
    });
  }
};

// 1/2/4-bit codes: a word vector holds 8/B planes; plane t meets one broadcast activation dword.
// R: replicas of the accumulators (R = 2 for one token and whole rows: even / odd words alternate,
// so that the dot-product latency is not the limit; with group scales the flush at every group end
// adds the replicas, so R = 1 is cheaper there).
template <class A, int B, int MT, int NA, int SH, int R>
PQ_FLATTEN void block_i8_words(const LinearArgs& a, const Prepared& p, const Block<A>& t, int64_t m0) {
  using VI = typename A::VI;
  constexpr int CPB = 8 / B, CPW = 32 / B;
  constexpr bool kMasked = SH != 0;
  static_assert(!kMasked || NA == CPB, "masked planes need one accumulator per plane");
  const int8_t* q[MT];
  for (int mt = 0; mt < MT; ++mt) q[mt] = p.q + (m0 + mt) * p.kq;
  VI masks[CPB];
  for (int i = 0; i < CPB; ++i) masks[i] = A::set1_i(0x01010101 * (((1 << B) - 1) << (kMasked ? i * B : 0)));
  I8Acc<A, MT, NA, SH, R, (1 << B) - 1> st;
  Groups<A> gr(a, t, a.G == 1 ? n_words(a) : p.gs * B / 32);
  for_each_word<A>(a, t, [&](int64_t w, VI v, auto J) {
    constexpr int r = decltype(J)::value % R;
    unroll<CPB>([&](auto T) {
      constexpr int tt = T.value, ai = r * NA + tt % NA;
      const VI u = kMasked ? A::band(v, masks[tt]) : A::band(A::template srl<tt * B>(v), masks[0]);
      unroll<MT>([&](auto M) { st.template dot<ai>(M.value, u, q[M.value] + w * CPW + 4 * tt); });
    });
    st.template tick<CPB>();
    gr.after(w, a, t, [&](int64_t g, typename A::VF s) { st.flush(p, m0, g, s); });
  });
  store_block<A, MT>(a, t, m0, st.res, p.d, 0.5f * a.fmt.step);
}

// 3-bit codes: 32-code units of 3 words; quad d (codes 4d..4d+3, bits 12d..12d+11) is cut out of
// its word(s) with a shift or a funnel shift and spread into 4 bytes.
template <class A, int POS, int WIDTH>  // bits POS .. POS + WIDTH - 1 of a word stream, low bits of each lane
PQ_INLINE typename A::VI field_at(const typename A::VI* W) {
  constexpr int wi = POS / 32, sh = POS % 32;
  if constexpr (sh + WIDTH <= 32) {
    return A::template srl<sh>(W[wi]);
  } else {
    return A::template window<sh>(W[wi], W[wi + 1]);
  }
}

template <class A, int D>
PQ_INLINE typename A::VI quad_window(const typename A::VI* W) {
  return field_at<A, 12 * D, 12>(W);
}

// UG: groups are whole 32-code units (per row, or group_size % 32 == 0), so group ends are
// checked once per unit instead of once per quad (the flush code is inlined at every check).
template <class A, int MT, int NA, bool UG>
PQ_FLATTEN void block_i8_units(const LinearArgs& a, const Prepared& p, const Block<A>& t, int64_t m0) {
  using VI = typename A::VI;
  const int8_t* q[MT];
  for (int mt = 0; mt < MT; ++mt) q[mt] = p.q + (m0 + mt) * p.kq;
  I8Acc<A, MT, NA, 0, 1, 7> st;
  Groups<A> gr(a, t, a.G == 1 ? n_units(a) * (UG ? 1 : 8) : p.gs / (UG ? 32 : 4));
  auto flush = [&](int64_t g, typename A::VF s) { st.flush(p, m0, g, s); };
  for_each_unit<A>(a, t, [&](int64_t unit, const VI* W) {
    unroll<8>([&](auto Dc) {
      constexpr int d = Dc.value;
      const VI c4 = A::spread3(quad_window<A, d>(W));
      unroll<MT>([&](auto M) { st.template dot<d % NA>(M.value, c4, q[M.value] + unit * kUnit3Codes + 4 * d); });
      if constexpr (!UG) gr.after(unit * 8 + d, a, t, flush);
    });
    st.template tick<8>();
    if constexpr (UG) gr.after(unit, a, t, flush);
  });
  store_block<A, MT>(a, t, m0, st.res, p.d, 0.5f * a.fmt.step);
}

// ---- float activations -------------------------------------------------------------------------

template <class A, int MT>
struct F32Acc {
  typename A::VF acc[MT][4];  // chains by k mod 4
  typename A::VF res[MT];
  PQ_INLINE F32Acc() {
    unroll<MT>([&](auto M) {
      res[M.value] = A::zero_f();
      unroll<4>([&](auto I) { acc[M.value][I.value] = A::zero_f(); });
    });
  }
  PQ_INLINE void flush(typename A::VF s) {
    unroll<MT>([&](auto M) {
      constexpr int mt = M.value;
      const typename A::VF g = A::add_f(A::add_f(acc[mt][0], acc[mt][1]), A::add_f(acc[mt][2], acc[mt][3]));
      res[mt] = A::fma(s, g, res[mt]);
      unroll<4>([&](auto I) { acc[mt][I.value] = A::zero_f(); });
    });
  }
};

template <class A, int B, int MT>
PQ_FLATTEN void block_f32_words(const LinearArgs& a, const Prepared& p, const Block<A>& t, int64_t m0,
                                const typename A::Levels& lv) {
  using VI = typename A::VI;
  constexpr int CPW = 32 / B;
  const float* x[MT];
  for (int mt = 0; mt < MT; ++mt) x[mt] = p.xf + (m0 + mt) * p.kq;
  F32Acc<A, MT> st;
  Groups<A> gr(a, t, a.G == 1 ? n_words(a) : p.gs * B / 32);
  for_each_word<A>(a, t, [&](int64_t w, VI v, auto) {
    unroll<CPW>([&](auto C) {
      constexpr int c = C.value;
      const typename A::VF l = A::template level<B>(A::template srl<c * B>(v), lv);
      unroll<MT>([&](auto M) {
        st.acc[M.value][c & 3] = A::fma(l, A::set1_f(x[M.value][w * CPW + c]), st.acc[M.value][c & 3]);
      });
    });
    gr.after(w, a, t, [&](int64_t, typename A::VF s) { st.flush(s); });
  });
  store_block<A, MT>(a, t, m0, st.res, nullptr, 0.f);
}

// Code i of a 3-bit unit (bits 3i .. 3i+2) in the low bits of each lane.
template <class A, int I>
PQ_INLINE typename A::VI code3(const typename A::VI* W) {
  return field_at<A, 3 * I, 3>(W);
}

template <class A, int MT, bool UG>
PQ_FLATTEN void block_f32_units(const LinearArgs& a, const Prepared& p, const Block<A>& t, int64_t m0,
                                const typename A::Levels& lv) {
  using VI = typename A::VI;
  const float* x[MT];
  for (int mt = 0; mt < MT; ++mt) x[mt] = p.xf + (m0 + mt) * p.kq;
  F32Acc<A, MT> st;
  Groups<A> gr(a, t, a.G == 1 ? n_units(a) * (UG ? 1 : 8) : p.gs / (UG ? 32 : 4));
  auto flush = [&](int64_t, typename A::VF s) { st.flush(s); };
  for_each_unit<A>(a, t, [&](int64_t unit, const VI* W) {
    unroll<kUnit3Codes>([&](auto Ic) {
      constexpr int i = Ic.value;
      const typename A::VF l = A::template level<3>(code3<A, i>(W), lv);
      unroll<MT>([&](auto M) {
        st.acc[M.value][i & 3] = A::fma(l, A::set1_f(x[M.value][unit * kUnit3Codes + i]), st.acc[M.value][i & 3]);
      });
      if constexpr (!UG && i % 4 == 3) gr.after(unit * 8 + i / 4, a, t, flush);
    });
    if constexpr (UG) gr.after(unit, a, t, flush);
  });
  store_block<A, MT>(a, t, m0, st.res, nullptr, 0.f);
}

}  // namespace simd
}  // namespace paretoq
