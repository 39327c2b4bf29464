// Why a compiled bf16 decode step stops short of 1.5x fp32 on an AVX2 CPU without bf16 instructions.
//
//   g++ -O3 -march=native -ffp-contract=off -std=c++20 -DCPU_CAPABILITY_AVX2 \
//       -I"$(.venv/bin/python -c 'import torch.utils.cpp_extension as c; print(c.include_paths()[0])')" \
//       benchmarks/bf16_widening.cpp -o /tmp/bf16_widening && /tmp/bf16_widening
//
// One row times each of gpt2-small's 48 layer weights (12 x QKV, out, up, down; ~170 MB in bf16, so from DRAM), one
// thread, each weight's rows in 4 blocks summed side by side, as the compiled one-row step does
// (DecodeMatmul.blocked_product). Three loops, identical but for how a weight is read:
//   fp32             8 float32 lanes a load;
//   bf16, 16 lanes   the lines inductor generates for the bf16 step: at::vec loads 16 bf16 and widens them to two
//                    float32 vectors, the upper half through a cross-lane extract;
//   bf16, 8 lanes    8 bf16 widened straight from memory (vpmovzxwd + shift), no extract.
// Prints GB/s and each bf16 loop's speed against fp32's (the step's matmul share of the 1.5x target).
// Not a test: the numbers depend on the machine and on what else runs on it.
#include <ATen/cpu/vec/vec.h>
#include <immintrin.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <vector>

using at::vec::Vectorized;
using at::vec::VectorizedN;
constexpr int kBlocks = 4;

static void fp32_rows(const float* x, const float* w, float* y, int rows, int k) {
  const int block = rows / kBlocks;
  for (int r = 0; r < block; r++) {
    Vectorized<float> sum[kBlocks];
    for (auto& s : sum) s = Vectorized<float>(0);
    for (int i = 0; i < k; i += 8) {
      const auto xv = Vectorized<float>::loadu(x + i);
      for (int b = 0; b < kBlocks; b++)
        sum[b] = sum[b] + xv * Vectorized<float>::loadu(w + static_cast<int64_t>(b * block + r) * k + i);
    }
    for (int b = 0; b < kBlocks; b++)
      y[b * block + r] = at::vec::vec_reduce_all<float>([](auto& a, auto& c) { return a + c; }, sum[b]);
  }
}

static void bf16_16_lanes(const at::BFloat16* x, const at::BFloat16* w, float* y, int rows, int k) {
  const int block = rows / kBlocks;
  for (int r = 0; r < block; r++) {
    VectorizedN<float, 2> sum[kBlocks];
    for (auto& s : sum) s = VectorizedN<float, 2>(0);
    for (int i = 0; i < k; i += 16) {
      const auto xv = at::vec::convert<float, 2, at::BFloat16, 1>(
          Vectorized<at::BFloat16>::loadu(x + i, static_cast<int64_t>(16)));
      for (int b = 0; b < kBlocks; b++)
        sum[b] = sum[b] + xv * at::vec::convert<float, 2, at::BFloat16, 1>(Vectorized<at::BFloat16>::loadu(
                                   w + static_cast<int64_t>(b * block + r) * k + i, static_cast<int64_t>(16)));
    }
    for (int b = 0; b < kBlocks; b++)
      y[b * block + r] = at::vec::vec_reduce_all<float, 2>([](auto& a, auto& c) { return a + c; }, sum[b]);
  }
}

static inline __m256 widen8(const at::BFloat16* p) {
  const __m128i bits = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
}

static void bf16_8_lanes(const at::BFloat16* x, const at::BFloat16* w, float* y, int rows, int k) {
  const int block = rows / kBlocks;
  for (int r = 0; r < block; r++) {
    __m256 sum[kBlocks];
    for (auto& s : sum) s = _mm256_setzero_ps();
    for (int i = 0; i < k; i += 8) {
      const __m256 xv = widen8(x + i);
      for (int b = 0; b < kBlocks; b++)
        sum[b] = _mm256_add_ps(sum[b], _mm256_mul_ps(xv, widen8(w + static_cast<int64_t>(b * block + r) * k + i)));
    }
    for (int b = 0; b < kBlocks; b++) y[b * block + r] = at::vec::vec_reduce_all<float>(
        [](auto& a, auto& c) { return a + c; }, Vectorized<float>(sum[b]));
  }
}

template <class Run>
static double best_seconds(Run run) {
  double best = 1e9;
  for (int i = 0; i < 7; i++) {
    const auto start = std::chrono::steady_clock::now();
    run();
    best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
  }
  return best;
}

int main() {
  const int shapes[4][2] = {{2304, 768}, {768, 768}, {3072, 768}, {768, 3072}};
  std::vector<std::vector<float>> w32;
  std::vector<std::vector<at::BFloat16>> w16;
  double elements = 0;
  uint32_t seed = 1;
  for (int layer = 0; layer < 12; layer++)
    for (const auto& shape : shapes) {
      const size_t n = static_cast<size_t>(shape[0]) * shape[1];
      std::vector<float> f(n);
      for (auto& v : f) v = static_cast<float>((seed = seed * 1664525 + 1013904223) >> 8) / (1 << 24) - 0.5f;
      w16.emplace_back(f.begin(), f.end());
      for (size_t j = 0; j < n; j++) f[j] = static_cast<float>(w16.back()[j]);  // the same values in both
      w32.push_back(std::move(f));
      elements += static_cast<double>(n);
    }
  std::vector<float> x32(3072, 0.5f), y(3072);
  std::vector<at::BFloat16> x16(x32.begin(), x32.end());
  auto each = [&](auto product, const auto& x, const auto& ws) {
    return [&, product] {
      for (size_t i = 0; i < ws.size(); i++) product(x.data(), ws[i].data(), y.data(), shapes[i % 4][0], shapes[i % 4][1]);
    };
  };
  for (int round = 0; round < 3; round++) {
    const double t32 = best_seconds(each(fp32_rows, x32, w32));
    const double t16 = best_seconds(each(bf16_16_lanes, x16, w16));
    const double t8 = best_seconds(each(bf16_8_lanes, x16, w16));
    std::printf("48 layer matmuls, 1 thread: fp32 %.2f ms (%.1f GB/s) | bf16, 16 lanes %.2f ms (%.1f GB/s), %.2fx fp32"
                " | bf16, 8 lanes %.2f ms (%.1f GB/s), %.2fx fp32\n",
                t32 * 1e3, elements * 4 / t32 / 1e9, t16 * 1e3, elements * 2 / t16 / 1e9, t32 / t16, t8 * 1e3,
                elements * 2 / t8 / 1e9, t32 / t8);
  }
}
