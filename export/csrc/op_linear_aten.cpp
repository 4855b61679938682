// Thin ATen registration of the kernel library (paretoq_kernels.h) for PyTorch CPU tensors:
//
//   paretoq_cpu::linear(Tensor input, Tensor packed, Tensor scale, float bits, bool int8_act) -> Tensor
//   paretoq_cpu::plan(Tensor input, Tensor packed, Tensor scale, float bits, bool int8_act) -> str
//   paretoq_cpu::call_count(bool int8_act) -> int        calls served since the library was loaded
//   paretoq_cpu::kernel_path() -> str                     scalar / avx2 / avx512 / neon / neondot
//   paretoq_cpu::stream_read(Tensor buf) -> int           one streaming read of buf (bandwidth figure)
//   paretoq_cpu::parallel_backend() -> str                "openmp" or "serial" (built without OpenMP)
//   paretoq_cpu::last_row_chunks() -> int                 row ranges the last linear's row loop ran as
//
// paretoq_ao's "cpu" backend of paretoq::linear / paretoq::linear_8da calls the first one
// (paretoq_ao/export/cpu_backend.py). Any floating input dtype is computed in float32 (converted
// on the way in and out); rows are split over ATen's intra-op thread pool (torch.set_num_threads).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <string>

#include "paretoq_kernels.h"

namespace {

std::atomic<int64_t> g_calls[2];
std::atomic<int64_t> g_last_chunks{0};

// at::parallel_for is inline: it is parallel only because this file is compiled with OpenMP
// (CMakeLists.txt); parallel_backend() reports which. Each call records how many ranges it ran as.
void pf_aten(int64_t n, paretoq::RangeFn fn, void* ctx) {
  std::atomic<int64_t> chunks{0};
  at::parallel_for(0, n, 1, [&](int64_t b, int64_t e) {
    chunks.fetch_add(1, std::memory_order_relaxed);
    fn(ctx, b, e);
  });
  g_last_chunks.store(chunks.load(), std::memory_order_relaxed);
}

std::string parallel_backend() {
#ifdef INTRA_OP_PARALLEL
  return "openmp";
#else
  return "serial";
#endif
}

int64_t last_row_chunks() { return g_last_chunks.load(); }

struct Prepared {
  at::Tensor x, packed, scale, out;
  paretoq::LinearArgs a;
};

Prepared prepare(const at::Tensor& input, const at::Tensor& packed, const at::Tensor& scale, double bits) {
  paretoq::Format fmt;
  TORCH_CHECK(paretoq::format_for_bits(bits, &fmt), "paretoq_cpu::linear: bits=", bits, " is not one of 1, 1.58, 2, 3, 4");
  TORCH_CHECK(input.device().is_cpu() && packed.device().is_cpu() && scale.device().is_cpu(),
              "paretoq_cpu::linear: CPU tensors only, got input on ", input.device(), ", packed on ", packed.device(),
              ", scale on ", scale.device());
  TORCH_CHECK(input.is_floating_point() && input.dim() >= 1, "paretoq_cpu::linear: input must be a floating tensor with ",
              "at least 1 dim, got ", input.scalar_type(), " of shape ", input.sizes());
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.dim() == 2, "paretoq_cpu::linear: packed must be a 2-D uint8 ",
              "tensor, got ", packed.scalar_type(), " of shape ", packed.sizes());
  TORCH_CHECK(scale.is_floating_point() && scale.dim() == 2, "paretoq_cpu::linear: scale must be a 2-D floating tensor, got ",
              scale.scalar_type(), " of shape ", scale.sizes());
  Prepared p;
  const int64_t K = input.size(-1);
  p.x = input.reshape({-1, K}).to(at::kFloat).contiguous();
  p.packed = packed.contiguous();
  p.scale = scale.to(at::kFloat).contiguous();
  p.a = paretoq::LinearArgs{p.x.data_ptr<float>(), p.x.size(0), K, packed.size(0), p.packed.data_ptr<uint8_t>(),
                            packed.size(1), p.scale.data_ptr<float>(), scale.size(1), fmt, nullptr};
  p.out = at::empty({p.a.M, p.a.N}, p.x.options());
  p.a.out = p.out.data_ptr<float>();
  TORCH_CHECK(scale.size(0) == packed.size(0), "paretoq_cpu::linear: scale of shape ", scale.sizes(),
              " does not fit a packed weight of shape ", packed.sizes());
  if (const char* e = paretoq::check_args(p.a)) TORCH_CHECK(false, "paretoq_cpu::linear: ", e);
  return p;
}

at::Tensor linear(const at::Tensor& input, const at::Tensor& packed, const at::Tensor& scale, double bits, bool int8_act) {
  Prepared p = prepare(input, packed, scale, bits);
  const paretoq::ActMode mode = int8_act ? paretoq::ActMode::Int8 : paretoq::ActMode::Fp32;
  if (const char* e = paretoq::linear(p.a, paretoq::Path::Auto, mode, pf_aten)) TORCH_CHECK(false, "paretoq_cpu::linear: ", e);
  g_calls[int8_act ? 1 : 0].fetch_add(1, std::memory_order_relaxed);
  std::vector<int64_t> sizes(input.sizes().begin(), input.sizes().end());
  sizes.back() = p.a.N;
  return p.out.view(sizes).to(input.scalar_type());
}

std::string plan(const at::Tensor& input, const at::Tensor& packed, const at::Tensor& scale, double bits, bool int8_act) {
  Prepared p = prepare(input, packed, scale, bits);
  char buf[256];
  return paretoq::plan(p.a, paretoq::Path::Auto, int8_act ? paretoq::ActMode::Int8 : paretoq::ActMode::Fp32, buf, sizeof(buf));
}

int64_t call_count(bool int8_act) { return g_calls[int8_act ? 1 : 0].load(); }

std::string kernel_path() { return paretoq::path_name(paretoq::best_path()); }

// Reads every byte of buf once, split over the intra-op threads (a checksum keeps the read).
int64_t stream_read(const at::Tensor& buf) {
  TORCH_CHECK(buf.device().is_cpu() && buf.is_contiguous(), "paretoq_cpu::stream_read: a contiguous CPU tensor");
  const auto* p = static_cast<const uint8_t*>(buf.data_ptr());
  const int64_t n = buf.numel() * static_cast<int64_t>(buf.element_size());
  const int64_t chunk = int64_t(1) << 20;
  std::atomic<uint64_t> sum{0};
  at::parallel_for(0, (n + chunk - 1) / chunk, 1, [&](int64_t b, int64_t e) {
    const int64_t lo = b * chunk, hi = std::min(n, e * chunk);
    sum.fetch_add(paretoq::stream_read(p + lo, static_cast<size_t>(hi - lo)));
  });
  return static_cast<int64_t>(sum.load());
}

}  // namespace

TORCH_LIBRARY(paretoq_cpu, m) {
  m.def("linear(Tensor input, Tensor packed, Tensor scale, float bits, bool int8_act) -> Tensor");
  m.def("plan(Tensor input, Tensor packed, Tensor scale, float bits, bool int8_act) -> str", &plan);
  m.def("call_count(bool int8_act) -> int", &call_count);
  m.def("kernel_path() -> str", &kernel_path);
  m.def("stream_read(Tensor buf) -> int", &stream_read);
  m.def("parallel_backend() -> str", &parallel_backend);
  m.def("last_row_chunks() -> int", &last_row_chunks);
}

TORCH_LIBRARY_IMPL(paretoq_cpu, CPU, m) { m.impl("linear", &linear); }
