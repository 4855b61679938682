// Thin ExecuTorch registration of the kernel library (paretoq_kernels.h):
//
//   paretoq::linear.out(Tensor input, Tensor packed, Tensor scale, float bits, *, Tensor(a!) out)
//       float activations (the eager op's semantics)
//   paretoq::linear_8da.out(Tensor input, Tensor packed, Tensor scale, float bits, *, Tensor(a!) out)
//       dynamic int8 activations, one scale per token
//
//   paretoq::linear_b16.out / linear_8da_b16.out(Tensor input, Tensor codes, Tensor scales, float bits,
//       int out_features, *, Tensor(a!) out)     the same on weights in the blocked16 order
//
//   input [..., K] float32, packed uint8 [N, row_bytes_for(fmt, K)] (packing.py layouts),
//   scale float32 [N, G] (G divides K), out float32 [..., N] (resized: dynamic batch/sequence);
//   blocked16: codes uint8 [Np / 16, Rp / 4, 64], scales float32 [Np / 16, G, 16] (paretoq_kernels.h).
// The program itself says which activation mode each layer uses (the op it calls). Row blocks
// are split over ExecuTorch's thread pool (executorch::extension::parallel_for).
#include <executorch/extension/kernel_util/make_boxed_from_unboxed_functor.h>
#include <executorch/runtime/kernel/kernel_includes.h>
#include <executorch/runtime/kernel/thread_parallel_interface.h>

#include <array>
#include <atomic>

#include "paretoq_kernels.h"

#ifndef PARETOQ_BUILD_ID
#define PARETOQ_BUILD_ID "dev"
#endif

using executorch::aten::ScalarType;
using executorch::aten::SizesType;
using executorch::aten::Tensor;
using executorch::runtime::KernelRuntimeContext;

namespace executorch::extension::threadpool {
class ThreadPool {
 public:
  bool _unsafe_reset_threadpool(uint32_t num_threads);
  size_t get_thread_count();
};
ThreadPool* get_threadpool();
}  // namespace executorch::extension::threadpool

namespace {

std::atomic<long long> g_calls[2];

void pf_executorch(int64_t n, paretoq::RangeFn fn, void* ctx) {
  executorch::extension::parallel_for(0, n, 1, [&](int64_t b, int64_t e) { fn(ctx, b, e); });
}

const char* dtype_name(ScalarType t) { return executorch::runtime::toString(t); }

// The input, bits and out checks of every op; resizes out to [..., N]. On failure reports a message
// and returns false.
bool check_common(KernelRuntimeContext& ctx, const char* op, const Tensor& input, double bits, int64_t N,
                  Tensor& out, paretoq::Format* fmt) {
  ET_KERNEL_CHECK_MSG(ctx, paretoq::format_for_bits(bits, fmt), InvalidArgument, false,
                      "%s: bits=%f is not one of 1, 1.58, 2, 3, 4", op, bits);
  ET_KERNEL_CHECK_MSG(ctx, input.scalar_type() == ScalarType::Float, InvalidArgument, false,
                      "%s: input must be float32, got %s", op, dtype_name(input.scalar_type()));
  ET_KERNEL_CHECK_MSG(ctx, out.scalar_type() == ScalarType::Float, InvalidArgument, false,
                      "%s: out must be float32, got %s", op, dtype_name(out.scalar_type()));
  ET_KERNEL_CHECK_MSG(ctx, input.dim() >= 1, InvalidArgument, false, "%s: input must have at least 1 dim, got %d",
                      op, static_cast<int>(input.dim()));
  std::array<SizesType, executorch::runtime::kTensorDimensionLimit> sizes{};
  for (ssize_t i = 0; i + 1 < input.dim(); ++i) sizes[i] = input.size(i);
  sizes[input.dim() - 1] = static_cast<SizesType>(N);
  ET_KERNEL_CHECK_MSG(ctx,
                      executorch::runtime::resize_tensor(out, {sizes.data(), static_cast<size_t>(input.dim())}) ==
                          executorch::runtime::Error::Ok,
                      InvalidArgument, false, "%s: could not resize out (%d dims) to input dims with last dim N=%lld",
                      op, static_cast<int>(out.dim()), (long long)N);
  return true;
}

// packed uint8 [N, row_bytes] and scale float32 [N, G] (row order).
bool check_rows(KernelRuntimeContext& ctx, const char* op, const Tensor& input, const Tensor& packed,
                const Tensor& scale, const paretoq::Format& fmt) {
  ET_KERNEL_CHECK_MSG(ctx, packed.scalar_type() == ScalarType::Byte && packed.dim() == 2, InvalidArgument, false,
                      "%s: packed must be a 2-D uint8 tensor, got %s with %d dims", op,
                      dtype_name(packed.scalar_type()), static_cast<int>(packed.dim()));
  ET_KERNEL_CHECK_MSG(ctx, scale.scalar_type() == ScalarType::Float, InvalidArgument, false,
                      "%s: scale must be float32, got %s", op, dtype_name(scale.scalar_type()));
  const int64_t K = input.size(input.dim() - 1), N = packed.size(0), row_bytes = packed.size(1);
  ET_KERNEL_CHECK_MSG(ctx, row_bytes == paretoq::row_bytes_for(fmt, K), InvalidArgument, false,
                      "%s: input has K=%lld but packed [%lld, %lld] in the %s layout needs %lld bytes per row%s", op,
                      (long long)K, (long long)N, (long long)row_bytes,
                      fmt.storage == paretoq::kTrits5 ? "trits5 (ternary)" : "rowbits",
                      (long long)paretoq::row_bytes_for(fmt, K),
                      fmt.storage == paretoq::kTrits5 && row_bytes == (K * 2 + 7) / 8
                          ? " (this is 2-bit-field ternary, paretoq-rowbits-v1: export the model again)" : "");
  ET_KERNEL_CHECK_MSG(ctx, scale.dim() == 2 && scale.size(0) == N && scale.size(1) > 0 && K % scale.size(1) == 0,
                      InvalidArgument, false,
                      "%s: scale must be [N=%lld, G] with G dividing K=%lld, got %d dims [%lld, %lld]", op,
                      (long long)N, (long long)K, static_cast<int>(scale.dim()),
                      (long long)(scale.dim() > 0 ? scale.size(0) : -1), (long long)(scale.dim() > 1 ? scale.size(1) : -1));
  return true;
}

// codes uint8 [Np / 16, Rp / 4, 64] and scales float32 [Np / 16, G, 16] (blocked16 order).
bool check_b16(KernelRuntimeContext& ctx, const char* op, const Tensor& input, const Tensor& codes,
               const Tensor& scales, int64_t N, const paretoq::Format& fmt) {
  const int64_t K = input.size(input.dim() - 1);
  const int64_t nb = paretoq::blocked_rows(N) / paretoq::kBlockRows;
  const int64_t words = paretoq::blocked_row_bytes(fmt, paretoq::row_bytes_for(fmt, K)) / 4;
  ET_KERNEL_CHECK_MSG(ctx, N >= 0, InvalidArgument, false, "%s: out_features=%lld is negative", op, (long long)N);
  ET_KERNEL_CHECK_MSG(ctx, codes.scalar_type() == ScalarType::Byte && codes.dim() == 3 && codes.size(0) == nb &&
                               codes.size(1) == words && codes.size(2) == 4 * paretoq::kBlockRows,
                      InvalidArgument, false,
                      "%s: blocked16 codes of N=%lld, K=%lld must be uint8 [%lld, %lld, 64], got %s with %d dims [%lld, %lld, %lld]",
                      op, (long long)N, (long long)K, (long long)nb, (long long)words, dtype_name(codes.scalar_type()),
                      static_cast<int>(codes.dim()), (long long)(codes.dim() > 0 ? codes.size(0) : -1),
                      (long long)(codes.dim() > 1 ? codes.size(1) : -1), (long long)(codes.dim() > 2 ? codes.size(2) : -1));
  ET_KERNEL_CHECK_MSG(ctx, scales.scalar_type() == ScalarType::Float && scales.dim() == 3 && scales.size(0) == nb &&
                               scales.size(1) > 0 && K % scales.size(1) == 0 && scales.size(2) == paretoq::kBlockRows,
                      InvalidArgument, false,
                      "%s: blocked16 scales must be float32 [%lld, G, 16] with G dividing K=%lld, got %s with %d dims [%lld, %lld, %lld]",
                      op, (long long)nb, (long long)K, dtype_name(scales.scalar_type()), static_cast<int>(scales.dim()),
                      (long long)(scales.dim() > 0 ? scales.size(0) : -1), (long long)(scales.dim() > 1 ? scales.size(1) : -1),
                      (long long)(scales.dim() > 2 ? scales.size(2) : -1));
  return true;
}

// order: kRowsOrder (packed [N, row_bytes], scale [N, G]) or kBlocked16 (codes, scales; N given).
Tensor& run(KernelRuntimeContext& ctx, const char* op, paretoq::ActMode mode, const Tensor& input,
            const Tensor& packed, const Tensor& scale, double bits, int order, int64_t n, Tensor& out) {
  paretoq::Format fmt;
  const bool b16 = order == paretoq::kBlocked16;
  const int64_t N = b16 ? n : (packed.dim() == 2 ? packed.size(0) : 0);
  if (!check_common(ctx, op, input, bits, N, out, &fmt)) return out;
  if (!(b16 ? check_b16(ctx, op, input, packed, scale, N, fmt) : check_rows(ctx, op, input, packed, scale, fmt)))
    return out;
  const int64_t K = input.size(input.dim() - 1);
  const int64_t M = K > 0 ? input.numel() / K : 0;
  paretoq::LinearArgs a{input.const_data_ptr<float>(), M, K, N, packed.const_data_ptr<uint8_t>(),
                        paretoq::row_bytes_for(fmt, K), scale.const_data_ptr<float>(), scale.size(1), fmt,
                        out.mutable_data_ptr<float>(), order};
  const char* err = paretoq::linear(a, paretoq::Path::Auto, mode, pf_executorch);
  ET_KERNEL_CHECK_MSG(ctx, err == nullptr, InvalidArgument, out, "%s: %s", op, err ? err : "");
  g_calls[static_cast<int>(mode)].fetch_add(1, std::memory_order_relaxed);
  return out;
}

Tensor& linear_out(KernelRuntimeContext& ctx, const Tensor& input, const Tensor& packed, const Tensor& scale,
                   double bits, Tensor& out) {
  return run(ctx, "paretoq::linear.out", paretoq::ActMode::Fp32, input, packed, scale, bits, paretoq::kRowsOrder, 0, out);
}

Tensor& linear_8da_out(KernelRuntimeContext& ctx, const Tensor& input, const Tensor& packed, const Tensor& scale,
                       double bits, Tensor& out) {
  return run(ctx, "paretoq::linear_8da.out", paretoq::ActMode::Int8, input, packed, scale, bits, paretoq::kRowsOrder, 0,
             out);
}

Tensor& linear_b16_out(KernelRuntimeContext& ctx, const Tensor& input, const Tensor& codes, const Tensor& scales,
                       double bits, int64_t out_features, Tensor& out) {
  return run(ctx, "paretoq::linear_b16.out", paretoq::ActMode::Fp32, input, codes, scales, bits, paretoq::kBlocked16,
             out_features, out);
}

Tensor& linear_8da_b16_out(KernelRuntimeContext& ctx, const Tensor& input, const Tensor& codes, const Tensor& scales,
                           double bits, int64_t out_features, Tensor& out) {
  return run(ctx, "paretoq::linear_8da_b16.out", paretoq::ActMode::Int8, input, codes, scales, bits,
             paretoq::kBlocked16, out_features, out);
}

}  // namespace

EXECUTORCH_LIBRARY(paretoq, "linear.out", linear_out);
EXECUTORCH_LIBRARY(paretoq, "linear_8da.out", linear_8da_out);
EXECUTORCH_LIBRARY(paretoq, "linear_b16.out", linear_b16_out);
EXECUTORCH_LIBRARY(paretoq, "linear_8da_b16.out", linear_8da_b16_out);

// Small C API for Python (ctypes) and benchmarks.
extern "C" {
__attribute__((visibility("default"))) const char* paretoq_build_id() { return PARETOQ_BUILD_ID; }
__attribute__((visibility("default"))) const char* paretoq_kernel_path() {
  return paretoq::path_name(paretoq::best_path());
}
// Calls of linear.out (mode 1) / linear_8da.out (mode 0) since the library was loaded.
__attribute__((visibility("default"))) long long paretoq_call_count(int mode) {
  return g_calls[mode == 1 ? 1 : 0].load();
}
// Resets ExecuTorch's shared thread pool (also used by XNNPACK) to n threads.
__attribute__((visibility("default"))) int paretoq_set_num_threads(int n) {
  auto* tp = executorch::extension::threadpool::get_threadpool();
  return tp && tp->_unsafe_reset_threadpool(static_cast<uint32_t>(n)) ? 1 : 0;
}
}
