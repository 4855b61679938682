// Thin ExecuTorch registration of paretoq::linear.out on top of the kernel library.
//
// paretoq::linear.out(Tensor input, Tensor packed, Tensor scale, float bits, *, Tensor(a!) out)
//   input [..., K] float32, packed uint8 [N, ceil(K*code_bits/8)] (paretoq-rowbits-v1),
//   scale float32 [N, G] (G divides K), out float32 [..., N] (resized: dynamic batch/sequence).
// Output rows (N) are split over ExecuTorch's thread pool (executorch::extension::parallel_for).
#include <executorch/extension/kernel_util/make_boxed_from_unboxed_functor.h>
#include <executorch/runtime/kernel/kernel_includes.h>
#include <executorch/runtime/kernel/thread_parallel_interface.h>

#include <array>
#include <cstdlib>
#include <cstring>

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

void pf_executorch(int64_t n, paretoq::RangeFn fn, void* ctx) {
  // Grain: at least 16 rows per task (parallel_for splits the range evenly over the threads).
  executorch::extension::parallel_for(0, n, 16, [&](int64_t b, int64_t e) { fn(ctx, b, e); });
}

const char* dtype_name(ScalarType t) { return executorch::runtime::toString(t); }

Tensor& linear_out(KernelRuntimeContext& ctx, const Tensor& input, const Tensor& packed,
                   const Tensor& scale, double bits, Tensor& out) {
  paretoq::Format fmt;
  ET_KERNEL_CHECK_MSG(ctx, paretoq::format_for_bits(bits, &fmt), InvalidArgument, out,
                      "paretoq::linear.out: bits=%f is not one of 1, 1.58, 2, 3, 4", bits);
  ET_KERNEL_CHECK_MSG(ctx, input.scalar_type() == ScalarType::Float, InvalidArgument, out,
                      "paretoq::linear.out: input must be float32, got %s",
                      dtype_name(input.scalar_type()));
  ET_KERNEL_CHECK_MSG(ctx, scale.scalar_type() == ScalarType::Float, InvalidArgument, out,
                      "paretoq::linear.out: scale must be float32, got %s",
                      dtype_name(scale.scalar_type()));
  ET_KERNEL_CHECK_MSG(ctx, out.scalar_type() == ScalarType::Float, InvalidArgument, out,
                      "paretoq::linear.out: out must be float32, got %s",
                      dtype_name(out.scalar_type()));
  ET_KERNEL_CHECK_MSG(ctx, packed.scalar_type() == ScalarType::Byte && packed.dim() == 2,
                      InvalidArgument, out,
                      "paretoq::linear.out: packed must be a 2-D uint8 tensor, got %s with %d dims",
                      dtype_name(packed.scalar_type()), static_cast<int>(packed.dim()));
  ET_KERNEL_CHECK_MSG(ctx, input.dim() >= 1, InvalidArgument, out,
                      "paretoq::linear.out: input must have at least 1 dim, got %d",
                      static_cast<int>(input.dim()));
  const int64_t K = input.size(input.dim() - 1);
  const int64_t N = packed.size(0);
  const int64_t row_bytes = packed.size(1);
  ET_KERNEL_CHECK_MSG(ctx, row_bytes == (K * fmt.code_bits + 7) / 8, InvalidArgument, out,
                      "paretoq::linear.out: input has K=%lld but packed [%lld, %lld] at %d-bit codes "
                      "needs %lld bytes per row",
                      (long long)K, (long long)N, (long long)row_bytes, fmt.code_bits,
                      (long long)((K * fmt.code_bits + 7) / 8));
  ET_KERNEL_CHECK_MSG(ctx, scale.dim() == 2 && scale.size(0) == N && scale.size(1) > 0 &&
                               K % scale.size(1) == 0,
                      InvalidArgument, out,
                      "paretoq::linear.out: scale must be [N=%lld, G] with G dividing K=%lld, got "
                      "%d dims [%lld, %lld]",
                      (long long)N, (long long)K, static_cast<int>(scale.dim()),
                      (long long)(scale.dim() > 0 ? scale.size(0) : -1),
                      (long long)(scale.dim() > 1 ? scale.size(1) : -1));
  std::array<SizesType, executorch::runtime::kTensorDimensionLimit> sizes{};
  for (ssize_t i = 0; i + 1 < input.dim(); ++i) sizes[i] = input.size(i);
  sizes[input.dim() - 1] = static_cast<SizesType>(N);
  ET_KERNEL_CHECK_MSG(ctx,
                      executorch::runtime::resize_tensor(
                          out, {sizes.data(), static_cast<size_t>(input.dim())}) ==
                          executorch::runtime::Error::Ok,
                      InvalidArgument, out,
                      "paretoq::linear.out: could not resize out (%d dims) to input dims with "
                      "last dim N=%lld",
                      static_cast<int>(out.dim()), (long long)N);
  const int64_t M = K > 0 ? input.numel() / K : 0;
  paretoq::LinearArgs a{input.const_data_ptr<float>(), M, K, N,
                        packed.const_data_ptr<uint8_t>(), row_bytes,
                        scale.const_data_ptr<float>(), scale.size(1), fmt,
                        out.mutable_data_ptr<float>()};
  const char* err = paretoq::linear(a, paretoq::Path::Auto, paretoq::activation_mode(), pf_executorch);
  ET_KERNEL_CHECK_MSG(ctx, err == nullptr, InvalidArgument, out, "paretoq::linear.out: %s",
                      err ? err : "");
  return out;
}

}  // namespace

EXECUTORCH_LIBRARY(paretoq, "linear.out", linear_out);

// Small C API for Python (ctypes) and benchmarks.
extern "C" {
__attribute__((visibility("default"))) const char* paretoq_build_id() { return PARETOQ_BUILD_ID; }
__attribute__((visibility("default"))) const char* paretoq_kernel_path() {
  return paretoq::path_name(paretoq::best_path());
}
__attribute__((visibility("default"))) void paretoq_set_activation_mode(int mode) {
  paretoq::set_activation_mode(mode == 1 ? paretoq::ActMode::Fp32 : paretoq::ActMode::Int8);
}
__attribute__((visibility("default"))) int paretoq_activation_mode() {
  return static_cast<int>(paretoq::activation_mode());
}
// Resets ExecuTorch's shared thread pool (also used by XNNPACK) to n threads.
__attribute__((visibility("default"))) int paretoq_set_num_threads(int n) {
  auto* tp = executorch::extension::threadpool::get_threadpool();
  return tp && tp->_unsafe_reset_threadpool(static_cast<uint32_t>(n)) ? 1 : 0;
}
}
