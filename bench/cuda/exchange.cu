// What one exchange between the decode kernel's phases costs: the question behind a layer of
// two exchanges instead of four.
//
// The kernel (rwkv_jax/ops/cuda/decode4_block.cuh) splits every product by rows, so each of a
// layer's four products ends in an all-gather of flagged words (g, x2, h, x). Splitting the
// output and ffn value products by columns instead would make g and h local to the CTA that
// computed them, and x2 and x sums over every CTA's partial vector: two exchanges a layer,
// each a reduction. A reduction can carry its own flag too: every CTA adds (value in fixed
// point << 8) + 1 to each word with one 64-bit atomic, and a reader polls the words until
// their low 8 bits count every CTA. Integer sums do not depend on the order the adds land in,
// so the result is the same on every run.
//
// Modes, each a chain of rounds (a round waits for the last one's words):
//   ll1   one all-gather of C float32 words (x between layers)
//   ll4   a layer's four all-gathers as the kernel does them: g (C bf16), x2 (C), h (F bf16), x
//   red1  one reduction of C words
//   red2  a layer's two reductions (x2; x with the gates' C float32 words beside it)
// Alone: no weights stream beside them (in the kernel, which streams, each takes ~2x as long).
// Prints "MODE C F us_per_round", or "error ..." (a sum that came out wrong included).
//
//   nvcc -O3 -std=c++17 -gencode=arch=compute_90,code=sm_90 bench/cuda/exchange.cu -o ex && ./ex 768 3072
//
// The answer (H200, 2026-12-01, us a round at C = 768 / 2048 / 2560, F = 4C): ll1 1.64 / 1.63 /
// 1.65, ll4 5.1 / 5.9 / 6.0, red1 4.3 / 5.4 / 6.0, red2 9.4 / 11.7 / 12.2. A reduction costs
// ~3x an all-gather, growing with C: 132 CTAs x C atomics are ~270 K at C = 2048, and L2 takes
// them at ~70 G/s. Two reductions a layer cost more than four all-gathers, so the kernel keeps
// its rows (bench/README.md).
#include <cuda_runtime.h>

#include <cstdio>
#include <cstdlib>

#include "../../rwkv_jax/ops/cuda/decode4_block.cuh"

using namespace rwkv_decode4;

namespace {

constexpr int kCountBits = 8;  // up to 255 CTAs
constexpr float kScale = 16777216.f;  // 2^24: fixed point with 24 fraction bits
__device__ unsigned long long g_acc[3][2][kMaxC];  // [round % 3][x2, x][channel]
__device__ unsigned g_errors;

__device__ __forceinline__ void red64(unsigned long long* p, unsigned long long v) {
  asm volatile("red.relaxed.gpu.global.add.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}

__device__ __forceinline__ unsigned long long fixed(float v) {
  return ((unsigned long long)__float2ll_rn(v * kScale) << kCountBits) + 1ull;
}

// The value CTA `cta` puts in for channel i in round e: exact in fixed point, so that the
// readers can check the sum.
__device__ __forceinline__ float part(int cta, int i, uint32_t e) {
  return (float)((int)((cta * 7 + i * 3 + e) % 13) - 6) * 0.125f;
}

// Every thread's channels i = threadIdx.x + j * T < C, polled in rounds until each word is
// ready(word); returns the sum of value(word) over the CTA.
template <typename Ready, typename Value>
__device__ float poll_all(const unsigned long long* src, int C, Ready ready, Value value,
                          float* red) {
  constexpr int T = kConsumerThreads;
  unsigned long long w[kPer];
  bool late[kPer];
#pragma unroll
  for (int j = 0; j < kPer; ++j) late[j] = threadIdx.x + j * T < C;
  for (int spins = 0;; ++spins) {
#pragma unroll
    for (int j = 0; j < kPer; ++j)
      if (late[j]) w[j] = poll64(src + threadIdx.x + j * T);
    bool any = false;
#pragma unroll
    for (int j = 0; j < kPer; ++j) {
      late[j] = late[j] && !ready(w[j]);
      any |= late[j];
    }
    if (!any) break;
    too_long(spins, "a word");
  }
  float s = 0.f;
#pragma unroll
  for (int j = 0; j < kPer; ++j)
    if (threadIdx.x + j * T < C) s += value(w[j], threadIdx.x + j * T);
  return consumers_sum(s, red);
}

__global__ void __launch_bounds__(kConsumerThreads, 1)
exchange(int mode, int C, int F, int rounds, uint32_t epoch0) {
  extern __shared__ __align__(128) unsigned char smem[];
  bf16* xs = reinterpret_cast<bf16*>(smem);
  __shared__ float red[kConsumers];
  const int G = gridDim.x, cta = blockIdx.x;
  const int c0 = cta * C / G, c1 = (cta + 1) * C / G;
  const int k0 = cta * F / G, k1 = (cta + 1) * F / G;
  const int T = kConsumerThreads;
  float sink = 0.f;
  auto flagged = [](uint32_t e) { return [e](unsigned long long w) { return (uint32_t)w == e; }; };
  auto as_float = [](unsigned long long w, int) { return __uint_as_float((uint32_t)(w >> 32)); };
  auto counted = [G](unsigned long long w) { return (int)(w & ((1u << kCountBits) - 1)) == G; };
  for (int r = 0; r < rounds; ++r) {
    const uint32_t e = epoch0 + r;
    const bool check = r == 0 || r == rounds - 1;
    auto summed = [&](unsigned long long w, int i) {
      const float v = (float)((long long)w >> kCountBits) / kScale;
      if (check) {
        float want = 0.f;
        for (int c = 0; c < G; ++c) want += part(c, i, e);
        if (v != want) atomicAdd(&g_errors, 1u);
      }
      return v;
    };
    if (mode == 0 || mode == 1) {  // ll1, ll4
      if (mode == 1) {
        for (int i = c0 + threadIdx.x; i < c1; i += T) put16(g_ll_g + i, __float2bfloat16(sink + i), e);
        gather16(g_ll_g, xs, C, e);
        consumers_sync();
        sink += __bfloat162float(xs[threadIdx.x]);
        for (int i = c0 + threadIdx.x; i < c1; i += T) put32(g_ll_x2 + i, sink + i, e);
        sink += poll_all(g_ll_x2, C, flagged(e), as_float, red);
        for (int i = k0 + threadIdx.x; i < k1; i += T) put16(g_ll_h + i, __float2bfloat16(sink + i), e);
        consumers_sync();  // every warp is done with xs
        gather16(g_ll_h, xs, F, e);
        consumers_sync();
        sink += __bfloat162float(xs[threadIdx.x]);
      }
      // Alone, x alternates between two arrays: a CTA through round r may rewrite round r's
      // words only once all have read them, which they have once round r + 1's are all in.
      unsigned long long* x = mode == 0 && (r & 1) ? g_ll_x2 : g_ll_x;
      for (int i = c0 + threadIdx.x; i < c1; i += T) put32(x + i, sink + i, e);
      sink += poll_all(x, C, flagged(e), as_float, red);
    } else {  // red1, red2
      unsigned long long* acc = g_acc[r % 3][0];
      for (int i = threadIdx.x; i < C; i += T) red64(acc + i, fixed(part(cta, i, e)));
      sink += poll_all(acc, C, counted, summed, red);
      // The buffer of round r + 2 was last read in round r - 1, which every CTA finished before
      // adding to round r's: zero this CTA's share, visibly before its next adds.
      for (int i = c0 + threadIdx.x; i < c1; i += T) g_acc[(r + 2) % 3][0][i] = g_acc[(r + 2) % 3][1][i] = 0;
      __threadfence();
      if (mode == 3) {
        unsigned long long* acc2 = g_acc[r % 3][1];
        for (int i = c0 + threadIdx.x; i < c1; i += T) put32(g_ll_gate + i, sink + i, e);
        for (int i = threadIdx.x; i < C; i += T) red64(acc2 + i, fixed(part(cta, i, e)));
        sink += poll_all(acc2, C, counted, summed, red);
        sink += poll_all(g_ll_gate, C, flagged(e), as_float, red);
      }
    }
  }
  if (sink == 1234.5f) g_errors += 1000000;  // keeps the sums
}

}  // namespace

int main(int argc, char** argv) {
  const int C = argc > 1 ? atoi(argv[1]) : 768, F = argc > 2 ? atoi(argv[2]) : 4 * C;
  const int rounds = argc > 3 ? atoi(argv[3]) : 2000;
  int sms = 0;
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0);
  // 16 rounds of runs: the bf16 words' 16-bit epochs must not come round in them.
  if (sms >= (1 << kCountBits) || C > kMaxC || F > kMaxF || rounds < 1 || rounds > 4000) {
    printf("error: %d SMs, C %d, F %d, %d rounds out of range\n", sms, C, F, rounds);
    return 1;
  }
  const size_t smem = 2 * (size_t)std::max(C, F);
  cudaFuncSetAttribute(exchange, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
  const char* names[] = {"ll1", "ll4", "red1", "red2"};
  cudaEvent_t e0, e1;
  cudaEventCreate(&e0);
  cudaEventCreate(&e1);
  uint32_t epoch = 1;
  for (int mode = 0; mode < 4; ++mode) {
    float best = 1e30f;
    unsigned errors = 0;
    for (int rep = 0; rep < 4; ++rep) {
      cudaMemcpyToSymbol(g_errors, &errors, 4);
      void* p;
      cudaGetSymbolAddress(&p, g_acc);
      cudaMemset(p, 0, sizeof(unsigned long long) * 3 * 2 * kMaxC);
      int m = mode, c = C, f = F, n = rounds;
      void* args[] = {&m, &c, &f, &n, &epoch};
      cudaEventRecord(e0);
      cudaError_t err =
          cudaLaunchCooperativeKernel((const void*)exchange, sms, kConsumerThreads, args, smem);
      cudaEventRecord(e1);
      if (err == cudaSuccess) err = cudaEventSynchronize(e1);
      if (err == cudaSuccess) err = cudaGetLastError();
      if (err != cudaSuccess) {
        printf("error %s\n", cudaGetErrorString(err));
        return 1;
      }
      epoch += rounds;
      float ms;
      cudaEventElapsedTime(&ms, e0, e1);
      if (rep > 0) best = std::min(best, ms);
      unsigned got;
      cudaMemcpyFromSymbol(&got, g_errors, 4);
      errors = 0;
      if (got) {
        printf("error: %s %d %d, %u sums wrong\n", names[mode], C, F, got);
        return 1;
      }
    }
    printf("%s %d %d %.3f\n", names[mode], C, F, best * 1000.f / rounds);
  }
  return 0;
}
