// Internals shared by kernels.cpp (driver, scalar reference) and the per-architecture translation
// units (kernels_avx2.cpp, kernels_avx512.cpp, kernels_neon*.cpp), each compiled with its own -m
// flags and instantiating simd_impl.h.
#pragma once
#include "paretoq_kernels.h"

// The SIMD traits and helpers are tiny and must be inlined into the unrolled loops.
#define PQ_INLINE inline __attribute__((always_inline))
// Inline everything (the unrolled lambdas included) into a kernel body.
#define PQ_FLATTEN __attribute__((flatten))
// A lambda that must be inlined wherever it is called (flatten does not always reach them).
#define PQ_LAMBDA_INLINE __attribute__((always_inline))

namespace paretoq {

// Activations prepared once per call.
//
// Int8 mode: q holds each token's int8 codes, kq bytes per token, zero-padded past K. For 1/2/4-bit
// weights they are permuted inside every 32-bit weight word w (CPW = 32 / b codes, cpb = 8 / b codes
// per byte): slot byte 4 * t + j of word w holds the activation of code CPW * w + cpb * j + t, the
// code in "plane" t (bits t*b .. t*b+b-1) of byte j of the word. One shift + mask of a word vector
// then meets its activations as one broadcast 32-bit value. 3-bit keeps the natural order (each
// 4-code "quad" is decoded into 4 bytes in order). The scalar path reads q in natural order.
struct Prepared {
  int64_t M = 0, K = 0, G = 0, gs = 0;
  int64_t kq = 0;               // per-token stride of q / xf
  const int8_t* q = nullptr;    // int8 mode [M, kq]
  const float* d = nullptr;     // int8 mode [M] per-token scales
  const int32_t* zq2 = nullptr; // int8 mode [M, G]: 2 * zero * sum_{k in g} q_k
  const float* xf = nullptr;    // fp32 mode [M, kq], zero-padded past K (may alias the input)
};

// Number of activation slots per token a path needs: codes rounded up to whole words (1/2/4-bit,
// 20 slots per word for trits5) or whole 32-code units (3-bit). Scalar: K.
int64_t padded_codes(int64_t row_bytes, const Format& f, bool simd);

// trits5, SIMD paths: activation slot 20w + 4i + j holds code 20w + nb*i + j of the row (nb = bytes of
// word w; slots of no code hold 0). Identity except in a short last word. Returns the code or -1.
inline int64_t trits5_slot_code(int64_t slot, int64_t K, int64_t row_bytes) {
  const int64_t w = slot / 20, o = slot % 20, i = o / 4, j = o % 4;
  const int64_t left = row_bytes - 4 * w, nb = left < 4 ? left : 4;
  if (j >= nb) return -1;
  const int64_t k = 20 * w + nb * i + j;
  return k < K ? k : -1;
}

// Whether a SIMD path can serve this group layout; if not, *why is set to a reason.
bool simd_groups_ok(const LinearArgs& a, const char** why);

// Per-architecture row kernels: rows [n0, n1) (n0 a multiple of rows_per_tile(path, M)).
int rows_per_tile(Path p, int64_t M);
void rows_avx2(const LinearArgs& a, const Prepared& p, ActMode mode, int64_t n0, int64_t n1);
void rows_avx512(const LinearArgs& a, const Prepared& p, ActMode mode, int64_t n0, int64_t n1);
void rows_avx2_trits(const LinearArgs& a, const Prepared& p, ActMode mode, int64_t n0, int64_t n1);
void rows_avx512_trits(const LinearArgs& a, const Prepared& p, ActMode mode, int64_t n0, int64_t n1);
void rows_neon(const LinearArgs& a, const Prepared& p, ActMode mode, int64_t n0, int64_t n1);
void rows_neondot(const LinearArgs& a, const Prepared& p, ActMode mode, int64_t n0, int64_t n1);

// stream_read (paretoq_kernels.h) with 64- / 32-byte loads, and the portable version.
uint64_t stream_read_avx512(const uint8_t* p, size_t n);
uint64_t stream_read_avx2(const uint8_t* p, size_t n);
uint64_t stream_read_scalar(const uint8_t* p, size_t n);

// Scalar reference (natural-order q).
void rows_scalar(const LinearArgs& a, const Prepared& p, ActMode mode, int64_t n0, int64_t n1);

// Level table: tab[j] = (j % 2^b - zero) * step for j < 16 (exact floats).
void level_table(const Format& f, float tab[16]);

// Codes per 32-bit word (1/2/4-bit) and 3-bit unit geometry.
constexpr int kUnit3Bytes = 12;  // 32 codes
constexpr int kUnit3Codes = 32;

}  // namespace paretoq
