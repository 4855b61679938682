// ParetoQ low-bit linear kernels (C++17, no ExecuTorch dependency).
//
// Weight layout: exactly paretoq-rowbits-v1 (paretoq_ao/packing.py), read in place -- no
// repacking at export time. Each row n of the uint8 [N, row_bytes] weight is a little-endian bit
// stream of `code_bits`-wide codes; value = (code - zero) * step * max(scale[n, g], 1e-5).
//
// Two activation modes (process-wide, see set_activation_mode):
//   * Int8 (default): every activation row (token) is quantized to int8 with one scale
//     d = absmax / 127, q = nearbyint(x / d) (ties to even, like torch.round), and the kernels
//     compute integer dot products  sum_k code[k] * q[k]  (u8 x s8, AVX2 vpmaddubsw / AVX-512
//     VNNI vpdpbusd / NEON), then
//       out = d * step * sum_g max(s_g, 1e-5) * (dot_g - zero * sum_{k in g} q[k]).
//     2*zero is an integer for every format, so the bracket is computed exactly in int64.
//     All paths (scalar / AVX2 / AVX-512 / NEON) give bit-identical results for this mode.
//   * Fp32: plain float activations, dequantized weights, float accumulation (the accuracy
//     reference; matches the eager PyTorch op to float rounding). Scalar (auto-vectorized) only.
//
// SIMD trick (no weight repacking): a vector of W packed bytes of a 1/2/4-bit row holds
// cpb = 8 / code_bits "planes": plane p (bits p*b .. p*b+b-1 of every byte) holds the codes
// cpb*j + p, j = 0..W-1. Shifting + masking the raw vector gives each plane as W u8 codes.
// Instead of de-interleaving the weights, the *activations* are permuted once per token when
// they are quantized: inside each chunk of C = W * cpb codes (W = vector bytes of the path),
// position p*W + j holds activation cpb*j + p. 3-bit rows (codes straddle bytes) are unpacked
// W codes at a time into a small buffer (identity permutation). Chunks never cross a scale group;
// the tail of each group (and of K) is done by scalar code on activations left in natural order.
#pragma once
#include <cstddef>
#include <cstdint>

namespace paretoq {

struct Format {
  int code_bits;  // 1, 2, 3, 4
  float zero;     // code of level 0 (2 * zero is an integer)
  float step;     // distance between normalised levels
};

// bits: 1, 1.58, 2, 3, 4 (mirrors paretoq_ao/formats.py). Returns false if unknown.
bool format_for_bits(double bits, Format* out);

enum class Path : int { Auto = 0, Scalar = 1, AVX2 = 2, AVX512 = 3, NEON = 4 };
enum class ActMode : int { Int8 = 0, Fp32 = 1 };

const char* path_name(Path p);
bool path_available(Path p);  // compiled in and supported by this CPU
Path best_path();             // what Auto resolves to (env PARETOQ_KERNEL_PATH overrides)

void set_activation_mode(ActMode m);
ActMode activation_mode();

// Prepared activations for the int8 mode (one per call; reused across output-row ranges/threads).
struct Prepared {
  int64_t M = 0, K = 0, G = 0, gs = 0;
  int chunk = 0;             // C (codes per SIMD chunk), 0 = natural order (scalar)
  int8_t* q = nullptr;       // [M, K], permuted inside full chunks of each group
  float* d = nullptr;        // [M] per-token scales
  int32_t* gsum = nullptr;   // [M, G] sum of q inside each group
  const float* x = nullptr;  // fp32 mode: the raw activations [M, K]
};

struct LinearArgs {
  const float* x;       // [M, K] activations
  int64_t M, K, N;
  const uint8_t* w;     // [N, row_bytes]
  int64_t row_bytes;
  const float* scale;   // [N, G]
  int64_t G;
  Format fmt;
  float* out;           // [M, N]
};

// The whole linear, with a caller-provided "parallel for" over output rows (may be null: serial).
typedef void (*RangeFn)(void* ctx, int64_t n0, int64_t n1);
typedef void (*ParallelFor)(int64_t n, RangeFn fn, void* ctx);
// Returns nullptr on success, else an error message (static string).
const char* linear(const LinearArgs& a, Path path, ActMode mode, ParallelFor pf);

// --- internals shared by the per-architecture translation units ---
int chunk_codes(Path p, int code_bits);  // C for a path (0 for scalar / unsupported)
void quantize_activations(const LinearArgs& a, int chunk, Prepared* p, int8_t* qbuf, float* dbuf,
                          int32_t* gbuf);
// The same in two steps: fill in *p, then quantize tokens [m0, m1) (independent per token).
void quantize_activations_begin(const LinearArgs& a, int chunk, Prepared* p, int8_t* qbuf,
                                float* dbuf, int32_t* gbuf);
void quantize_tokens(const LinearArgs& a, const Prepared& p, int64_t m0, int64_t m1);
void rows_int8_scalar(const LinearArgs& a, const Prepared& p, int64_t n0, int64_t n1);
void rows_fp32_scalar(const LinearArgs& a, int64_t n0, int64_t n1);
void rows_int8_avx2(const LinearArgs& a, const Prepared& p, int64_t n0, int64_t n1);
void rows_int8_avx512(const LinearArgs& a, const Prepared& p, int64_t n0, int64_t n1);
void rows_int8_neon(const LinearArgs& a, const Prepared& p, int64_t n0, int64_t n1);

// Shared scalar helpers (inline so every TU computes the epilogue identically).
inline int code_at(const uint8_t* row, int64_t k, int b) {
  const int64_t bit = k * b;
  const int64_t byte = bit >> 3;
  const int sh = static_cast<int>(bit & 7);
  unsigned v = row[byte];
  if (sh + b > 8) v |= static_cast<unsigned>(row[byte + 1]) << 8;
  return static_cast<int>((v >> sh) & ((1u << b) - 1u));
}

inline float clamp_scale(float s) { return s < 1e-5f ? 1e-5f : s; }

// Group epilogue: s * (dot - zero * qsum) with 2*zero integral, exact in int64.
inline float group_term(float s, int64_t dot, int32_t qsum, int zero2) {
  const int64_t v2 = 2 * dot - static_cast<int64_t>(zero2) * qsum;
  return clamp_scale(s) * (static_cast<float>(v2) * 0.5f);
}

}  // namespace paretoq
