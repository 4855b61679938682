// Part of the one SIMD implementation (simd_impl.h, which documents the traits class `A`): the row
// blocks and their weight / scale streams, group bookkeeping, and the word / unit iterators every
// kernel is built on.
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
#define PQ_PF_B16 8192
#endif
#ifndef PQ_PF_BLOCKS
#define PQ_PF_BLOCKS 1
#endif
// Weight span s: four word vectors (twelve for a 3-bit span).
template <class A, int SPAN>
PQ_INLINE void load_span(const Block<A>& t, int64_t s, typename A::VI* out) {
  if (t.b16) {  // chunk c (16 bytes of each row) is 4 words x 16 rows = 256 contiguous bytes
    const uint8_t* b = t.wb + s * SPAN * kBlockRows;
    // One sequential stream; prefetched PQ_PF_B16 = 8 KB ahead into L2. Measured: the hardware
    // prefetchers alone leave a 2-vCPU Xeon at 80 % of this speed (there 2, 4 and 8 KB were alike);
    // on a 2-vCPU AMD EPYC Zen 4, 4 -> 8 KB made the memory-bound decodes 1.2-1.5x faster at one
    // thread (2-bit 11008 x 4096: 0.56 -> 0.39 ms, 4-bit 1.11 -> 0.90 ms; 16 KB alike; the
    // compute-bound 1-bit, ternary and 3-bit unchanged), benchmarks/results/avx512-prefetch-2026-12-06-zen4.md.
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

}  // namespace simd
}  // namespace paretoq
