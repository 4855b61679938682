// C++ unit test: every compiled + supported SIMD path vs the scalar reference (bit-exact in the
// int8 mode), and the int8 path vs the fp32 path (loose), on odd shapes, every bit width.
// Prints "PASS n" / "FAIL ..." lines; exit code 0 on success.
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "../paretoq_kernels.h"

using namespace paretoq;

static void serial_pf(int64_t n, RangeFn fn, void* ctx) {
  // Uneven split into three ranges: exercises range boundaries like a thread pool would.
  const int64_t a = n / 3, b = (2 * n) / 3;
  fn(ctx, 0, a); fn(ctx, a, b); fn(ctx, b, n);
}

int main(int argc, char** argv) {
  std::mt19937 rng(1234);
  const double bits_list[] = {1, 1.58, 2, 3, 4};
  struct Shape { int64_t M, K, N, G; };
  const Shape shapes[] = {{1, 1, 1, 1},     {1, 37, 5, 1},     {3, 129, 7, 1},   {1, 1000, 9, 1},
                          {5, 2048, 3, 1},  {2, 512, 17, 8},   {4, 384, 4, 3},   {7, 96, 2, 3},
                          {1, 4104, 6, 1},  {9, 130, 1, 2},    {2, 520, 5, 65},  {1, 192, 8, 6},
                          // multi-row blocks (4 / 2 rows) + full SIMD chunks + tail rows
                          {1, 2048, 13, 1}, {8, 1024, 21, 2},  {3, 4096, 14, 4}, {6, 1536, 19, 1},
                          {1, 3072, 14, 3}};
  std::vector<Path> paths;
  for (Path p : {Path::AVX2, Path::AVX512, Path::NEON})
    if (path_available(p)) paths.push_back(p);
  std::printf("best path: %s; testing", path_name(best_path()));
  for (Path p : paths) std::printf(" %s", path_name(p));
  std::printf("\n");
  int fails = 0, checks = 0;
  double worst_rel = 0;
  for (double bits : bits_list) {
    Format f;
    format_for_bits(bits, &f);
    for (const Shape& s : shapes) {
      const int64_t rb = (s.K * f.code_bits + 7) / 8;
      std::vector<uint8_t> w(s.N * rb);
      const int ncodes = (bits == 1.58) ? 3 : (1 << f.code_bits);
      std::vector<int> codes(s.N * s.K);
      for (auto& c : codes) c = static_cast<int>(rng() % ncodes);
      std::fill(w.begin(), w.end(), 0);
      for (int64_t n = 0; n < s.N; ++n)
        for (int64_t k = 0; k < s.K; ++k) {
          const int64_t bit = k * f.code_bits;
          const unsigned v = static_cast<unsigned>(codes[n * s.K + k]) << (bit & 7);
          w[n * rb + bit / 8] |= v & 0xFF;
          if ((bit & 7) + f.code_bits > 8) w[n * rb + bit / 8 + 1] |= v >> 8;
        }
      std::normal_distribution<float> nd(0.f, 1.f);
      std::vector<float> x(s.M * s.K), sc(s.N * s.G);
      for (auto& v : x) v = nd(rng);
      for (auto& v : sc) v = 0.01f + std::fabs(nd(rng)) * 0.1f;
      sc[0] = 0.f;  // clamped to 1e-5
      std::vector<float> ref(s.M * s.N), got(s.M * s.N), fp(s.M * s.N);
      LinearArgs a{x.data(), s.M, s.K, s.N, w.data(), rb, sc.data(), s.G, f, ref.data()};
      if (const char* e = linear(a, Path::Scalar, ActMode::Int8, nullptr)) {
        std::printf("FAIL error %s\n", e); return 1;
      }
      a.out = fp.data();
      linear(a, Path::Scalar, ActMode::Fp32, serial_pf);
      // int8 vs fp32: relative error of the whole output
      double num = 0, den = 0;
      for (size_t i = 0; i < ref.size(); ++i) {
        num += (ref[i] - fp[i]) * (ref[i] - fp[i]);
        den += fp[i] * fp[i];
      }
      if (den > 0 && s.K >= 32) worst_rel = std::max(worst_rel, std::sqrt(num / den));
      for (Path p : paths) {
        a.out = got.data();
        std::fill(got.begin(), got.end(), -1.f);
        linear(a, p, ActMode::Int8, serial_pf);
        ++checks;
        if (std::memcmp(ref.data(), got.data(), ref.size() * sizeof(float)) != 0) {
          ++fails;
          std::printf("FAIL path=%s bits=%g M=%lld K=%lld N=%lld G=%lld ref[0]=%g got[0]=%g\n",
                      path_name(p), bits, (long long)s.M, (long long)s.K, (long long)s.N,
                      (long long)s.G, ref[0], got[0]);
        }
      }
    }
  }
  std::printf("int8-vs-fp32 worst relative L2 error (K>=32): %.4g\n", worst_rel);
  if (worst_rel > 0.05) { std::printf("FAIL int8 activation error too large\n"); ++fails; }
  std::printf("%s %d checks, %d failures\n", fails ? "FAIL" : "PASS", checks, fails);
  return fails ? 1 : 0;
}
