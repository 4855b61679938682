// C++ unit test: every compiled + supported SIMD path against the scalar reference, bit-exact in
// both activation modes, for every format, per-row and group scales, M bands 1 / 2..16 / > 16 and
// odd shapes (N = 1, K not a multiple of the SIMD width, partial row tiles, tails); NaN/Inf
// tokens; the plan() of aligned group layouts must be a SIMD path; int8-vs-fp32 error.
// Prints "PASS ..." / "FAIL ..." lines; exit code 0 on success.
#include <cmath>
#include <cstdio>
#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "../paretoq_kernels.h"

using namespace paretoq;

static void uneven_pf(int64_t n, RangeFn fn, void* ctx) {
  // Uneven split into three ranges: exercises range boundaries like a thread pool would.
  const int64_t a = n / 3, b = (2 * n) / 3;
  fn(ctx, 0, a);
  fn(ctx, a, b);
  fn(ctx, b, n);
}

struct Shape { int64_t M, K, N, G; };

struct Case {
  Format f;
  double bits;
  Shape s;
  int64_t rb;
  std::vector<uint8_t> w, wb;  // wb, sb: the same weights in kBlocked16 order
  std::vector<float> x, sc, sb;
};

// kBlocked16 order, straight from its definition (paretoq_kernels.h): zero padding, byte b of row n
// at [n / 16][b / 4][4 * (n % 16) + b % 4] of [Np / 16][Rp / 4][64], scale (n, g) at [n / 16][g][n % 16].
static void make_blocked(Case& c) {
  const int64_t Np = blocked_rows(c.s.N), Rp = blocked_row_bytes(c.f, c.rb), G = c.s.G;
  c.wb.assign(static_cast<size_t>(Np * Rp), 0);
  c.sb.assign(static_cast<size_t>(Np * G), 0.f);
  for (int64_t n = 0; n < c.s.N; ++n) {
    for (int64_t b = 0; b < c.rb; ++b) c.wb[((n / 16) * (Rp / 4) + b / 4) * 64 + 4 * (n % 16) + b % 4] = c.w[n * c.rb + b];
    for (int64_t g = 0; g < G; ++g) c.sb[((n / 16) * G + g) * 16 + n % 16] = c.sc[n * G + g];
  }
}

// codes: -1 for random codes, else every code = codes (e.g. the largest, n_codes - 1).
static Case make_case(std::mt19937& rng, double bits, const Shape& s, int codes = -1) {
  Case c;
  format_for_bits(bits, &c.f);
  c.bits = bits;
  c.s = s;
  c.rb = row_bytes_for(c.f, s.K);
  c.w.assign(static_cast<size_t>(s.N * c.rb), 0);
  if (c.f.storage == kTrits5) {  // packing.py trits5: code 20w + nb*i + j = trit i of byte 4w + j
    std::vector<int> v(static_cast<size_t>(s.N * c.rb), 0);
    const int pow3[5] = {81, 27, 9, 3, 1};
    for (int64_t n = 0; n < s.N; ++n)
      for (int64_t k = 0; k < s.K; ++k) {
        const int64_t w = k / 20, o = k % 20, nb = std::min<int64_t>(4, c.rb - 4 * w);
        v[n * c.rb + 4 * w + o % nb] += (codes < 0 ? static_cast<int>(rng() % 3) : codes) * pow3[o / nb];
      }
    for (size_t i = 0; i < v.size(); ++i) c.w[i] = static_cast<uint8_t>((256 * v[i] + 242) / 243);
  } else
  for (int64_t n = 0; n < s.N; ++n)
    for (int64_t k = 0; k < s.K; ++k) {
      const unsigned code = codes < 0 ? static_cast<unsigned>(rng() % c.f.n_codes) : static_cast<unsigned>(codes);
      const int64_t bit = k * c.f.code_bits;
      const unsigned v = code << (bit & 7);
      c.w[n * c.rb + bit / 8] |= v & 0xFF;
      if ((bit & 7) + c.f.code_bits > 8) c.w[n * c.rb + bit / 8 + 1] |= v >> 8;
    }
  std::normal_distribution<float> nd(0.f, 1.f);
  c.x.resize(static_cast<size_t>(s.M * s.K));
  c.sc.resize(static_cast<size_t>(s.N * s.G));
  for (auto& v : c.x) v = nd(rng);
  for (auto& v : c.sc) v = 0.01f + std::fabs(nd(rng)) * 0.1f;
  c.sc[0] = 0.f;  // clamped to eps
  make_blocked(c);
  return c;
}

static std::vector<float> run(const Case& c, Path p, ActMode mode, bool b16 = false) {
  std::vector<float> out(static_cast<size_t>(c.s.M * c.s.N), -1.f);
  LinearArgs a{c.x.data(), c.s.M, c.s.K, c.s.N, c.w.data(), c.rb, c.sc.data(), c.s.G, c.f, out.data()};
  if (b16) {
    a.w = c.wb.data();
    a.scale = c.sb.data();
    a.order = kBlocked16;
  }
  if (const char* e = linear(a, p, mode, uneven_pf)) {
    std::printf("FAIL error from path %s: %s\n", path_name(p), e);
    out.clear();
  }
  return out;
}

static bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

static bool simd_aligned(const Case& c) {
  if (c.s.G == 1) return true;
  const int64_t gs = c.s.K / c.s.G;
  if (c.f.storage == kTrits5) return gs % 4 == 0 && gs >= c.s.K % 20;
  return c.f.code_bits == 3 ? gs % 4 == 0 : (gs * c.f.code_bits) % 32 == 0;
}

int main() {
  std::mt19937 rng(1234);
  const double bits_list[] = {1, 1.58, 2, 3, 4};
  const Shape shapes[] = {
      {1, 1, 1, 1},     {1, 37, 5, 1},     {3, 129, 7, 1},    {1, 1000, 9, 1},   {5, 2048, 3, 1},
      {2, 512, 17, 8},  {4, 384, 4, 3},    {7, 96, 2, 3},     {1, 4104, 6, 1},   {9, 130, 1, 2},
      {2, 520, 5, 65},  {1, 192, 8, 6},    {1, 2048, 67, 1},  {8, 1024, 21, 2},  {3, 4096, 14, 4},
      {6, 1536, 19, 1}, {1, 3072, 14, 3},  {1, 512, 33, 16},  {1, 768, 40, 24},  {1, 1024, 70, 4},
      {1, 2048, 16, 64}, {2, 1024, 35, 32}, {5, 1024, 18, 8}, {17, 256, 23, 8},  {70, 384, 37, 12},
      {1, 96, 130, 3},  {4, 64, 65, 2},    {1, 48, 16, 3},    {2, 80, 9, 5},     {33, 64, 17, 1},
      // trits5 tails (K % 20) and group ends between planes / inside a short last word
      {2, 88, 9, 11},   {1, 72, 5, 9},     {3, 120, 17, 10},  {1, 4100, 33, 1},  {2, 4, 3, 1},
      {1, 9, 17, 1},    {1, 640, 20, 10},  {1, 11008, 16, 172}, {5, 68, 18, 17}, {1, 76, 16, 19},
      {1, 1280, 17, 10}, {1, 1408, 9, 11}, {1, 2560, 5, 40}, {1, 660, 7, 5},
      // the same at M > 4 (int8 trits staged once per row block, every token tile reads them back)
      {6, 88, 9, 11},   {9, 4100, 33, 1},  {12, 120, 17, 10}, {7, 660, 7, 5},  {10, 640, 20, 10},
      {6, 1280, 17, 10}, {5, 68, 18, 17}, {19, 76, 16, 19}, {11, 9, 3, 1}};
  // PARETOQ_TEST_PATHS="neon neondot" limits the run to those paths (the qemu test runs one per
  // emulated CPU, side by side); unset: every available path.
  const char* only = std::getenv("PARETOQ_TEST_PATHS");
  std::vector<Path> paths;
  for (Path p : {Path::AVX2, Path::AVX512, Path::NEON, Path::NEONDOT}) {
    const std::string name = std::string(" ") + path_name(p) + " ";
    if (path_available(p) && (!only || (" " + std::string(only) + " ").find(name) != std::string::npos))
      paths.push_back(p);
  }
  std::printf("best path: %s; testing", path_name(best_path()));
  for (Path p : paths) std::printf(" %s", path_name(p));
  std::printf("\n");
  int fails = 0, checks = 0;
  double worst_rel = 0;
  char buf[256];
  for (double bits : bits_list) {
    for (const Shape& s : shapes) {
      Case c = make_case(rng, bits, s);
      const std::vector<float> ref8 = run(c, Path::Scalar, ActMode::Int8);
      const std::vector<float> ref32 = run(c, Path::Scalar, ActMode::Fp32);
      if (ref8.empty() || ref32.empty()) return 1;
      double num = 0, den = 0;
      for (size_t i = 0; i < ref8.size(); ++i) {
        num += (ref8[i] - ref32[i]) * (ref8[i] - ref32[i]);
        den += ref32[i] * ref32[i];
      }
      if (den > 0 && s.K >= 32) worst_rel = std::max(worst_rel, std::sqrt(num / den));
      std::vector<Path> with_scalar = paths;
      with_scalar.push_back(Path::Scalar);
      for (Path p : with_scalar) {
        for (ActMode mode : {ActMode::Int8, ActMode::Fp32}) {
          ++checks;
          const std::vector<float>& ref = mode == ActMode::Int8 ? ref8 : ref32;
          const std::vector<float> gotb = run(c, p, mode, true);  // kBlocked16: the same bits
          if (!same_bits(ref, gotb)) {
            ++fails;
            std::printf("FAIL blocked16 path=%s mode=%s bits=%g M=%lld K=%lld N=%lld G=%lld\n", path_name(p),
                        mode == ActMode::Int8 ? "int8" : "fp32", bits, (long long)s.M, (long long)s.K,
                        (long long)s.N, (long long)s.G);
          }
          if (p == Path::Scalar) continue;
          const std::vector<float> got = run(c, p, mode);
          LinearArgs a{c.x.data(), s.M, s.K, s.N, c.w.data(), c.rb, c.sc.data(), s.G, c.f, nullptr};
          plan(a, p, mode, buf, sizeof(buf));
          const bool is_scalar = std::strncmp(buf, "scalar", 6) == 0;
          if (simd_aligned(c) == is_scalar) {
            ++fails;
            std::printf("FAIL plan for bits=%g K=%lld G=%lld: %s\n", bits, (long long)s.K, (long long)s.G, buf);
          }
          if (!same_bits(ref, got)) {
            ++fails;
            size_t i = 0;
            while (i < ref.size() && std::memcmp(&ref[i], &got[i], sizeof(float)) == 0) ++i;
            std::printf("FAIL path=%s mode=%s bits=%g M=%lld K=%lld N=%lld G=%lld first diff at %zu: ref=%.9g got=%.9g\n",
                        path_name(p), mode == ActMode::Int8 ? "int8" : "fp32", bits, (long long)s.M,
                        (long long)s.K, (long long)s.N, (long long)s.G, i, i < ref.size() ? ref[i] : 0.f,
                        i < got.size() ? got[i] : 0.f);
          }
        }
      }
    }
  }
  // The largest sums the int8 mode can meet: every code at its maximum and every activation at
  // +-127 (a constant token), over long rows, per row and in groups, decode and token tiles. A path
  // that keeps partial sums in narrower lanes (AVX2's int16 pairs) must spill them in time.
  for (double bits : bits_list) {
    Format f;
    format_for_bits(bits, &f);
    for (const Shape& s : {Shape{1, 4096, 16, 1}, Shape{3, 4100, 9, 1}, Shape{6, 4096, 17, 32}, Shape{1, 11008, 8, 86},
                           Shape{2, 2560, 16, 20}}) {
      for (float sign : {1.f, -1.f}) {
        Case c = make_case(rng, bits, s, f.n_codes - 1);
        for (int64_t m = 0; m < s.M; ++m)
          for (int64_t k = 0; k < s.K; ++k) c.x[m * s.K + k] = (m % 2 ? -sign : sign) * 0.5f;
        const std::vector<float> ref = run(c, Path::Scalar, ActMode::Int8);
        for (Path p : paths)
          for (bool b16 : {false, true}) {
            ++checks;
            if (!same_bits(ref, run(c, p, ActMode::Int8, b16))) {
              ++fails;
              std::printf("FAIL extreme sums path=%s bits=%g M=%lld K=%lld G=%lld sign=%g%s\n", path_name(p), bits,
                          (long long)s.M, (long long)s.K, (long long)s.G, sign, b16 ? " blocked16" : "");
            }
          }
      }
    }
  }
  // NaN / Inf tokens: int8 mode computes them with float activations (propagating like eager).
  for (double bits : bits_list) {
    Case c = make_case(rng, bits, Shape{3, 256, 20, 4});
    c.x[0 * 256 + 7] = std::numeric_limits<float>::quiet_NaN();
    c.x[2 * 256 + 9] = std::numeric_limits<float>::infinity();
    std::vector<Path> all = paths;
    all.push_back(Path::Scalar);
    for (Path p : all) {
      ++checks;
      const std::vector<float> i8 = run(c, p, ActMode::Int8), f32 = run(c, p, ActMode::Fp32);
      bool ok = i8.size() == f32.size();
      for (int64_t n = 0; ok && n < 20; ++n) {
        ok = std::isnan(i8[n]) && std::memcmp(&i8[2 * 20 + n], &f32[2 * 20 + n], 4) == 0 &&
             !std::isnan(i8[20 + n]) && std::isfinite(i8[20 + n]);
      }
      if (!ok) {
        ++fails;
        std::printf("FAIL non-finite tokens path=%s bits=%g\n", path_name(p), bits);
      }
    }
  }
  // Bad arguments: messages name the dims.
  {
    Case c = make_case(rng, 2, Shape{1, 64, 4, 1});
    std::vector<float> out(4);
    LinearArgs a{c.x.data(), 1, 64, 4, c.w.data(), c.rb + 1, c.sc.data(), 1, c.f, out.data()};
    const char* e = linear(a, Path::Auto, ActMode::Int8, nullptr);
    ++checks;
    if (!e || !std::strstr(e, "K=64")) { ++fails; std::printf("FAIL bad row_bytes message: %s\n", e ? e : "(none)"); }
    a.row_bytes = c.rb;
    a.G = 3;
    e = linear(a, Path::Auto, ActMode::Int8, nullptr);
    ++checks;
    if (!e || !std::strstr(e, "G=3")) { ++fails; std::printf("FAIL bad G message: %s\n", e ? e : "(none)"); }
  }
  // A ternary weight in 2-bit fields (paretoq-rowbits-v1) is refused, naming the old layout.
  {
    Case c = make_case(rng, 1.58, Shape{1, 64, 4, 1});
    std::vector<float> out(4);
    LinearArgs a{c.x.data(), 1, 64, 4, c.w.data(), 16, c.sc.data(), 1, c.f, out.data()};
    const char* e = linear(a, Path::Auto, ActMode::Fp32, nullptr);
    ++checks;
    if (!e || !std::strstr(e, "rowbits-v1")) { ++fails; std::printf("FAIL legacy ternary message: %s\n", e ? e : "(none)"); }
  }
  // stream_read (the bandwidth figure): every byte read once; the checksum is the same on every path.
  {
    std::vector<uint8_t> bytes(70000);
    for (auto& b : bytes) b = static_cast<uint8_t>(rng());
    for (size_t n : {size_t(0), size_t(1), size_t(63), size_t(64), size_t(200), size_t(4099), bytes.size()}) {
      uint64_t want = 0;
      size_t i = 0;
      for (; i < n / 64 * 64; i += 8) {  // whole 64-byte blocks as 64-bit words, then single bytes
        uint64_t v;
        std::memcpy(&v, bytes.data() + i, 8);
        want += v;
      }
      for (; i < n; ++i) want += bytes[i];
      ++checks;
      if (stream_read(bytes.data(), n) != want) { ++fails; std::printf("FAIL stream_read n=%zu\n", n); }
    }
  }
  std::printf("int8-vs-fp32 worst relative L2 error (K>=32): %.4g\n", worst_rel);
  if (worst_rel > 0.05) {
    std::printf("FAIL int8 activation error too large\n");
    ++fails;
  }
  std::printf("%s %d checks, %d failures\n", fails ? "FAIL" : "PASS", checks, fails);
  return fails ? 1 : 0;
}
