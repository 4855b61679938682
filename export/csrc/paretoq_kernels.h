// ParetoQ low-bit linear kernels (C++17). One templated implementation, no runtime dependency:
// the ExecuTorch registration (op_linear_et.cpp) and the ATen registration (op_linear_aten.cpp)
// are thin wrappers around `linear()` below.
//
// Weights: the layouts of paretoq_ao/packing.py, read in place (Order kRows) or regrouped once into
// 16-row blocks of interleaved words (kBlocked16, see Order below: one sequential stream per block
// instead of 16 strided ones, which is what lets decode reach the DRAM bandwidth). Format::storage says which: kRowBits (1/2/3/4-bit: each row n of the uint8
// [N, row_bytes] weight is a little-endian bit stream of `code_bits`-wide codes) or kTrits5
// (ternary: 5 trits per byte, 4-byte words of 20 codes, code 20w + nb*i + j = trit i of byte 4w + j,
// trit i of byte b = ((b * 3^i) mod 256) * 3 >> 8). value = (code - zero) * step * max(s, eps) with
// s = scale[n, g] of the code's group (formats_table.h, generated from formats.py).
//
// Two activation modes, chosen per call (the ops paretoq::linear and paretoq::linear_8da):
//
//   ActMode::Fp32  float activations, the eager op's semantics. Canonical arithmetic (every path
//     computes exactly this, so results are bit-identical across paths):
//       c_j   = fma-chain over the k of group g with k % 4 == j, ascending:  c_j = fma(level(code_k), x_k, c_j)
//       res   = fma-chain over g ascending:  res = fma(max(s_g, eps), (c_0 + c_1) + (c_2 + c_3), res)
//       out   = res
//     kTrits5 chains by *slot*: code 20w + nb*i + j goes to chain j (j < nb; = k mod 4 except in a
//     short last word), visited in ascending k.
//   ActMode::Int8  dynamic int8 activations, one scale per token (like torchao's 8da4w):
//       d = amax|x| / 127, q_k = round-half-even(x_k / d) clamped to +-127 (q = 0 if d == 0),
//       dot_g = sum_{k in g} code_k * q_k                     (exact, integer)
//       v_g   = 2 * dot_g - (2 * zero) * sum_{k in g} q_k      (exact int32; 2*zero is integral)
//       res   = fma-chain over g ascending:  res = fma(max(s_g, eps), float(v_g), res)
//       out   = (res * (0.5 * step)) * d
//     A token holding NaN or Inf is computed in Fp32 mode instead, so that NaN/Inf propagate
//     exactly as in the eager op.
//
// Paths: Scalar (the reference: the formulas above, one code at a time), AVX2, AVX-512 (F, BW,
// VL, VNNI, VBMI, VBMI2: Ice Lake / Zen 4 and later), NEON and NEON with dot-product instructions
// (ARMv8.2 dotprod). Every SIMD path computes one output row per 32-bit vector lane (16 / 8 / 4
// rows per vector) and works on "word vectors" (lane i = the next 32-bit word of row i): in kRows
// order it loads 16 bytes of each of those rows and transposes them in registers; in kBlocked16
// order a word vector is one contiguous load.
// Group boundaries then fall between vector operations, never inside one, so every group size
// whose groups are whole words (1/2/4-bit: group_size * code_bits % 32 == 0) or whole 4-code
// quads (3-bit: group_size % 4 == 0) runs the SIMD code at full speed; other group sizes use the
// scalar reference (plan() says so). Per-row scales (one group) run SIMD for every K. kTrits5
// decodes one plane (trit i of the 4 bytes of each word: 4 consecutive codes) at a time, so its
// groups must be multiples of 4 codes (and, when the row's last word is short, no smaller than
// that word).
#pragma once
#include <cstddef>
#include <cstdint>

#include "formats_table.h"

namespace paretoq {

enum Storage : int { kRowBits = 0, kTrits5 = 1 };

struct Format {
  int code_bits;  // 1, 2, 3, 4: width of a code field (kRowBits)
  int n_codes;    // valid codes (3 for ternary)
  float zero;     // code of level 0 (2 * zero is an integer)
  float step;     // distance between normalised levels
  int storage = kRowBits;
};

// Bytes of one packed row of K codes (packing.packed_row_bytes).
inline int64_t row_bytes_for(const Format& f, int64_t K) {
  return f.storage == kTrits5 ? (K + 4) / 5 : (K * f.code_bits + 7) / 8;
}

// bits: 1, 1.58, 2, 3, 4 (formats_table.h). Returns false if unknown.
bool format_for_bits(double bits, Format* out);

enum class Path : int { Auto = 0, Scalar = 1, AVX2 = 2, AVX512 = 3, NEON = 4, NEONDOT = 5 };
enum class ActMode : int { Int8 = 0, Fp32 = 1 };

const char* path_name(Path p);
bool path_available(Path p);  // compiled in and supported by this CPU
Path best_path();             // what Auto resolves to (env PARETOQ_KERNEL_PATH overrides)

// Order of the weight and scale buffers (LinearArgs::order). kRows: the packing.py layouts read in
// place, [N, row_bytes] codes and [N, G] scales. kBlocked16: the same codes and scales regrouped
// once, at export or load time (packing.block16, which defines the layout), so that every 16-row
// block is one sequential stream: codes uint8 [Np / 16, Rp / 4, 64] and scales float [Np / 16, G, 16]
// with Np = blocked_rows(N) and Rp = blocked_row_bytes(fmt, row_bytes), padding 0: word w (bytes
// 4w .. 4w+3) of row n at [n / 16, w, 4 * (n % 16) ...], scale (n, g) at [n / 16, g, n % 16].
enum Order : int { kRowsOrder = 0, kBlocked16 = 1 };
constexpr int kBlockRows = 16;
inline int64_t blocked_rows(int64_t N) { return (N + kBlockRows - 1) / kBlockRows * kBlockRows; }
inline int64_t blocked_row_bytes(const Format& f, int64_t row_bytes) {
  const int64_t span = (f.storage == kRowBits && f.code_bits == 3) ? 48 : 16;  // bytes per kernel step
  return (row_bytes + span - 1) / span * span;
}

struct LinearArgs {
  const float* x;       // [M, K] activations, rows contiguous
  int64_t M, K, N;
  const uint8_t* w;     // [N, row_bytes], the layout of fmt.storage
  int64_t row_bytes;
  const float* scale;   // [N, G]
  int64_t G;
  Format fmt;
  float* out;           // [M, N]
  int order = kRowsOrder;  // kBlocked16: w and scale as blocked16 (padded sizes above)
};

// The largest group (or K, per row) the int32 accumulators of the Int8 mode allow.
constexpr int64_t kMaxGroup = int64_t(1) << 20;

// A caller-provided "parallel for" over [0, n) (may be null: serial). Ranges must cover [0, n).
typedef void (*RangeFn)(void* ctx, int64_t b, int64_t e);
typedef void (*ParallelFor)(int64_t n, RangeFn fn, void* ctx);

// nullptr if the arguments are consistent, else a message naming the dims (static storage for
// fixed messages, else a thread-local buffer valid until the next call on this thread).
const char* check_args(const LinearArgs& a);

// The whole linear. Returns nullptr on success, else an error message (see check_args).
const char* linear(const LinearArgs& a, Path path, ActMode mode, ParallelFor pf);

// Which kernel serves these arguments, e.g. "avx512 int8, 16 rows per vector" or
// "scalar (group_size 24 is not a whole number of 32-bit words at 2-bit codes)".
// Writes a NUL-terminated string into buf (at most n bytes) and returns buf.
const char* plan(const LinearArgs& a, Path path, ActMode mode, char* buf, size_t n);

// Reads n bytes at p once (the physical limit the benchmarks quote: a streaming read of a buffer
// far larger than the caches) and returns a checksum of them so that the read is not elided.
uint64_t stream_read(const uint8_t* p, size_t n);

}  // namespace paretoq
