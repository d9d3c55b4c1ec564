// How fast can one CTA per SM stream 1 GiB of global memory, the way decode_block.cu does:
// the bulk copy engine into a ring of D shared-memory stages of S bytes (one producer thread,
// eight warps that only wait for a stage and release it), against plain 16-byte loads.
// bench/decode_block_cuda.py builds and runs it. Prints "tma S D GB/s" and "ld THREADS GB/s"
// lines, or "error ...".
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>

#include "../../rwkv_jax/ops/cuda/bulk_copy.cuh"

namespace {

constexpr int kConsumers = 8;

__global__ void tma_stream(const char* src, size_t per_cta, int S, int D, float* sink) {
  extern __shared__ __align__(128) unsigned char smem[];
  uint64_t* full = reinterpret_cast<uint64_t*>(smem + (size_t)D * S);
  uint64_t* empty = full + D;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  if (threadIdx.x == 0) {
    for (int i = 0; i < D; ++i) {
      mbar_init(&full[i], 1);
      mbar_init(&empty[i], 1);
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();
  const char* base = src + blockIdx.x * per_cta;
  const int stages = (int)(per_cta / S);
  if (warp == kConsumers) {
    if (lane == 0) {
      for (int s = 0; s < stages; ++s) {
        const int slot = s % D, use = s / D;
        if (use > 0) mbar_wait(&empty[slot], (use - 1) & 1);
        mbar_expect_tx(&full[slot], S);
        bulk_load(smem + (size_t)slot * S, base + (size_t)s * S, S, &full[slot]);
      }
    }
    return;
  }
  float acc = 0.f;
  for (int s = 0; s < stages; ++s) {
    const int slot = s % D;
    if (slot % kConsumers != warp) continue;
    mbar_wait(&full[slot], (s / D) & 1);
    acc += reinterpret_cast<const float*>(smem + (size_t)slot * S)[lane];
    __syncwarp();
    if (lane == 0) mbar_arrive(&empty[slot]);
  }
  if (acc == 1234.5f) *sink = acc;  // keeps the reads
}

__global__ void ld_stream(const uint4* src, size_t per_cta, float* sink) {
  const uint4* base = src + blockIdx.x * per_cta;
  float acc = 0.f;
  for (size_t i = threadIdx.x; i < per_cta; i += (size_t)blockDim.x * 8) {
    uint4 v[8];
#pragma unroll
    for (int u = 0; u < 8; ++u) {
      const size_t j = i + (size_t)u * blockDim.x;
      v[u] = j < per_cta ? __ldcs(base + j) : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int u = 0; u < 8; ++u) acc += __uint_as_float(v[u].x);
  }
  if (acc == 1234.5f) *sink = acc;
}

}  // namespace

int main() {
  int sms = 0;
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0);
  const size_t total = 1ull << 30;
  char* buf;
  float* sink;
  cudaMalloc(&buf, total);
  cudaMalloc(&sink, 4);
  cudaMemset(buf, 1, total);
  cudaEvent_t e0, e1;
  cudaEventCreate(&e0);
  cudaEventCreate(&e1);
  auto best_ms = [&](auto launch) {
    launch();
    cudaDeviceSynchronize();
    float best = 1e30f;
    for (int r = 0; r < 5; ++r) {
      cudaEventRecord(e0);
      launch();
      cudaEventRecord(e1);
      cudaEventSynchronize(e1);
      float ms;
      cudaEventElapsedTime(&ms, e0, e1);
      best = std::min(best, ms);
    }
    return best;
  };
  auto check = [] {
    cudaError_t err = cudaGetLastError();  // a launch that never started
    if (err == cudaSuccess) err = cudaDeviceSynchronize();
    if (err != cudaSuccess) printf("error %s\n", cudaGetErrorString(err));
    return err == cudaSuccess;
  };
  cudaFuncSetAttribute(tma_stream, cudaFuncAttributeMaxDynamicSharedMemorySize, 200 * 1024);
  const int configs[][2] = {{8192, 8}, {16384, 2}, {16384, 4}, {16384, 8}, {20480, 2}, {20480, 3}, {20480, 4}, {20480, 8}, {32768, 4}};
  for (auto& c : configs) {
    const int S = c[0], D = c[1];
    const size_t per = total / sms / S * S;
    const float ms = best_ms([&] { tma_stream<<<sms, 32 * (kConsumers + 1), (size_t)D * (S + 16)>>>(buf, per, S, D, sink); });
    if (!check()) return 1;
    printf("tma %d %d %.0f\n", S, D, (double)per * sms / ms / 1e6);
  }
  for (int threads : {288, 1024}) {
    const size_t per = total / 16 / sms;
    const float ms = best_ms([&] { ld_stream<<<sms, threads>>>(reinterpret_cast<const uint4*>(buf), per, sink); });
    if (!check()) return 1;
    printf("ld %d %.0f\n", threads, (double)per * 16 * sms / ms / 1e6);
  }
  return 0;
}
