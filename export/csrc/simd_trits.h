// Part of the one SIMD implementation (simd_impl.h): the kernels of the ternary trits5 layout.
#pragma once
#include "simd_rowbits.h"

namespace paretoq {
namespace simd {

// ---- ternary, layout trits5 --------------------------------------------------------------------
//
// A word vector holds 4 bytes = 20 codes of every row. Plane i (trit i of the 4 bytes: the decode
// state s_i = byte * 3^i mod 256, i mul3() steps from tstate()) is 4 consecutive codes, whose
// activations are 4 consecutive slots. Group ends (GM, chosen per call):
//   0  groups are whole words (per row, or group_size % 20 == 0): checked once per word;
//   1  group_size >= 20: at most one group end per word, after plane P; the word body is
//      instantiated for every P (0..4, none) and chosen with a switch, so that a flush sits at a
//      fixed place in straight-line code;
//   2  smaller groups: checked after every plane (plane (w, i) ends at code 20w + nb_w (i + 1)).
// simd_groups_ok guarantees that group ends fall on plane ends and that a short last word holds
// no group end but the row's.

constexpr int kTrits = 5;  // the "B" of rows_b / block for kTrits5
// Raw-state int8 accumulation (A::kRawTrits): sums of 256 * trit * q; exact while a flush covers
// at most this many codes (|256 * 2 * 127 * n| < 2^31).
constexpr int64_t kRawMaxGroup = 32768;
// Chains of each raw sum: 3 for one token (10 dots per word vector; with 2 chains their latency
// was the limit: measured on a 2-vCPU AMD EPYC (Zen 5), one 11008 x 4096 layer 0.46-0.53 ->
// 0.38-0.40 ms; 4 and 5 chains are slower), 2 for token tiles (more would spill the accumulators).
#ifndef PQ_RAW_CHAINS_M1
#define PQ_RAW_CHAINS_M1 3
#endif
#ifndef PQ_RAW_CHAINS
#define PQ_RAW_CHAINS 2
#endif

struct PlaneGroups {
  int64_t g = 0, end, gs, groups;
  PlaneGroups(int64_t group_size, int64_t n_groups) : end(group_size), gs(group_size), groups(n_groups) {}
  bool ends(int64_t code_end) const { return g < groups && code_end >= end; }
  void next() { ++g; end += gs; }
};

template <int V>
using IC = std::integral_constant<int, V>;

// plane(w, IC<i>, s_i, IC<k>) for every plane of the block's rows, flush(g, scale vector) at group
// ends; k = 5 j + i counts the planes of a span (j: the word's place in its span, 0..3), so that a
// caller can spread its accumulator chains evenly over the span's 20 planes.
// Super-blocks (GM 1 with a compile-time group size of PPG planes, PPG % 5 != 0): every
// lcm(PPG, 5) / 5 words hold 5 whole groups whose ends fall at fixed planes; unrolled, the flushes
// sit in straight-line code with no test at all. The plane of word j after which a group ends, or -1:
constexpr int super_end_plane(int ppg, int j) {
  for (int g = 0; ppg * (g + 1) - 1 < 5 * (j + 1); ++g)
    if ((ppg * (g + 1) - 1) / 5 == j) return (ppg * (g + 1) - 1) % 5;
  return -1;
}
constexpr int super_words(int ppg) { return ppg % 5 == 0 ? ppg / 5 : ppg; }  // lcm(ppg, 5) / 5

template <class A, int GM, int PPG = 0, class Plane, class Flush>
PQ_INLINE void trit_planes(const LinearArgs& a, const Prepared& p, const Block<A>& t, Plane&& plane, Flush&& flush) {
  using VI = typename A::VI;
  const int64_t nw = n_words(a), last_nb = a.row_bytes - 4 * (nw - 1);
  Groups<A> gr(a, t, a.G == 1 ? nw : p.gs / 20);
  Scales<A> sc;
  PlaneGroups pg(p.gs, a.G);
  auto group_end = [&]() PQ_LAMBDA_INLINE {
    flush(pg.g, sc.get(t, pg.g, a.G));
    pg.next();
  };
  auto word = [&](auto Pc, auto Jc, int64_t w, VI v, int64_t nb) PQ_LAMBDA_INLINE {
    constexpr int P = decltype(Pc)::value, j = decltype(Jc)::value;
    VI s = A::tstate(v);
    unroll<5>([&](auto I) PQ_LAMBDA_INLINE {
      constexpr int i = I.value;
      plane(w, I, s, IC<5 * j + i>{});
      if constexpr (i < 4) s = A::mul3(s);
      if constexpr (GM == 2) {
        if (pg.ends(20 * w + nb * (i + 1))) group_end();
      } else if constexpr (i == P) {
        group_end();
      }
    });
  };
  auto body = [&](auto Jc, int64_t w, VI v, int64_t nb) PQ_LAMBDA_INLINE {
    if constexpr (GM == 0) {
      word(IC<-1>{}, Jc, w, v, nb);
      if (a.G > 1) gr.after(w, a, t, flush);  // per row: one flush after the last word (below)
    } else if constexpr (GM == 2) {
      word(IC<-1>{}, Jc, w, v, nb);
    } else {
      const int64_t rel = pg.end - 20 * w;  // the next group end, from this word's first code
      const int P = (pg.g < a.G && nb == 4 && rel <= 20) ? static_cast<int>(rel / 4) - 1 : -1;
      switch (P) {
        case 0: word(IC<0>{}, Jc, w, v, nb); break;
        case 1: word(IC<1>{}, Jc, w, v, nb); break;
        case 2: word(IC<2>{}, Jc, w, v, nb); break;
        case 3: word(IC<3>{}, Jc, w, v, nb); break;
        case 4: word(IC<4>{}, Jc, w, v, nb); break;
        default: word(IC<-1>{}, Jc, w, v, nb); break;
      }
      if (nb < 4 && pg.g < a.G) group_end();  // a short last word ends the row's last group
    }
  };
  const int64_t whole_words = nw - (last_nb < 4 ? 1 : 0);
  int64_t first_span = 0;
  if constexpr (PPG > 0) {
    constexpr int WPS = super_words(PPG);
    static_assert(GM == 1 && WPS % 4 == 0, "super-blocks are whole spans of GM 1");
    const int64_t nsuper = whole_words / WPS;
    for (int64_t sb = 0; sb < nsuper; ++sb) {
      unroll<WPS / 4>([&](auto S) PQ_LAMBDA_INLINE {
        VI wv[4];
        load_span<A, 16>(t, sb * (WPS / 4) + S.value, wv);
        unroll<4>([&](auto J) PQ_LAMBDA_INLINE {
          constexpr int j = 4 * S.value + J.value;
          word(IC<super_end_plane(PPG, j)>{}, IC<j % 4>{}, sb * WPS + j, wv[J.value], 4);
        });
      });
    }
    first_span = nsuper * (WPS / 4);
  }
  // Spans whose 4 words are all whole (no per-word test in the hot loop), then the rest.
  const int64_t nsteps = (a.row_bytes + 15) / 16, whole = whole_words / 4;
  for (int64_t st = first_span; st < whole; ++st) {
    VI wv[4];
    load_span<A, 16>(t, st, wv);
    unroll<4>([&](auto J) PQ_LAMBDA_INLINE { body(J, 4 * st + J.value, wv[J.value], 4); });
  }
  for (int64_t st = whole > first_span ? whole : first_span; st < nsteps; ++st) {
    VI wv[4];
    load_span<A, 16>(t, st, wv);
    unroll<4>([&](auto J) PQ_LAMBDA_INLINE {
      const int64_t w = 4 * st + J.value;
      if (w < nw) body(J, w, wv[J.value], w == nw - 1 ? last_nb : 4);
    });
  }
  if constexpr (GM == 0) {
    if (a.G == 1) flush(0, gr.sc.sv[0]);
  }
}

// int8, decoded trits: u_i = trit(s_i), one dot per plane.
template <class A, int MT, int NA, int GM>
PQ_FLATTEN void block_i8_trits(const LinearArgs& a, const Prepared& p, const Block<A>& t, int64_t m0) {
  using VI = typename A::VI;
  const int8_t* q[MT];
  for (int mt = 0; mt < MT; ++mt) q[mt] = p.q + (m0 + mt) * p.kq;
  I8Acc<A, MT, NA, 0, 1, 2> st;
  trit_planes<A, GM>(a, p, t,
      [&](int64_t w, auto I, VI s, auto) PQ_LAMBDA_INLINE {
        constexpr int i = decltype(I)::value;
        const VI u = A::trit(s);
        unroll<MT>([&](auto M) PQ_LAMBDA_INLINE { st.template dot<i % NA>(M.value, u, q[M.value] + w * 20 + 4 * i); });
        if constexpr (i == kTrits - 1) st.template tick<kTrits>();
      },
      [&](int64_t g, typename A::VF sv) PQ_LAMBDA_INLINE { st.flush(p, m0, g, sv); });
  store_block<A, MT>(a, t, m0, st.res, p.d, 0.5f * a.fmt.step);
}

// int8, raw states (dot takes u8 up to 255): trit_i = (3 s_i - s_{i+1}) / 256 exactly, so
// sum trit * q = (3 * sum s_i q - sum s_{i+1} q) >> 8: two dots per plane and no decode. NC
// chains of each sum (plane k of a span in chain k % NC) keep the dot latency hidden.
template <class A, int MT, int GM, int PPG = 0>
PQ_FLATTEN void block_i8_trits_raw(const LinearArgs& a, const Prepared& p, const Block<A>& t, int64_t m0) {
  using VI = typename A::VI;
  using VF = typename A::VF;
  const int8_t* q[MT];
  for (int mt = 0; mt < MT; ++mt) q[mt] = p.q + (m0 + mt) * p.kq;
  constexpr int NC = MT == 1 ? PQ_RAW_CHAINS_M1 : PQ_RAW_CHAINS;
  VI sa[MT][NC], sb[MT][NC];
  VF res[MT];
  unroll<MT>([&](auto M) PQ_LAMBDA_INLINE {
    res[M.value] = A::zero_f();
    unroll<NC>([&](auto C) PQ_LAMBDA_INLINE { sa[M.value][C.value] = sb[M.value][C.value] = A::zero_i(); });
  });
  trit_planes<A, GM, PPG>(a, p, t,
      [&](int64_t w, auto I, VI s, auto K) PQ_LAMBDA_INLINE {
        constexpr int i = decltype(I)::value, c = decltype(K)::value % NC;
        const VI s1 = A::mul3(s);  // (the next plane's state: the same value trit_planes computes)
        unroll<MT>([&](auto M) PQ_LAMBDA_INLINE {
          const int8_t* x4 = q[M.value] + w * 20 + 4 * i;
          sa[M.value][c] = A::dot(sa[M.value][c], s, x4);
          sb[M.value][c] = A::dot(sb[M.value][c], s1, x4);
        });
      },
      [&](int64_t g, VF sv) PQ_LAMBDA_INLINE {
        unroll<MT>([&](auto M) PQ_LAMBDA_INLINE {
          constexpr int mt = M.value;
          VI A1 = sa[mt][0], B1 = sb[mt][0];
          unroll<NC - 1>([&](auto C) PQ_LAMBDA_INLINE {
            A1 = A::add(A1, sa[mt][C.value + 1]);
            B1 = A::add(B1, sb[mt][C.value + 1]);
          });
          const VI dot = A::template sra<8>(A::sub(A::add(A1, A::add(A1, A1)), B1));
          const VI v2 = A::sub(A::template sll<1>(dot), A::set1_i(p.zq2[(m0 + mt) * p.G + g]));
          res[mt] = A::fma(sv, A::cvt(v2), res[mt]);
          unroll<NC>([&](auto C) PQ_LAMBDA_INLINE { sa[mt][C.value] = sb[mt][C.value] = A::zero_i(); });
        });
      });
  store_block<A, MT>(a, t, m0, res, p.d, 0.5f * a.fmt.step);
}

template <class A, int MT, int GM>
PQ_FLATTEN void block_f32_trits(const LinearArgs& a, const Prepared& p, const Block<A>& t, int64_t m0,
                                const typename A::Levels& lv) {
  using VI = typename A::VI;
  const float* x[MT];
  for (int mt = 0; mt < MT; ++mt) x[mt] = p.xf + (m0 + mt) * p.kq;
  F32Acc<A, MT> st;
  trit_planes<A, GM>(a, p, t,
      [&](int64_t w, auto I, VI s, auto) PQ_LAMBDA_INLINE {
        constexpr int i = decltype(I)::value;
        const VI u = A::trit(s);
        unroll<4>([&](auto J) PQ_LAMBDA_INLINE {
          constexpr int j = J.value;
          const typename A::VF l = A::template level<2>(A::template srl<8 * j>(u), lv);
          unroll<MT>([&](auto M) PQ_LAMBDA_INLINE {
            st.acc[M.value][j] = A::fma(l, A::set1_f(x[M.value][w * 20 + 4 * i + j]), st.acc[M.value][j]);
          });
        });
      },
      [&](int64_t, typename A::VF sv) PQ_LAMBDA_INLINE { st.flush(sv); });
  store_block<A, MT>(a, t, m0, st.res, nullptr, 0.f);
}

// int8 prefill (M > 4 with raw states, M > kMT8 otherwise; rows_b): the block's trits are decoded once, into a thread-local buffer of one
// vector per word and plane ([word][plane], the u_i of block_i8_trits), and every token tile reads
// them back: one dot per plane and token, no decode per tile (the raw-state path takes two dots per
// plane and token, the decoded path a decode per plane and tile). Results equal block_i8_trits'.
template <class A>
struct Staged {
  typename A::VI v;  // (a struct: a vector type with attributes is no template argument)
};

template <class A>
inline const Staged<A>* stage_trits(const LinearArgs& a, const Block<A>& t) {
  using VI = typename A::VI;
  thread_local std::vector<Staged<A>> buf;
  const int64_t nsteps = (a.row_bytes + 15) / 16;
  buf.resize(static_cast<size_t>(nsteps * 4 * kTrits));  // whole spans: the words past the row decode as 0
  Staged<A>* u = buf.data();
  for (int64_t st = 0; st < nsteps; ++st) {
    VI wv[4];
    load_span<A, 16>(t, st, wv);
    unroll<4>([&](auto J) PQ_LAMBDA_INLINE {
      VI s = A::tstate(wv[J.value]);
      Staged<A>* o = u + (4 * st + J.value) * kTrits;
      unroll<kTrits>([&](auto I) PQ_LAMBDA_INLINE {
        o[I.value].v = A::trit(s);
        if constexpr (I.value < kTrits - 1) s = A::mul3(s);
      });
    });
  }
  return u;
}

// One token tile over the staged trits. GM 0: groups are whole words (per row, group_size % 20 ==
// 0); else group ends are checked after every plane (as trit_planes' GM 2).
template <class A, int MT, int GM>
PQ_FLATTEN void block_i8_trits_staged(const LinearArgs& a, const Prepared& p, const Block<A>& t, int64_t m0,
                                      const Staged<A>* u) {
  using VI = typename A::VI;
  using VF = typename A::VF;
  const int8_t* q[MT];
  for (int mt = 0; mt < MT; ++mt) q[mt] = p.q + (m0 + mt) * p.kq;
  I8Acc<A, MT, 1, 0, 1, 2> st;
  const int64_t nw = n_words(a), last_nb = a.row_bytes - 4 * (nw - 1);
  auto flush = [&](int64_t g, VF sv) PQ_LAMBDA_INLINE { st.flush(p, m0, g, sv); };
  Groups<A> gr(a, t, a.G == 1 ? nw : (GM == 0 ? p.gs / 20 : 1));
  PlaneGroups pg(p.gs, a.G);
  for (int64_t w = 0; w < nw; ++w) {
    const int64_t nb = w == nw - 1 ? last_nb : 4;
    unroll<kTrits>([&](auto I) PQ_LAMBDA_INLINE {
      constexpr int i = I.value;
      const VI uv = u[w * kTrits + i].v;
      unroll<MT>([&](auto M) PQ_LAMBDA_INLINE { st.template dot<0>(M.value, uv, q[M.value] + w * 20 + 4 * i); });
      if constexpr (GM != 0) {
        if (pg.ends(20 * w + nb * (i + 1))) {
          flush(pg.g, gr.sc.get(t, pg.g, a.G));
          pg.next();
        }
      }
    });
    st.template tick<kTrits>();
    if constexpr (GM == 0) gr.after(w, a, t, flush);
  }
  store_block<A, MT>(a, t, m0, st.res, p.d, 0.5f * a.fmt.step);
}

// Every token tile of one row block, int8 mode, over the staged trits.
template <class A>
inline void tiles_i8_trits_staged(const LinearArgs& a, const Prepared& p, const Block<A>& t) {
  const Staged<A>* u = stage_trits<A>(a, t);
  auto run = [&](auto GMc) {
    constexpr int GM = decltype(GMc)::value, MT8 = A::kMT8;
    int64_t m = 0;
    for (; m + MT8 <= a.M; m += MT8) block_i8_trits_staged<A, MT8, GM>(a, p, t, m, u);
    if constexpr (MT8 > 4) {
      if (m + 4 <= a.M) block_i8_trits_staged<A, 4, GM>(a, p, t, m, u), m += 4;
    }
    for (; m + 2 <= a.M; m += 2) block_i8_trits_staged<A, 2, GM>(a, p, t, m, u);
    if (m < a.M) block_i8_trits_staged<A, 1, GM>(a, p, t, m, u);
  };
  if (a.G == 1 || p.gs % 20 == 0) run(IC<0>{});
  else run(IC<2>{});
}

template <class A, int MT, int NA, int GM>
inline void block_trits_gm(const LinearArgs& a, const Prepared& p, ActMode mode, const Block<A>& t, int64_t m0,
                           const typename A::Levels& lv) {
  if (mode == ActMode::Fp32) return block_f32_trits<A, MT, GM>(a, p, t, m0, lv);
  if constexpr (A::kRawTrits) {
    if constexpr (GM == 1 && MT == 1) {  // decode: the usual group sizes as super-blocks (32-256)
      switch (p.gs) {
        case 32: return block_i8_trits_raw<A, MT, GM, 8>(a, p, t, m0);
        case 64: return block_i8_trits_raw<A, MT, GM, 16>(a, p, t, m0);
        case 128: return block_i8_trits_raw<A, MT, GM, 32>(a, p, t, m0);
        case 256: return block_i8_trits_raw<A, MT, GM, 64>(a, p, t, m0);
        default: break;
      }
    }
    if (p.gs <= kRawMaxGroup) return block_i8_trits_raw<A, MT, GM>(a, p, t, m0);
    // groups beyond kRawMaxGroup are whole rows or multiples of 20 codes: one instantiation
    return block_i8_trits<A, MT, NA, 0>(a, p, t, m0);
  }
  block_i8_trits<A, MT, NA, GM>(a, p, t, m0);
}

template <class A, int MT, int NA>
inline void block_trits(const LinearArgs& a, const Prepared& p, ActMode mode, const Block<A>& t, int64_t m0,
                        const typename A::Levels& lv) {
  // GM 1 (a switch over 6 instantiated word bodies) only where it pays: one token (decode). Token
  // tiles spend more per plane and take the per-plane test; this keeps the build time in check.
  if (a.G == 1 || p.gs % 20 == 0) return block_trits_gm<A, MT, NA, 0>(a, p, mode, t, m0, lv);
  if constexpr (MT == 1) {
    if (p.gs >= 20) return block_trits_gm<A, MT, NA, 1>(a, p, mode, t, m0, lv);
  }
  block_trits_gm<A, MT, NA, 2>(a, p, mode, t, m0, lv);
}

}  // namespace simd
}  // namespace paretoq
