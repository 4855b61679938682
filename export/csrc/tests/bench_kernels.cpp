// Kernel microbenchmark (no runtime around it): one linear, rotating through enough copies of the
// weights to exceed the last-level cache, per path / format / layout / mode / M / threads.
//
//   paretoq_kernel_bench [--paths avx512,avx2,scalar] [--bits 1,1.58,2,3,4] [--groups 0,32,64,128,256]
//                        [--m 1,8,128] [--modes int8,fp32] [--threads 1,2] [--k 11008] [--n 4096]
//                        [--cache-mb 32] [--ms 300] [--orders rows,b16]
//   paretoq_kernel_bench --decoder 2048,5632,16,256 [--bits ...] [--groups ...] [--modes ...] [--threads ...]
//       the block linears of a decoder (hidden, intermediate, layers, kv width: q, k, v, o, gate, up,
//       down per layer, all distinct weights) called in sequence at M = 1, like one decode step
//       without attention: ms per step and GB/s of all their bytes.
// groups: 0 = one scale per row. Prints one line per cell: median ms per call, GB/s of weights +
// scales, and the plan() string (which kernel ran). orders: rows (packing.py layouts in place) and
// b16 (kBlocked16). Threads: a spinning pool created once per thread count.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <atomic>
#include <thread>
#include <vector>

#include "../paretoq_kernels.h"

using namespace paretoq;

namespace {

// A spinning worker pool (created once; a thread per call would cost more than a small linear).
struct Pool {
  std::vector<std::thread> th;
  std::atomic<int> gen{0}, done{0};
  std::atomic<bool> stop{false};
  RangeFn fn = nullptr;
  void* ctx = nullptr;
  int64_t n = 0;
  int T = 1;
  void start(int threads) {
    finish();
    T = threads;
    stop = false;
    for (int t = 1; t < T; ++t)
      th.emplace_back([this, t] {
        int seen = 0;
        while (true) {
          int g;
          while ((g = gen.load(std::memory_order_acquire)) == seen)
            if (stop.load(std::memory_order_relaxed)) return;
          seen = g;
          fn(ctx, n * t / T, n * (t + 1) / T);
          done.fetch_add(1, std::memory_order_acq_rel);
        }
      });
  }
  void finish() {
    stop = true;
    for (auto& x : th) x.join();
    th.clear();
  }
  ~Pool() { finish(); }
} g_pool;

void threads_pf(int64_t n, RangeFn fn, void* ctx) {
  const int T = g_pool.T;
  if (T <= 1 || n < 2) return fn(ctx, 0, n);
  g_pool.fn = fn;
  g_pool.ctx = ctx;
  g_pool.n = n;
  g_pool.done.store(0, std::memory_order_relaxed);
  g_pool.gen.fetch_add(1, std::memory_order_acq_rel);
  fn(ctx, 0, n / T);
  while (g_pool.done.load(std::memory_order_acquire) < T - 1) {
  }
}

void set_threads(int t) {
  g_pool.start(t);
}

std::vector<std::string> split(const char* s) {
  std::vector<std::string> out;
  std::string cur;
  for (const char* p = s;; ++p) {
    if (*p == ',' || *p == 0) {
      if (!cur.empty()) out.push_back(cur);
      cur.clear();
      if (*p == 0) break;
    } else {
      cur += *p;
    }
  }
  return out;
}

struct Opts {
  std::vector<std::string> paths{"auto"}, modes{"int8", "fp32"};
  std::vector<double> bits{1, 1.58, 2, 3, 4};
  std::vector<int64_t> groups{0, 32, 64, 128, 256}, ms{1, 8, 128};
  std::vector<int> threads{1};
  std::vector<std::string> orders{"rows"};  // rows, b16 (kBlocked16; random bytes, so no repack needed)
  int64_t K = 11008, N = 4096, cache_mb = 32, budget_ms = 300;
  std::vector<int64_t> decoder;  // hidden, intermediate, layers, kv width
};

// One decode step over the block linears of a decoder: median ms per step.
int parse_order(const std::string& s) {
  if (s == "rows") return kRowsOrder;
  if (s == "b16") return kBlocked16;
  std::fprintf(stderr, "unknown order %s (rows, b16)\n", s.c_str());
  std::exit(2);
}

// Bytes of the weight and scale buffers of an [N, K] layer in this order.
void buffer_sizes(const Format& f, int64_t K, int64_t N, int64_t G, int order, int64_t* wbytes, int64_t* sfloats) {
  const int64_t rb = row_bytes_for(f, K);
  if (order == kBlocked16) {
    *wbytes = blocked_rows(N) * blocked_row_bytes(f, rb);
    *sfloats = blocked_rows(N) * G;
  } else {
    *wbytes = N * rb;
    *sfloats = N * G;
  }
}

double decoder_step_ms(const Opts& o, ActMode mode, double bits, int64_t gs, int order, int64_t* total_bytes) {
  Format f;
  format_for_bits(bits, &f);
  const int64_t H = o.decoder[0], I = o.decoder[1], L = o.decoder[2], KV = o.decoder[3];
  const int64_t shapes[7][2] = {{H, H}, {H, KV}, {H, KV}, {H, H}, {H, I}, {H, I}, {I, H}};  // {K, N}
  struct Layer { int64_t K, N, rb, G; std::vector<uint8_t> w; std::vector<float> s; };
  std::vector<Layer> layers;
  std::mt19937 rng(1);
  *total_bytes = 0;
  for (int64_t l = 0; l < L; ++l)
    for (const auto& sh : shapes) {
      Layer y{sh[0], sh[1], row_bytes_for(f, sh[0]), gs ? sh[0] / gs : 1, {}, {}};
      int64_t wb = 0, sf = 0;
      buffer_sizes(f, y.K, y.N, y.G, order, &wb, &sf);
      y.w.resize(wb);
      y.s.assign(sf, 0.01f);
      for (auto& b : y.w) b = static_cast<uint8_t>(rng());
      *total_bytes += y.N * y.rb + y.N * y.G * 4;
      layers.push_back(std::move(y));
    }
  std::vector<float> x(std::max(H, I), 0.5f), out(std::max(H, I));
  auto step = [&] {
    for (auto& y : layers) {
      LinearArgs a{x.data(), 1, y.K, y.N, y.w.data(), y.rb, y.s.data(), y.G, f, out.data(), order};
      linear(a, Path::Auto, mode, threads_pf);
    }
  };
  step();
  std::vector<double> ts;
  for (int i = 0; i < 15; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    step();
    ts.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
  }
  std::sort(ts.begin(), ts.end());
  return ts[ts.size() / 2];
}

Path parse_path(const std::string& s) {
  for (Path p : {Path::Auto, Path::Scalar, Path::AVX2, Path::AVX512, Path::NEON, Path::NEONDOT})
    if (s == path_name(p)) return p;
  std::fprintf(stderr, "unknown path %s\n", s.c_str());
  std::exit(2);
}

double median_ms(const Opts& o, Path path, ActMode mode, double bits, int64_t gs, int64_t M, int order) {
  Format f;
  format_for_bits(bits, &f);
  const int64_t rb = row_bytes_for(f, o.K), G = gs ? o.K / gs : 1;
  int64_t wb = 0, sf = 0;
  buffer_sizes(f, o.K, o.N, G, order, &wb, &sf);
  const int64_t bytes = wb + sf * 4;
  const int copies = static_cast<int>(std::max<int64_t>(2, 3 * (o.cache_mb << 20) / bytes + 1));
  std::mt19937 rng(1);
  std::vector<std::vector<uint8_t>> W(copies, std::vector<uint8_t>(wb));
  std::vector<std::vector<float>> S(copies, std::vector<float>(sf));
  for (auto& w : W) for (auto& b : w) b = static_cast<uint8_t>(rng());
  for (auto& s : S) for (auto& v : s) v = 0.001f * (1 + rng() % 100);
  std::vector<float> x(M * o.K), out(M * o.N);
  for (auto& v : x) v = static_cast<float>(rng() % 2001) / 1000.f - 1.f;
  auto call = [&](int i) {
    LinearArgs a{x.data(), M, o.K, o.N, W[i % copies].data(), rb, S[i % copies].data(), G, f, out.data(), order};
    return linear(a, path, mode, threads_pf);
  };
  for (int i = 0; i < copies; ++i)
    if (const char* e = call(i)) { std::fprintf(stderr, "error: %s\n", e); std::exit(1); }
  std::vector<double> ts;
  double spent = 0;
  for (int i = 0; ts.size() < 5 || (spent < o.budget_ms && ts.size() < 400); ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    call(i);
    const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    ts.push_back(ms);
    spent += ms;
  }
  std::sort(ts.begin(), ts.end());
  return ts[ts.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  Opts o;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string k = argv[i];
    const char* v = argv[i + 1];
    if (k == "--paths") o.paths = split(v);
    else if (k == "--modes") o.modes = split(v);
    else if (k == "--bits") { o.bits.clear(); for (auto& s : split(v)) o.bits.push_back(std::atof(s.c_str())); }
    else if (k == "--groups") { o.groups.clear(); for (auto& s : split(v)) o.groups.push_back(std::atoll(s.c_str())); }
    else if (k == "--m") { o.ms.clear(); for (auto& s : split(v)) o.ms.push_back(std::atoll(s.c_str())); }
    else if (k == "--threads") { o.threads.clear(); for (auto& s : split(v)) o.threads.push_back(std::atoi(s.c_str())); }
    else if (k == "--k") o.K = std::atoll(v);
    else if (k == "--n") o.N = std::atoll(v);
    else if (k == "--cache-mb") o.cache_mb = std::atoll(v);
    else if (k == "--ms") o.budget_ms = std::atoll(v);
    else if (k == "--orders") o.orders = split(v);
    else if (k == "--decoder") { for (auto& x : split(v)) o.decoder.push_back(std::atoll(x.c_str())); }
    else { std::fprintf(stderr, "unknown flag %s\n", k.c_str()); return 2; }
  }
  if (o.decoder.size() == 4) {
    std::printf("decoder block linears: hidden %lld, intermediate %lld, %lld layers, kv %lld, M = 1; path %s\n",
                (long long)o.decoder[0], (long long)o.decoder[1], (long long)o.decoder[2], (long long)o.decoder[3],
                path_name(best_path()));
    std::printf("| bits | layout | order | acts | threads | ms/step | MB | GB/s |\n|---|---|---|---|---|---|---|---|\n");
    for (int th : o.threads) {
      set_threads(th);
      for (double bits : o.bits) for (int64_t gs : o.groups) for (const auto& ms : o.modes) for (const auto& os : o.orders) {
        int64_t bytes = 0;
        const double t = decoder_step_ms(o, ms == "fp32" ? ActMode::Fp32 : ActMode::Int8, bits, gs, parse_order(os), &bytes);
        std::printf("| %g | %s | %s | %s | %d | %.2f | %.1f | %.1f |\n", bits, gs ? ("g" + std::to_string(gs)).c_str() : "row",
                    os.c_str(), ms.c_str(), th, t, bytes / 1e6, bytes / t / 1e6);
        std::fflush(stdout);
      }
    }
    return 0;
  }
  std::printf("K=%lld N=%lld, weights rotated past %lld MB x 3; best path here: %s\n", (long long)o.K,
              (long long)o.N, (long long)o.cache_mb, path_name(best_path()));
  std::printf("| path | bits | layout | order | acts | M | threads | ms | GB/s | plan |\n|---|---|---|---|---|---|---|---|---|---|\n");
  char buf[256];
  for (const auto& ps : o.paths) {
    const Path path = parse_path(ps);
    if (path != Path::Auto && !path_available(path)) { std::printf("| %s | not available on this CPU |\n", ps.c_str()); continue; }
    for (int th : o.threads) {
      set_threads(th);
      for (double bits : o.bits) for (int64_t gs : o.groups) for (const auto& ms : o.modes) for (int64_t M : o.ms)
      for (const auto& os : o.orders) {
        if (gs && o.K % gs) continue;
        const int order = parse_order(os);
        const ActMode mode = ms == "fp32" ? ActMode::Fp32 : ActMode::Int8;
        Format f;
        format_for_bits(bits, &f);
        const int64_t rb = row_bytes_for(f, o.K), G = gs ? o.K / gs : 1;
        const double t = median_ms(o, path, mode, bits, gs, M, order);
        int64_t wb = 0, sf = 0;
        buffer_sizes(f, o.K, o.N, G, order, &wb, &sf);
        LinearArgs a{nullptr, M, o.K, o.N, nullptr, rb, nullptr, G, f, nullptr, order};
        std::printf("| %s | %g | %s | %s | %s | %lld | %d | %.3f | %.1f | %s |\n", path_name(path == Path::Auto ? best_path() : path),
                    bits, gs ? ("g" + std::to_string(gs)).c_str() : "row", os.c_str(), ms.c_str(), (long long)M, th, t,
                    (wb + sf * 4) / t / 1e6, plan(a, path, mode, buf, sizeof(buf)));
        std::fflush(stdout);
      }
    }
  }
  return 0;
}
