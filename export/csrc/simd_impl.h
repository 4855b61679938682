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
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#include "kernels_internal.h"

namespace paretoq {
namespace simd {

template <class F, int... I>
PQ_INLINE void unroll_impl(F& f, std::integer_sequence<int, I...>) {
  (f(std::integral_constant<int, I>{}), ...);
}
// f(std::integral_constant<int, i>) for i = 0 .. N-1, unrolled at compile time.
template <int N, class F>
PQ_INLINE void unroll(F&& f) {
  unroll_impl(f, std::make_integer_sequence<int, N>{});
}

// Bytes of every row read per step: 16 (one load4) for 1/2/4-bit codes, 48 (three load4 = four
// 32-code units) for 3-bit codes.
template <int B>
constexpr int kSpan = (B == 3) ? 48 : 16;  // trits5 (B = kTrits): 16

// One row block: NB consecutive rows addressed as wb + i * ws (lane i = row start + i). A block
// that would run past N is shifted back to end at row N - 1 (its first `skip` lanes repeat rows
// of the previous block and are not stored); when N < NB the rows are staged, zero-padded, in a
// thread-local buffer. The partial last span of every row and its last (partial) 4 scales are
// staged too, so that every load stays inside the tensors.
template <class A>
struct Block {
  static constexpr int NB = A::NB;
  const uint8_t* wb = nullptr;
  const float* sb = nullptr;
  int64_t ws = 0, ss = 0;  // weight row stride (bytes), scale row stride (floats)
  int64_t full = 0;        // spans read from wb directly; the next one comes from tail
  int64_t start = 0;
  int skip = 0, lanes = 0; // store lanes [skip, lanes)
  bool b16 = false;        // kBlocked16: wb / sb point at lane 0 of the block's words / scales
  alignas(64) uint8_t tail[NB][48];
  alignas(64) float stail[NB][4];
};

// kBlocked16 (paretoq_kernels.h): NB <= 16 rows starting at `first` (a multiple of NB) are lanes
// first % 16 .. of their 16-row block; rows and row bytes are padded, so only the last, partial,
// 4 scales are staged (as in row order).
template <class A>
inline void setup_block_b16(Block<A>& t, const LinearArgs& a, int64_t first, int span) {
  const int64_t rbp = blocked_row_bytes(a.fmt, a.row_bytes);
  const int64_t blk = first / kBlockRows, lane = first % kBlockRows;
  t.b16 = true;
  t.start = first;
  t.skip = 0;
  t.lanes = static_cast<int>(a.N - first < A::NB ? a.N - first : A::NB);
  t.wb = a.w + blk * rbp * kBlockRows + lane * 4;
  t.sb = a.scale + blk * a.G * kBlockRows + lane;
  t.ws = 0;
  t.ss = kBlockRows;
  t.full = rbp / span;
  const int64_t gt = (a.G / 4) * 4, glen = a.G - gt;
  if (a.G > 1 && glen > 0)
    for (int i = 0; i < A::NB; ++i)
      for (int j = 0; j < 4; ++j) t.stail[i][j] = j < glen ? t.sb[(gt + j) * kBlockRows + i] : 0.f;
}

template <class A>
inline void setup_block(Block<A>& t, const LinearArgs& a, int64_t first, int span) {
  constexpr int NB = A::NB;
  static_assert(kBlockRows % NB == 0, "a vector's rows must lie in one 16-row block");
  if (a.order == kBlocked16) return setup_block_b16<A>(t, a, first, span);
  thread_local std::vector<uint8_t> wstage;
  thread_local std::vector<float> sstage;
  const uint8_t* w = a.w;
  const float* sc = a.scale;
  t.ws = a.row_bytes;
  t.ss = a.G;
  int64_t rows = a.N;
  t.full = a.row_bytes / span;
  if (a.N < NB) {  // stage the whole (tiny) weight, zero rows past N, rows padded to whole spans
    t.ws = (a.row_bytes + span - 1) / span * span;
    t.full = t.ws / span;
    wstage.assign(static_cast<size_t>(NB * t.ws), 0);
    sstage.assign(static_cast<size_t>(NB * a.G), 0.f);
    for (int64_t n = 0; n < a.N; ++n) {
      std::memcpy(wstage.data() + n * t.ws, a.w + n * a.row_bytes, static_cast<size_t>(a.row_bytes));
      std::memcpy(sstage.data() + n * a.G, a.scale + n * a.G, sizeof(float) * static_cast<size_t>(a.G));
    }
    w = wstage.data();
    sc = sstage.data();
    rows = NB;
  }
  const int64_t st = first + NB <= rows ? first : rows - NB;
  t.start = st;
  t.skip = static_cast<int>(first - st);
  t.lanes = static_cast<int>(a.N - st < NB ? a.N - st : NB);
  t.wb = w + st * t.ws;
  t.sb = sc + st * a.G;
  // Stage only what the kernels will read: the partial last span of each row (none when rows are
  // whole spans, the usual case) and the last, partial, 4 scales (none per row or when G % 4 == 0).
  const int64_t toff = t.full * span, tlen = a.row_bytes - toff;
  if (tlen > 0)
    for (int i = 0; i < NB; ++i) {
      std::memset(t.tail[i], 0, sizeof(t.tail[i]));
      std::memcpy(t.tail[i], t.wb + i * t.ws + toff, static_cast<size_t>(tlen));
    }
  const int64_t gt = (a.G / 4) * 4, glen = a.G - gt;
  if (a.G > 1 && glen > 0)
    for (int i = 0; i < NB; ++i)
      for (int j = 0; j < 4; ++j) t.stail[i][j] = j < glen ? t.sb[i * a.G + gt + j] : 0.f;
}

#ifndef PQ_PF_B16
#define PQ_PF_B16 4096
#endif
#ifndef PQ_PF_BLOCKS
#define PQ_PF_BLOCKS 1
#endif
// Weight span s: four word vectors (twelve for a 3-bit span).
template <class A, int SPAN>
PQ_INLINE void load_span(const Block<A>& t, int64_t s, typename A::VI* out) {
  if (t.b16) {  // chunk c (16 bytes of each row) is 4 words x 16 rows = 256 contiguous bytes
    const uint8_t* b = t.wb + s * SPAN * kBlockRows;
    // One sequential stream; prefetched PQ_PF_B16 = 4 KB ahead into L2 (measured: the hardware
    // prefetchers alone leave a 2-vCPU Xeon at 80 % of this speed; 2 KB and 8 KB are no better; on
    // a 2-vCPU AMD EPYC (Zen 5) 8-32 KB were within that machine's +-15 % run-to-run noise).
    for (int i = 0; i < SPAN * kBlockRows; i += 64) __builtin_prefetch(b + PQ_PF_B16 + i, 0, 2);
    unroll<SPAN / 16>([&](auto I) {
      unroll<4>([&](auto J) { out[4 * I.value + J.value] = A::load_i(b + 256 * I.value + 64 * J.value); });
    });
    return;
  }
  const bool direct = s < t.full;
  const uint8_t* b = direct ? t.wb + s * SPAN : &t.tail[0][0];
  const int64_t stride = direct ? t.ws : 48;
  // The NB rows of a block are NB concurrent streams, more than the hardware prefetchers follow
  // well; the next block's rows are contiguous (NB * row_bytes bytes), so they are prefetched
  // sequentially into L2 while this one is computed: SPAN * NB bytes per step.
  if (direct) {
    const uint8_t* nb = t.wb + PQ_PF_BLOCKS * A::NB * t.ws + s * SPAN * A::NB;
    for (int i = 0; i < SPAN * A::NB; i += 64) __builtin_prefetch(nb + i, 0, 2);
  }
  unroll<SPAN / 16>([&](auto I) { A::load4(b + 16 * I.value, stride, out + 4 * I.value); });
}

// Scales of groups g4 .. g4+3 (g4 % 4 == 0), clamped below at eps; per-row scales (G == 1) are
// the block's NB consecutive floats.
template <class A>
PQ_INLINE void load_scales(const Block<A>& t, int64_t g4, int64_t G, typename A::VF out[4]) {
  if (G == 1) {
    out[0] = A::max_eps(A::load_f(t.sb));
    return;
  }
  typename A::VI v[4];
  if (t.b16 && g4 + 4 <= G) {  // group g of the block's rows: NB contiguous floats
    unroll<4>([&](auto I) { out[I.value] = A::max_eps(A::load_f(t.sb + (g4 + I.value) * kBlockRows)); });
    return;
  }
  // the next block's scales are contiguous: prefetch as many bytes of them as this call reads
  const uint8_t* nb = reinterpret_cast<const uint8_t*>(t.sb + A::NB * t.ss) + g4 * 4 * A::NB;
  for (int i = 0; i < 16 * A::NB; i += 64) __builtin_prefetch(nb + i, 0, 2);
  if (g4 + 4 <= G && !t.b16) A::load4(reinterpret_cast<const uint8_t*>(t.sb + g4), 4 * t.ss, v);
  else A::load4(reinterpret_cast<const uint8_t*>(&t.stail[0][0]), 16, v);
  unroll<4>([&](auto I) { out[I.value] = A::max_eps(A::as_f(v[I.value])); });
}

// Group bookkeeping: the group being accumulated and the index of its last block (word or quad).
// Blocks past the last group (zero padding of a 3-bit row's last unit) end nothing.
struct GroupCursor {
  int64_t g = 0, last = 0, per = 1, groups = 1;
  GroupCursor(int64_t per_group, int64_t n_groups) : last(per_group - 1), per(per_group), groups(n_groups) {}
  bool ends(int64_t blk) const { return blk == last && g < groups; }
  void next() { ++g; last += per; }
};

// Scale vector of group g (loaded 4 groups at a time).
template <class A>
struct Scales {
  typename A::VF sv[4];
  PQ_INLINE typename A::VF get(const Block<A>& t, int64_t g, int64_t G) {
    if (G == 1) return sv[0];
    if ((g & 3) == 0) load_scales<A>(t, g, G, sv);
    return sv[g & 3];
  }
};

// Group bookkeeping of one block: after block (word / quad) `blk`, flush(g, scale vector of g) if
// group g ends there.
template <class A>
struct Groups {
  Scales<A> sc;
  GroupCursor cur;
  Groups(const LinearArgs& a, const Block<A>& t, int64_t per_group) : cur(per_group, a.G) {
    if (a.G == 1) load_scales<A>(t, 0, 1, sc.sv);
  }
  template <class F>
  PQ_INLINE void after(int64_t blk, const LinearArgs& a, const Block<A>& t, F&& flush) {
    if (cur.ends(blk)) {
      flush(cur.g, sc.get(t, cur.g, a.G));
      cur.next();
    }
  }
};

// f(w, word vector, J) for every 32-bit word w of the block's rows (1/2/4-bit codes); J is the
// word's position in its span (std::integral_constant 0..3, = w % 4).
template <class A, class F>
PQ_INLINE void for_each_word(const LinearArgs& a, const Block<A>& t, F&& f) {
  const int64_t nwords = (a.row_bytes + 3) / 4, nsteps = (a.row_bytes + 15) / 16;
  for (int64_t s = 0; s < nsteps; ++s) {
    typename A::VI wv[4];
    load_span<A, 16>(t, s, wv);
    unroll<4>([&](auto J) {
      const int64_t w = 4 * s + J.value;
      if (w < nwords) f(w, wv[J.value], J);
    });
  }
}

// f(unit, W) for every 32-code unit of the block's rows, W[0..2] its three words (3-bit codes).
template <class A, class F>
PQ_INLINE void for_each_unit(const LinearArgs& a, const Block<A>& t, F&& f) {
  const int64_t nunits = (a.row_bytes + kUnit3Bytes - 1) / kUnit3Bytes, nsteps = (a.row_bytes + 47) / 48;
  for (int64_t s = 0; s < nsteps; ++s) {
    typename A::VI wv[12];
    load_span<A, 48>(t, s, wv);
    unroll<4>([&](auto U) {
      const int64_t unit = 4 * s + U.value;
      if (unit < nunits) f(unit, static_cast<const typename A::VI*>(wv + 3 * U.value));
    });
  }
}

inline int64_t n_words(const LinearArgs& a) { return (a.row_bytes + 3) / 4; }
inline int64_t n_units(const LinearArgs& a) { return (a.row_bytes + kUnit3Bytes - 1) / kUnit3Bytes; }

template <class A, int MT>
PQ_INLINE void store_block(const LinearArgs& a, const Block<A>& t, int64_t m0, const typename A::VF (&res)[MT],
                           const float* dscale, float c) {
  unroll<MT>([&](auto M) {
    constexpr int mt = M.value;
    typename A::VF v = res[mt];
    if (dscale) v = A::mul_f(A::mul_f(v, A::set1_f(c)), A::set1_f(dscale[m0 + mt]));
    A::store(a.out + (m0 + mt) * a.N + t.start, v, t.skip, t.lanes);
  });
}

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
        sum = acc[mt][0];
        unroll<NA * R - 1>([&](auto I) {
          constexpr int i = I.value + 1;
          sum = A::add(sum, A::template sra<(i % NA) * SH>(acc[mt][i]));
        });
        unroll<NA * R>([&](auto I) { acc[mt][I.value] = A::zero_i(); });
      }
      const VI v2 = A::sub(A::template sll<1>(sum), A::set1_i(p.zq2[(m0 + mt) * p.G + g]));
      res[mt] = A::fma(s, A::cvt(v2), res[mt]);
    });
  }
};

// 1/2/4-bit codes: a word vector holds 8/B planes; plane t meets one broadcast activation dword.
template <class A, int B, int MT, int NA, int SH>
PQ_FLATTEN void block_i8_words(const LinearArgs& a, const Prepared& p, const Block<A>& t, int64_t m0) {
  using VI = typename A::VI;
  constexpr int CPB = 8 / B, CPW = 32 / B;
  constexpr bool kMasked = SH != 0;
  static_assert(!kMasked || NA == CPB, "masked planes need one accumulator per plane");
  const int8_t* q[MT];
  for (int mt = 0; mt < MT; ++mt) q[mt] = p.q + (m0 + mt) * p.kq;
  VI masks[CPB];
  for (int i = 0; i < CPB; ++i) masks[i] = A::set1_i(0x01010101 * (((1 << B) - 1) << (kMasked ? i * B : 0)));
  constexpr int R = MT == 1 ? 2 : 1;  // one token: alternate two sets of chains, even / odd words
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
template <class A, int D>
PQ_INLINE typename A::VI quad_window(const typename A::VI* W) {
  constexpr int pos = 12 * D, wi = pos / 32, sh = pos % 32;
  if constexpr (sh + 12 <= 32) {
    return A::template srl<sh>(W[wi]);
  } else {
    return A::template window<sh>(W[wi], W[wi + 1]);
  }
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
  constexpr int pos = 3 * I, wi = pos / 32, sh = pos % 32;
  if constexpr (sh + 3 <= 32) {
    return A::template srl<sh>(W[wi]);
  } else {
    return A::template window<sh>(W[wi], W[wi + 1]);
  }
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
    if constexpr (GM == 1 && MT == 1) {  // decode: the usual group sizes as super-blocks (64, 128)
      switch (p.gs) {
        case 64: return block_i8_trits_raw<A, MT, GM, 16>(a, p, t, m0);
        case 128: return block_i8_trits_raw<A, MT, GM, 32>(a, p, t, m0);
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

// ---- blocks and row ranges ---------------------------------------------------------------------

template <class A, int B, int MT, int NA, int SH = 0>
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
    if (mode == ActMode::Int8) block_i8_words<A, B, MT, NA, SH>(a, p, t, m0);
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
        if (masked) {
          block<A, B, 1, 8 / B, B>(a, p, mode, t, m, lv);
          continue;
        }
      }
      block<A, B, 1, 2>(a, p, mode, t, m, lv);
    }
  }
}

template <class A>
void rows(const LinearArgs& a, const Prepared& p, ActMode mode, int64_t n0, int64_t n1) {
  if (a.fmt.storage == kTrits5) return rows_b<A, kTrits>(a, p, mode, n0, n1);
  switch (a.fmt.code_bits) {
    case 1: return rows_b<A, 1>(a, p, mode, n0, n1);
    case 2: return rows_b<A, 2>(a, p, mode, n0, n1);
    case 3: return rows_b<A, 3>(a, p, mode, n0, n1);
    default: return rows_b<A, 4>(a, p, mode, n0, n1);
  }
}

}  // namespace simd
}  // namespace paretoq
