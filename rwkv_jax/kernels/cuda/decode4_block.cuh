#pragma once
// A run of RWKV-4 blocks for one token (batch 1-2) as ONE cooperative CUDA kernel (sm_90:
// Hopper): the batch-1 decode step on NVIDIA GPUs. decode4_ffi.cu wraps it for XLA
// (rwkv_jax.kernels.cuda.decode4 builds and calls it); tests/ops/test_cuda_decode.py checks it
// against the model. The experiments behind its design are in docs/performance.md
// ("Experiments whose conclusions are recorded").
//
// Why try: at batch 1 a decode step only streams weights, and the matrix-vector kernels that
// XLA, cuBLAS or Triton (Pallas) produce read well below the rate at which plain loads or the
// bulk copy engine stream (figures in docs/performance.md).
//
// Design: one CTA per SM streams its contiguous, equal share of every matrix through a ring of
// shared-memory stages with the bulk copy engine (cp.async.bulk, completing on an mbarrier):
// one producer thread, six consumer warps, warp w owning the slots i with i % 6 == w (a parity
// wait cannot tell a slot's next use from its last, so one warp must take a slot's uses in
// order).
// A consumer multiplies a stage's rows (up to 4) with the input vectors, which every CTA stages
// in shared memory. The block's four products are phases; what a phase needs from the others
// comes as flagged words (value and epoch in one store, polled until all are this launch's:
// NCCL's LL protocol), which costs one round trip to L2 where a grid barrier costs three. The
// producer waits for nothing but ring slots, so it streams on across phase and layer
// boundaries, as far ahead as the ring allows (weights do not depend on the previous phase).
// One launch runs many layers: between launches the ring would drain and refill, and the
// launch itself costs microseconds; between layers in a launch x is one more exchange.
//
// Phases (B rows, C channels, F = ffn width; state and x float32, matrices bf16 (out, in)):
//   0  LN1(x) mixed with the shift state three ways (each CTA computes it for itself), the
//      rows [key; value; receptance] of this CTA's channels, then their WKV step and gate:
//      g = sigmoid(r) * wkv (bf16); new aa, bb, pp; LN1(x) is the new shift
//   1  x2 = x + W_o g
//   2  LN2(x2) mixed two ways; rows of [key ; receptance]: h = relu(k)^2 (bf16),
//      gate = sigmoid(r)
//   3  x_out = x2 + gate * (W_v h), the next layer's x
// Roundings are the model's (rwkv_jax.nn.rwkv4, rwkv_jax.generate.decode_weights): every
// product is rounded to bf16, everything else is float32.
//
// Build flags: -DRWKV_TRACE records each CTA's phase times (%globaltimer); -DRWKV_NOCOMPUTE
// skips the products (the streaming and synchronisation alone); -DRWKV_CONSUMERS=n sets the
// consumer warps (6); -DRWKV_STAGE_KB=n and -DRWKV_MAX_STAGE_ROWS=n bound a stage (20 KB, 4
// rows), -DRWKV_NARROW_STAGE_ROWS=n the rows of one for n_embd up to -DRWKV_NARROW_C=n (3 up
// to 768), -DRWKV_MAX_DEPTH=n the ring (12 stages); -DRWKV_MMA=1 does the products on the
// tensor cores; -DRWKV_POLL_NS=n sleeps n ns between rounds of polls. The last two are
// experiments that were no faster (docs/performance.md).

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <mutex>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "bulk_copy.cuh"

namespace rwkv_decode4 {

using bf16 = __nv_bfloat16;

#ifndef RWKV_CONSUMERS
#define RWKV_CONSUMERS 6
#endif
// Consumer warps; one more warp produces. A warp owns every kConsumers-th slot of the ring,
// whose depth need not be a multiple of it (a warp that owns a slot more takes more stages).
// Six: the fastest at 1.5B, against four, five and eight; eight and ten spill registers in the
// products, where six spill no more than five (figures in docs/performance.md). The norms take
// C <= 16 * 32 * kConsumers: 3072 with six.
constexpr int kConsumers = RWKV_CONSUMERS;
constexpr int kConsumerThreads = 32 * kConsumers;
constexpr int kThreads = kConsumerThreads + 32;
#ifndef RWKV_STAGE_KB
#define RWKV_STAGE_KB 20
#endif
constexpr int kStageTarget = RWKV_STAGE_KB * 1024;  // bytes per stage (whole rows, at least one)
constexpr int kPer = 16;   // layer-norm elements per consumer thread: C <= 16 * 256
// The matrices' row runs, in streaming order: phase 0 key, value, receptance rows; phase 1
// output rows; phase 2 key rows, receptance rows; phase 3 value rows.
constexpr int kSegments = 7;
__constant__ int kFirstSegment[4] = {0, 3, 4, 6};
#ifndef RWKV_MAX_STAGE_ROWS
#define RWKV_MAX_STAGE_ROWS 4
#endif
// Four rows is the fastest for 3B and 1.5B (figures in docs/performance.md). Smaller stages put
// fewer bytes in flight at the same window; larger ones leave warps idle at a phase's end.
constexpr int kMaxStageRows = RWKV_MAX_STAGE_ROWS;
// Narrow models take fewer rows a stage: a CTA's share of a phase is then only a few rows a
// consumer warp, and its time is the exchanges', not the stream's. Three rows suit n_embd 768
// (169M); from 1024 up four are faster again (figures in docs/performance.md).
#ifndef RWKV_NARROW_C
#define RWKV_NARROW_C 768
#endif
#ifndef RWKV_NARROW_STAGE_ROWS
#define RWKV_NARROW_STAGE_ROWS 3
#endif
// Rows a stage of rows K elements long takes, for n_embd C: whole rows, at most kStageTarget
// bytes of them, or one longer row (the kernel's segments and make_plan's slots both).
__host__ __device__ inline int stage_rows(int C, int K) {
  const int cap = C <= RWKV_NARROW_C && RWKV_NARROW_STAGE_ROWS < kMaxStageRows
                      ? RWKV_NARROW_STAGE_ROWS
                      : kMaxStageRows;
  return max(1, min(cap, kStageTarget / (K * 2)));
}
// The ring's depth, at most: as many stages as fit in shared memory beside the inputs, up to
// this. A deeper ring hides more of an exchange's latency in principle (the producer streams on
// while the consumers wait), but was no faster for 1.5B or 169M (-DRWKV_MAX_DEPTH=16; figures
// in docs/performance.md). A 3B block's 20 KB stages fit 10 either way.
#ifndef RWKV_MAX_DEPTH
#define RWKV_MAX_DEPTH (2 * RWKV_CONSUMERS)
#endif
constexpr int kMaxDepth = RWKV_MAX_DEPTH;

// Rows of the per-channel vector table `vecs` (NVEC, C), float32 (decay = -exp(time_decay)).
enum Vec { LN1_SCALE, LN1_BIAS, MIX_K, MIX_V, MIX_R, DECAY, FIRST, LN2_SCALE, LN2_BIAS,
           FMIX_K, FMIX_R, NVEC };

// One layer's weights and state. The state is read, then overwritten with the new state: a
// decode loop then carries it without copies, and nothing is written before every CTA is done
// reading what it overwrites.
struct Layer {
  const bf16* w_kvr;  // (3C, C)
  const bf16* w_o;    // (C, C)
  const bf16* w_kr;   // (F + C, C)
  const bf16* w_v;    // (C, F)
  const float* vecs;  // (NVEC, C)
  float* shift_att;   // (B, C) each
  float* aa;
  float* bb;
  float* pp;
  float* shift_ffn;
};

// Layers per launch: the table travels as the kernel's parameter, within its 4 KB (3B has 32
// layers; a longer run takes several launches).
constexpr int kMaxLayers = 40;

struct Args {
  float* x;  // (B, C): in, x before the first layer (after ln0); out, x after the last
  int layers, C, F;
  float eps;
  int depth;       // stages in the ring: at most this many (0: as many as fit; launch() sets it)
  int slot_bytes;  // bytes per stage slot (a multiple of 128)
  // At most this many stages in flight (0, or more than the ring's depth, which launch() caps
  // it to: as many as the ring has free slots). Loads in flight queue at the memory
  // controllers, and every other access waits behind them (Little's law: the time a load
  // waits is the bytes in flight over the bandwidth); HBM stays saturated with far fewer.
  int window;
  Layer layer[kMaxLayers];
};
static_assert(sizeof(Args) <= 4096, "kernel parameters are limited to 4 KB");

// The stages in flight that decode4_ffi.cu asks for: the fastest of 2, 3 and no cap (figures in
// docs/performance.md).
constexpr int kWindow = 2;

// A contiguous run of rows of one matrix that this CTA streams, in stages of `rps` rows.
struct Segment {
  int mat;         // 0..3: w_kvr, w_o, w_kr, w_v
  int row0, row1;  // rows of the matrix
  int K;           // row length
  int rps;         // rows per stage
  int first;       // index of its first stage in the CTA's whole sequence
  int end;         // one past its last stage
  int input;       // offset of its input vectors in the staged inputs, in 16-byte units
};

__device__ __forceinline__ const bf16* matrix(const Layer& l, int mat) {
  return mat == 0 ? l.w_kvr : mat == 1 ? l.w_o : mat == 2 ? l.w_kr : l.w_v;
}

// ----------------------------------------------------------------------------- PTX

// Synchronises the consumer warps only: the producer must never be waited for.
__device__ __forceinline__ void consumers_sync() {
  asm volatile("bar.sync 1, %0;" ::"n"(kConsumerThreads) : "memory");
}

// The exchanges between phases carry their own flags (NCCL's LL protocol): every value that
// another CTA needs goes out as one word holding the value and this launch's epoch, written by
// a single relaxed store, and a reader polls the words themselves until all carry the epoch.
// A grid barrier (release-add, poll, then load the data) costs three round trips to L2, and
// under a saturated memory system each costs microseconds; this costs one, and no fence.
// bf16 values travel as (bits << 16 | epoch & 0xffff), float32 values as (bits << 32 | epoch).
// Each layer of a launch has its own epoch. Every layer writes every word it reads, so a stale
// word carries an earlier epoch; the 32-bit tags never repeat in practice, and the 16-bit ones
// are kept from repeating by a stamp. Launches of this kernel are serial (each takes every SM),
// and every CTA index takes part in each, so CTA i's own count of layers run is the same in
// every CTA: the epoch. A word is rewritten only after all its readers have read it: each
// exchange's next writer has passed an exchange that waited on every reader.
constexpr int kMaxC = kPer * kConsumerThreads;  // C the norms allow
constexpr int kMaxF = 4 * kMaxC;
__device__ unsigned g_launches[1024];               // per CTA index
__device__ __align__(16) uint32_t g_ll_g[2 * kMaxC];  // (B, C) bf16: sigmoid(r) * wkv (16-byte polls)
__device__ unsigned long long g_ll_x2[2 * kMaxC];   // (B, C) float32: x2
__device__ __align__(16) uint32_t g_ll_h[2 * kMaxF];  // (B, F) bf16: relu(k)^2
__device__ unsigned long long g_ll_gate[2 * kMaxC];  // (B, C) float32: sigmoid(r)
__device__ unsigned long long g_ll_x[2 * kMaxC];     // (B, C) float32: x between layers
__device__ unsigned long long g_ll_read[1024];  // per CTA: done reading x and the shift states

__device__ __forceinline__ void put16(uint32_t* p, bf16 v, uint32_t epoch) {
  const uint32_t w = (uint32_t)__bfloat16_as_ushort(v) << 16 | (epoch & 0xffffu);
  asm volatile("st.relaxed.gpu.global.u32 [%0], %1;" ::"l"(p), "r"(w) : "memory");
}

__device__ __forceinline__ void put32(unsigned long long* p, float v, uint32_t epoch) {
  const unsigned long long w = (unsigned long long)__float_as_uint(v) << 32 | epoch;
  asm volatile("st.relaxed.gpu.global.u64 [%0], %1;" ::"l"(p), "l"(w) : "memory");
}

__device__ __forceinline__ uint4 poll4(const uint32_t* p) {
  uint4 v;
  asm volatile("ld.relaxed.gpu.global.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p)
               : "memory");
  return v;
}

__device__ __forceinline__ unsigned long long poll64(const unsigned long long* p) {
  unsigned long long v;
  asm volatile("ld.relaxed.gpu.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ bool ready4(uint4 v, uint32_t epoch) {
  const uint32_t e = epoch & 0xffffu;
  return (v.x & 0xffffu) == e && (v.y & 0xffffu) == e && (v.z & 0xffffu) == e &&
         (v.w & 0xffffu) == e;
}

#ifndef RWKV_POLL_NS
#define RWKV_POLL_NS 0
#endif
// Called between two rounds of polls. RWKV_POLL_NS > 0 (a build flag) sleeps that long
// between rounds: the experiment on whether the polls' own traffic (up to B * F * 4 bytes a CTA
// a round) slows the exchanges or the weight stream. It does not: sleeping only added latency
// (figures in docs/performance.md).
__device__ __forceinline__ void too_long(int spins, const char* what) {
  if (RWKV_POLL_NS > 0 && spins > 0) __nanosleep(RWKV_POLL_NS);
  if (spins > (1 << 24)) {  // a word never written is a bug: an error, not a hang
    printf("CTA %d waited too long for %s\n", blockIdx.x, what);
    __trap();
  }
}

// n bf16 values (n a multiple of 4) from their flagged words into shared memory, by the
// consumer threads. Polls go out in rounds: every word not yet this launch's is loaded again
// before any is checked, so a round costs one round trip however many words are late (checking
// and re-polling one word at a time would cost one per late word).
__device__ void gather16(const uint32_t* src, bf16* dst, int n, uint32_t epoch) {
  constexpr int U = 8;  // 16-byte words in flight per thread: n up to 8192 in one pass
  for (int base = threadIdx.x; base < n / 4; base += U * kConsumerThreads) {
    uint4 v[U];
    unsigned late = 0;  // a bit per word still to come (an array here went to local memory)
#pragma unroll
    for (int u = 0; u < U; ++u) late |= (unsigned)(base + u * kConsumerThreads < n / 4) << u;
    for (int spins = 0; late; ++spins) {
      too_long(spins, "a bf16 exchange");
#pragma unroll
      for (int u = 0; u < U; ++u)
        if (late >> u & 1) v[u] = poll4(src + 4 * (base + u * kConsumerThreads));
#pragma unroll
      for (int u = 0; u < U; ++u)
        if (ready4(v[u], epoch)) late &= ~(1u << u);
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int i = base + u * kConsumerThreads;
      if (i < n / 4)
        reinterpret_cast<uint2*>(dst)[i] = {(v[u].x >> 16) | (v[u].y & 0xffff0000u),
                                            (v[u].z >> 16) | (v[u].w & 0xffff0000u)};
    }
  }
}

// A 4-byte copy from global to shared memory that does not hold the thread up (cp.async):
// the loads of a layer's inputs then overlap one another and the exchanges.
__device__ __forceinline__ void copy_async(float* dst, const float* src) {
  const uint32_t d = (uint32_t)__cvta_generic_to_shared(dst);
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;" ::"r"(d), "l"(src) : "memory");
}

__device__ __forceinline__ void copies_done() {  // this thread's copies have landed
  asm volatile("cp.async.wait_all;" ::: "memory");
}

// One float32 from its flagged word.
__device__ __forceinline__ float get32(const unsigned long long* p, uint32_t epoch) {
  unsigned long long w = poll64(p);
  for (int spins = 0; (uint32_t)w != epoch; ++spins) {
    too_long(spins, "a float exchange");
    w = poll64(p);
  }
  return __uint_as_float((uint32_t)(w >> 32));
}

// Until the word carries `epoch` or a later one (a CTA's "done reading" word, which it may
// rewrite for the next layer before a slow reader has seen this layer's).
__device__ __forceinline__ void wait_epoch(const unsigned long long* p, uint32_t epoch) {
  for (int spins = 0; (int32_t)((uint32_t)poll64(p) - epoch) < 0; ++spins)
    too_long(spins, "a CTA done reading");
}

// ----------------------------------------------------------------------------- math

__device__ __forceinline__ float round_bf16(float v) { return __bfloat162float(__float2bfloat16(v)); }
__device__ __forceinline__ float sigmoid(float v) { return 1.f / (1.f + expf(-v)); }

__device__ __forceinline__ void unpack8(uint4 v, float (&f)[8]) {
  const uint32_t u[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {  // bf16 -> float32 is a shift of the bits
    f[2 * i] = __uint_as_float(u[i] << 16);
    f[2 * i + 1] = __uint_as_float(u[i] & 0xffff0000u);
  }
}

// v summed over the warp's lanes, on every lane.
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// part(r, b) += row r's 16-byte vector i . x[b]'s, for the R rows of a stage (consecutive, nvec
// vectors each) and the B input rows: each x vector is unpacked once for all R rows.
template <int B, int R, typename Part>
__device__ __forceinline__ void fma_vec(const uint4* w, const uint4* x, int nvec, int i,
                                        Part&& part) {
  float xf[B][8], wf[8];
#pragma unroll
  for (int b = 0; b < B; ++b) unpack8(x[b * nvec + i], xf[b]);
#pragma unroll
  for (int r = 0; r < R; ++r) {
    unpack8(w[r * nvec + i], wf);
#pragma unroll
    for (int b = 0; b < B; ++b)
#pragma unroll
      for (int e = 0; e < 8; ++e) part(r, b) = fmaf(wf[e], xf[b][e], part(r, b));
  }
}

// acc[r][b] = row r . x[b] on every lane, for the R rows of a stage (consecutive, nvec 16-byte
// vectors each) and x (B, nvec), both in shared memory. Each x vector is unpacked once for all
// R rows, and every row keeps two partial sums: R * B * 2 independent FMA chains.
template <int B, int R>
__device__ __forceinline__ void stage_dot(float (&acc)[R][B], const uint4* w, const uint4* x,
                                          int nvec, int lane) {
  float part[R][B][2];
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int b = 0; b < B; ++b) part[r][b][0] = part[r][b][1] = 0.f;
  auto step = [&](int i, int t) {
    fma_vec<B, R>(w, x, nvec, i, [&](int r, int b) -> float& { return part[r][b][t]; });
  };
  int i = lane;
  for (; i + 32 < nvec; i += 64) {
    step(i, 0);
    step(i + 32, 1);
  }
  if (i < nvec) step(i, 0);
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int b = 0; b < B; ++b) acc[r][b] = warp_sum(part[r][b][0] + part[r][b][1]);
}

#ifndef RWKV_MMA
#define RWKV_MMA 0
#endif
#if RWKV_MMA
// The same products on the tensor cores (mma.sync m16n8k16, bf16 in, float32 accumulate),
// built with -DRWKV_MMA=1. A matrix-vector product has one column, so
// it is cast as a matrix product whose diagonal is the answer: for a span of 128 elements at
// j, A's rows m and 8 + m hold two weight rows' elements j + 8m .. +8 and j + 64 + 8m .. +8,
// and B's column n holds x at the same places, so that D[m][m] and D[8 + m][m] are those 16
// elements' dot products; the other entries are never read. Each operand is one ldmatrix (A: 4
// matrices of 128 contiguous bytes, B: 2; no bank conflicts), so a span of two rows costs 3
// instructions and one mma where the CUDA cores take ~17 a lane.
// Not the default: it was no faster (figures in docs/performance.md), so the products'
// instruction count is not what holds a block up.
__device__ __forceinline__ void ldmatrix4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

__device__ __forceinline__ void ldmatrix2(uint32_t (&r)[2], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(smem_addr(p)));
}

__device__ __forceinline__ void mma_bf16(float (&d)[4], const uint32_t (&a)[4],
                                         const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// acc[r][b] = row r . x[b] on every lane, as stage_dot, with the 128-element spans on the
// tensor cores and what is left of a row (K % 128) on the CUDA cores. Rows pair up in A (an odd
// last row pairs with itself, its twin unread); two spans go at a time, each with its own
// accumulators, so consecutive mmas do not wait on each other.
template <int B, int R>
__device__ __forceinline__ void stage_dot_mma(float (&acc)[R][B], const uint4* w, const uint4* x,
                                              int nvec, int lane) {
  constexpr int P = (R + 1) / 2;
  const bf16* wr = reinterpret_cast<const bf16*>(w);
  const bf16* xr = reinterpret_cast<const bf16*>(x);
  const int K = nvec * 8, spans = K / 128;
  // ldmatrix's row addresses: lane l gives row l % 8 of matrix l / 8. A's matrices: (rows
  // 0-7, k 0-7) from the pair's first row, (8-15, 0-7) its second, then both again 64 on.
  const int m = lane & 7, mat = lane >> 3;
  const int a_off = 8 * m + (mat & 2 ? 64 : 0);
  const int b_off = 8 * m + (mat & 1 ? 64 : 0);  // B: matrices 0, 1 from lanes 0-15
  const bf16* a_row[P];
#pragma unroll
  for (int p = 0; p < P; ++p) {
    const int r = min(2 * p + (mat & 1), R - 1);
    a_row[p] = wr + r * K + a_off;
  }
  float d[2][P][B][4];
#pragma unroll
  for (int u = 0; u < 2; ++u)
#pragma unroll
    for (int p = 0; p < P; ++p)
#pragma unroll
      for (int b = 0; b < B; ++b) d[u][p][b][0] = d[u][p][b][1] = d[u][p][b][2] = d[u][p][b][3] = 0.f;
  auto span = [&](int j, int u) {
    uint32_t bx[B][2];
#pragma unroll
    for (int b = 0; b < B; ++b) ldmatrix2(bx[b], xr + b * K + j + b_off);
#pragma unroll
    for (int p = 0; p < P; ++p) {
      uint32_t a[4];
      ldmatrix4(a, a_row[p] + j);
#pragma unroll
      for (int b = 0; b < B; ++b) mma_bf16(d[u][p][b], a, bx[b]);
    }
  };
  int s = 0;
  for (; s + 1 < spans; s += 2) {
    span(128 * s, 0);
    span(128 * s + 128, 1);
  }
  if (s < spans) span(128 * s, 0);
  // D[m][m] (the first row of a pair) sits in lane 4m + m / 2, in d[0] for even m and d[1]
  // for odd; D[8 + m][m] (the second) in the same lane's d[2] / d[3].
  const int g = lane >> 2, t = lane & 3;
  const bool diag = t == g >> 1;
  const int e = g & 1;
  float part[R][B];
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int b = 0; b < B; ++b) {
      const int p = r / 2, h = 2 * (r & 1);
      const float v = (e ? d[0][p][b][h + 1] : d[0][p][b][h]) + (e ? d[1][p][b][h + 1] : d[1][p][b][h]);
      part[r][b] = diag ? v : 0.f;
    }
  for (int i = spans * 16 + lane; i < nvec; i += 32)  // the rest of the row, 8 at a lane
    fma_vec<B, R>(w, x, nvec, i, [&](int r, int b) -> float& { return part[r][b]; });
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int b = 0; b < B; ++b) acc[r][b] = warp_sum(part[r][b]);
}
#endif

// The stage's n <= R rows times its input, then epilogue(row, acc) on lane 0 for each: one
// instance a row count, so that every product's loop is unrolled over its rows.
template <int B, int R, typename Epilogue>
__device__ __forceinline__ void stage_rows(int n, const uint4* w, const uint4* x, int nvec,
                                           int lane, int row0, Epilogue& epilogue) {
  if constexpr (R > 1) {
    if (n < R) return stage_rows<B, R - 1>(n, w, x, nvec, lane, row0, epilogue);
  }
  float acc[R][B];
#if RWKV_MMA
  stage_dot_mma<B, R>(acc, w, x, nvec, lane);
#else
  stage_dot<B, R>(acc, w, x, nvec, lane);
#endif
  if (lane == 0) {
#pragma unroll
    for (int r = 0; r < R; ++r) epilogue(row0 + r, acc[r]);
  }
}

__device__ float consumers_sum(float v, float* red) {
  v = warp_sum(v);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  consumers_sync();  // red may still be read from the last call
  if (lane == 0) red[warp] = v;
  consumers_sync();
  float s = 0.f;
#pragma unroll
  for (int w = 0; w < kConsumers; ++w) s += red[w];
  return s;
}

// A layer norm's and mixes' per-channel inputs for this thread's channels (i = threadIdx.x +
// j * kConsumerThreads), held in registers so that they can be loaded before an exchange and
// the norm after it costs one memory round trip (the loaded latency here is microseconds).
template <int B, int M>  // M mixes
struct NormInputs {
  float scale[kPer], bias[kPer], mix[M][kPer], shift[B][kPer];
};

template <int B, int M>
__device__ __forceinline__ void load_norm_inputs(NormInputs<B, M>& in, const float* vecs,
                                                 int scale_row, const int (&mix_rows)[M],
                                                 const float* shift, int C) {
#pragma unroll
  for (int j = 0; j < kPer; ++j) {
    const int i = min((int)threadIdx.x + j * kConsumerThreads, C - 1);
    in.scale[j] = __ldg(vecs + scale_row * C + i);
    in.bias[j] = __ldg(vecs + (scale_row + 1) * C + i);
#pragma unroll
    for (int m = 0; m < M; ++m) in.mix[m][j] = __ldg(vecs + mix_rows[m] * C + i);
#pragma unroll
    // A plain load: the launch overwrites the shift state later (ld.global.nc is for data
    // read-only for the kernel's whole run).
    for (int b = 0; b < B; ++b) in.shift[b][j] = shift[b * C + i];
  }
}

// LN(x) per row, mixed with the shift state by each of the M mixes into xs (M, B, C) bf16;
// LN(x) of this CTA's channels c0..c1 into own (cpc, B), the new shift state, which the CTA
// writes out once no CTA still reads the old one (the call updates the state in place). Consumer threads only; C <= kPer * threads. x is
// either plain float32 (`x`) or this launch's flagged words (`ll`, with `epoch`).
template <int B, int M>
__device__ void norm_mix(const NormInputs<B, M>& in, const float* x, const unsigned long long* ll,
                         uint32_t epoch, int C, float eps, bf16* xs, float* own, int c0,
                         int c1, float* red) {
  constexpr int T = kConsumerThreads;
  float v[B][kPer];
  if (ll) {  // in rounds, as gather16
    unsigned long long w[B][kPer];
#pragma unroll
    for (int b = 0; b < B; ++b)
#pragma unroll
      for (int j = 0; j < kPer; ++j) w[b][j] = epoch + 1u;  // late, whatever the epoch
    for (int spins = 0;; ++spins) {
#pragma unroll
      for (int b = 0; b < B; ++b)
#pragma unroll
        for (int j = 0; j < kPer; ++j) {
          const int i = threadIdx.x + j * T;
          if ((uint32_t)w[b][j] != epoch) w[b][j] = i < C ? poll64(ll + b * C + i) : epoch;
        }
      bool any = false;
#pragma unroll
      for (int b = 0; b < B; ++b)
#pragma unroll
        for (int j = 0; j < kPer; ++j) any |= (uint32_t)w[b][j] != epoch;
      if (!any) break;
      too_long(spins, "x2");
    }
#pragma unroll
    for (int b = 0; b < B; ++b)
#pragma unroll
      for (int j = 0; j < kPer; ++j) v[b][j] = __uint_as_float((uint32_t)(w[b][j] >> 32));
  } else {
#pragma unroll
    for (int b = 0; b < B; ++b)
#pragma unroll
      for (int j = 0; j < kPer; ++j) {
        const int i = threadIdx.x + j * T;
        v[b][j] = i < C ? x[b * C + i] : 0.f;
      }
  }
#pragma unroll
  for (int b = 0; b < B; ++b) {
    float s = 0.f;
#pragma unroll
    for (int j = 0; j < kPer; ++j) s += v[b][j];
    const float mean = consumers_sum(s, red) / C;
    float q = 0.f;
#pragma unroll
    for (int j = 0; j < kPer; ++j) {
      const float d = threadIdx.x + j * T < C ? v[b][j] - mean : 0.f;
      q += d * d;
    }
    const float rstd = rsqrtf(consumers_sum(q, red) / C + eps);
#pragma unroll
    for (int j = 0; j < kPer; ++j) {
      const int i = threadIdx.x + j * T;
      if (i < C) {
        const float xn = (v[b][j] - mean) * rstd * in.scale[j] + in.bias[j];
        const float sh = in.shift[b][j];
#pragma unroll
        for (int m = 0; m < M; ++m)
          xs[(m * B + b) * C + i] = __float2bfloat16(xn * in.mix[m][j] + sh * (1.f - in.mix[m][j]));
        if (i >= c0 && i < c1) own[(i - c0) * B + b] = xn;
      }
    }
  }
}

// ----------------------------------------------------------------------------- kernel

#ifdef RWKV_TRACE  // timestamps of the phases, for timing the kernel alone
__device__ unsigned long long g_trace[1024][14];
__device__ __forceinline__ void trace(int i, int thread) {
  if (threadIdx.x == thread && blockIdx.x < 1024) {
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    g_trace[blockIdx.x][i] = t;
  }
}
#define TRACE_SYNC() consumers_sync()
#else
__device__ __forceinline__ void trace(int, int) {}
#define TRACE_SYNC()
#endif

template <int B>
__global__ void __launch_bounds__(kThreads, 1) block_kernel(const __grid_constant__ Args a) {
  extern __shared__ __align__(128) unsigned char smem[];
  const int C = a.C, F = a.F, G = gridDim.x, cta = blockIdx.x, D = a.depth, L = a.layers;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  // The CTA's channels (phase 0) and rows (phases 1-3): equal contiguous shares.
  const int c0 = (int)((long long)cta * C / G), c1 = (int)((long long)(cta + 1) * C / G);
  const int k0 = (int)((long long)cta * (F + C) / G), k1 = (int)((long long)(cta + 1) * (F + C) / G);

  unsigned char* ring = smem;
  bf16* xs = reinterpret_cast<bf16*>(smem + (size_t)D * a.slot_bytes);
  const int xs_elems = B * max(3 * C, F);
  const int cpc = (C + G - 1) / G + 1;  // channels per CTA, at most (launch() sizes by it)
  float* res = reinterpret_cast<float*>(xs + xs_elems);  // k, v, r: (3, cpc, B), phase 0
  float* wkv_in = res + 3 * cpc * B;                    // aa, bb, pp, decay, first: (5, cpc, B)
  float* x_own = wkv_in + 5 * cpc * B;  // x, x2 and the gates of this CTA's channels: (cpc, B)
  float* x2_own = x_own + cpc * B;
  float* gate_own = x2_own + cpc * B;
  float* shift_att_own = gate_own + cpc * B;  // the new shift states of this CTA's channels
  float* shift_ffn_own = shift_att_own + cpc * B;
  // The barriers need 8-byte alignment: launch() reserves 2 floats and 16 bytes of slack.
  uint64_t* full = reinterpret_cast<uint64_t*>(shift_ffn_own + cpc * B + 2);
  full = reinterpret_cast<uint64_t*>((reinterpret_cast<uintptr_t>(full) + 7) & ~uintptr_t(7));
  uint64_t* empty = full + D;
  __shared__ Segment seg[kSegments];
  __shared__ int phase_end[4];  // stage index one past each phase's last, in a layer
  __shared__ float red[kConsumers];

  __shared__ uint32_t epoch_s;
  if (threadIdx.x == 0) {
    epoch_s = g_launches[cta] + 1;  // the first layer's; the same in every CTA (g_launches)
    g_launches[cta] += L;
    const int kr = min(max(k0, F), k1);  // where this CTA's ffn rows turn from key to receptance
    const int rows[kSegments][2] = {{c0, c1}, {C + c0, C + c1}, {2 * C + c0, 2 * C + c1},
                                    {c0, c1}, {k0, kr}, {kr, k1}, {c0, c1}};
    const int mats[kSegments] = {0, 0, 0, 1, 2, 2, 3};
    const int nC = C / 8;
    const int inputs[kSegments] = {0, B * nC, 2 * B * nC, 0, 0, B * nC, 0};
    int first = 0;
    for (int s = 0; s < kSegments; ++s) {
      const int K = s == 6 ? F : C;
      const int rps = stage_rows(C, K);
      const int end = first + (rows[s][1] - rows[s][0] + rps - 1) / rps;
      seg[s] = Segment{mats[s], rows[s][0], rows[s][1], K, rps, first, end, inputs[s]};
      first = end;
      if (s == 2 || s == 3 || s == 5 || s == 6) phase_end[s == 2 ? 0 : s == 3 ? 1 : s == 5 ? 2 : 3] = first;
    }
    for (int i = 0; i < D; ++i) {
      mbar_init(&full[i], 1);
      mbar_init(&empty[i], 1);
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();
  const int total = phase_end[3];  // stages a layer

  if (warp == kConsumers) {
    // ------------------------------------------------------------------ producer
    // Streams every layer's stages in turn: weights depend on nothing, so it runs on across
    // phase and layer boundaries as far as the ring lets it.
    if (lane == 0) {
      int si = 0;
      for (int issued = 0; issued < L * total; ++issued) {
        const int l = issued / total, j = issued - l * total;
        if (j < seg[si].first) si = 0;
        while (j >= seg[si].end) ++si;
        const Segment& sg = seg[si];
        const int r = sg.row0 + (j - sg.first) * sg.rps;
        const bf16* src = matrix(a.layer[l], sg.mat) + (size_t)r * sg.K;
        const uint32_t bytes = (uint32_t)min(sg.rps, sg.row1 - r) * sg.K * 2;
        if (a.window > 0 && issued >= a.window) {  // stage issued - window has landed
          const int w = issued - a.window;
          mbar_wait(&full[w % D], (w / D) & 1);
        }
        const int slot = issued % D, use = issued / D;
        if (use > 0) mbar_wait(&empty[slot], (use - 1) & 1);
        mbar_expect_tx(&full[slot], bytes);
        bulk_load(ring + (size_t)slot * a.slot_bytes, src, bytes, &full[slot]);
#ifdef RWKV_TRACE
        for (int p = 0; p < 4; ++p)
          if (issued + 1 == (L > 1 ? total : 0) + phase_end[p]) trace(10 + p, kConsumerThreads);
#endif
      }
    }
    return;
  }

  // -------------------------------------------------------------------- consumers
  // Each slot has one consumer warp, which takes its stages in order: a warp never waits on a
  // slot's next use before it has released the last (a parity wait cannot tell them apart).
  // Stage indices count from the launch's first layer (base: the layer's first stage).
  auto consume = [&](int p, int base, auto&& epilogue) {
    int si = kFirstSegment[p];
    const int s0 = base + (p == 0 ? 0 : phase_end[p - 1]), s1 = base + phase_end[p];
    // Slot s % D belongs to warp (s % D) % kConsumers: the warp's stages, in order.
    int slot = s0 % D;
    for (int s = s0; s < s1; ++s, slot = slot + 1 == D ? 0 : slot + 1) {
      if (slot % kConsumers != warp) continue;
      while (s - base >= seg[si].end) ++si;
      const Segment& sg = seg[si];
      const int r = sg.row0 + (s - base - sg.first) * sg.rps;
      const int n = min(sg.rps, sg.row1 - r);
      mbar_wait(&full[slot], (s / D) & 1);
      const uint4* w = reinterpret_cast<const uint4*>(ring + (size_t)slot * a.slot_bytes);
      const uint4* x = reinterpret_cast<const uint4*>(xs) + sg.input;
      const int nvec = sg.K / 8;
#ifndef RWKV_NOCOMPUTE  // the streaming-only build, for experiments
      stage_rows<B, kMaxStageRows>(n, w, x, nvec, lane, r, epilogue);
#else  // the epilogues still run, on zeros: the exchanges are part of what is timed
      (void)w, (void)x, (void)nvec;
      if (lane == 0) {
        const float zero[B] = {};
        for (int i = 0; i < n; ++i) epilogue(r + i, zero);
      }
#endif
      __syncwarp();
      if (lane == 0) mbar_arrive(&empty[slot]);
    }
  };
  const int nwkv = (c1 - c0) * B;  // this CTA's (channel, row) pairs
  for (int t = threadIdx.x; t < nwkv; t += kConsumerThreads)  // x of this CTA's channels
    copy_async(x_own + t, a.x + (t % B) * C + c0 + t / B);
  // The timeline (the RWKV_TRACE build) of the second layer, where a launch has one: the
  // steady state, which the first layer's start does not show.
  const int traced = L > 1 ? 1 : 0;

  for (int l = 0; l < L; ++l) {
    const Layer& ly = a.layer[l];
    const uint32_t epoch = epoch_s + l;
    const int base = l * total;
    auto mark = [&](int i) { if (l == traced) trace(i, 0); };
    mark(0);
    consumers_sync();  // the last layer's phase 3 is done with xs and the own-channel buffers
    // The bf16 words' 16-bit tags repeat every 65536 epochs, so a word may pass for this
    // epoch's only if it was last written exactly 65536*k epochs ago. The words a layer uses it
    // writes itself; every other word (the second row's when B = 1, and beyond a smaller C or
    // F) is stamped once every 32768 epochs, so that no word goes unwritten for 65536. Every
    // CTA has the same epoch, so all of them stamp in the same layer.
    if ((epoch & 0x7fffu) == 0) {
      for (int i = cta * kConsumerThreads + threadIdx.x; i < 2 * kMaxF;
           i += G * kConsumerThreads) {
        if (i >= B * C && i < 2 * kMaxC) put16(g_ll_g + i, __ushort_as_bfloat16(0xffff), epoch);
        if (i >= B * F) put16(g_ll_h + i, __ushort_as_bfloat16(0xffff), epoch);  // NaN: unused
      }
    }
    // The WKV step's other inputs, copied now so that their latency hides behind phase 0.
    for (int t = threadIdx.x; t < nwkv; t += kConsumerThreads) {
      const int c = c0 + t / B, i = (t % B) * C + c;
      const float* in[5] = {ly.aa + i, ly.bb + i, ly.pp + i, ly.vecs + DECAY * C + c,
                            ly.vecs + FIRST * C + c};
#pragma unroll
      for (int j = 0; j < 5; ++j) copy_async(wkv_in + j * cpc * B + t, in[j]);
    }
    asm volatile("cp.async.commit_group;" ::: "memory");
    // Phase 0: key, value, receptance rows of channels c0..c1, then the WKV step. x is the
    // launch's input in the first layer and the last layer's flagged words after it.
    {
      NormInputs<B, 3> in;
      load_norm_inputs<B, 3>(in, ly.vecs, LN1_SCALE, {MIX_K, MIX_V, MIX_R}, ly.shift_att, C);
      norm_mix<B, 3>(in, l == 0 ? a.x : nullptr, l == 0 ? nullptr : g_ll_x, epoch - 1, C, a.eps,
                     xs, shift_att_own, c0, c1, red);
      consumers_sync();
      mark(1);
      consume(0, base, [&](int row, const float (&acc)[B]) {
        const int m = row / C, c = row - m * C - c0;  // m: key, value, receptance
#pragma unroll
        for (int b = 0; b < B; ++b) res[(m * cpc + c) * B + b] = round_bf16(acc[b]);
      });
      copies_done();  // each thread reads the WKV inputs it copied; x_own after a barrier
      consumers_sync();
      mark(2);
      for (int t = threadIdx.x; t < nwkv; t += kConsumerThreads) {
        const int cl = t / B, b = t % B, i = b * C + c0 + cl;
        const float kk = res[cl * B + b], vv = res[(cpc + cl) * B + b], rr = res[(2 * cpc + cl) * B + b];
        const float aa = wkv_in[t], bb = wkv_in[cpc * B + t], pp = wkv_in[2 * cpc * B + t];
        const float w = wkv_in[3 * cpc * B + t], u = wkv_in[4 * cpc * B + t];
        float ww = u + kk, q = fmaxf(pp, ww);
        float e1 = expf(pp - q), e2 = expf(ww - q);
        const float y = (e1 * aa + e2 * vv) / (e1 * bb + e2);
        put16(g_ll_g + i, __float2bfloat16(sigmoid(rr) * y), epoch);  // first: others wait on it
        ww = w + pp;
        q = fmaxf(ww, kk);
        e1 = expf(ww - q);
        e2 = expf(kk - q);
        ly.aa[i] = e1 * aa + e2 * vv;  // only this CTA reads its channels' WKV state
        ly.bb[i] = e1 * bb + e2;
        ly.pp[i] = q;
      }
    }

    // Phase 1: x2 = x + W_o g.
    gather16(g_ll_g, xs, B * C, epoch);
    consumers_sync();
    mark(3);
    consume(1, base, [&](int n, const float (&acc)[B]) {
#pragma unroll
      for (int b = 0; b < B; ++b) {
        const int t = (n - c0) * B + b;
        x2_own[t] = x_own[t] + round_bf16(acc[b]);
        put32(g_ll_x2 + b * C + n, x2_own[t], epoch);
      }
    });
    TRACE_SYNC();
    mark(4);

    // Phase 2: h = relu(W_k xk)^2, gate = sigmoid(W_r xr) from LN2(x2).
    {
      // Loaded here: held in registers from the start, they made the products spill; loaded
      // before phase 1, they delayed g's polls (docs/performance.md). Their loads and
      // x2's polls go out together.
      NormInputs<B, 2> in2;
      load_norm_inputs<B, 2>(in2, ly.vecs, LN2_SCALE, {FMIX_K, FMIX_R}, ly.shift_ffn, C);
      norm_mix<B, 2>(in2, nullptr, g_ll_x2, epoch, C, a.eps, xs, shift_ffn_own, c0, c1, red);
      consumers_sync();
      // This CTA has read all it reads of this layer's x and shift states (program order:
      // phase 0 first), so others may now overwrite them.
      if (threadIdx.x == 0) put32(g_ll_read + cta, 0.f, epoch);
      mark(5);
      consume(2, base, [&](int n, const float (&acc)[B]) {
#pragma unroll
        for (int b = 0; b < B; ++b) {
          const float y = round_bf16(acc[b]);
          if (n < F) {
            const float relu = fmaxf(y, 0.f);
            put16(g_ll_h + b * F + n, __float2bfloat16(relu * relu), epoch);
          } else {
            put32(g_ll_gate + b * C + (n - F), sigmoid(y), epoch);
          }
        }
      });
    }
    TRACE_SYNC();
    mark(7);

    // Phase 3: x_out = x2 + gate * (W_v h). h lands where phase 2's inputs are: wait for every
    // warp to finish with them.
    consumers_sync();
    for (int t = threadIdx.x; t < nwkv; t += kConsumerThreads)  // the gates of this CTA's channels
      gate_own[t] = get32(g_ll_gate + (t % B) * C + c0 + t / B, epoch);
    // Before this CTA writes x and the shift states in place, every CTA must be done reading
    // them. Polled by the last threads, beside the gates' polls, so it adds no round trip; the
    // words are long written by now (the h exchange below waits for far more).
    for (int t = kConsumerThreads - 1 - threadIdx.x; t < G; t += kConsumerThreads)
      wait_epoch(g_ll_read + t, epoch);
    // A CTA without channels (C below the SM count) has nothing left to compute, and nobody
    // waits for it to read h: it must not poll words the next layer may already have rewritten.
    if (c1 > c0) gather16(g_ll_h, xs, B * F, epoch);
    consumers_sync();
    mark(8);
    const bool last = l == L - 1;
    consume(3, base, [&](int n, const float (&acc)[B]) {
#pragma unroll
      for (int b = 0; b < B; ++b) {
        const int t = (n - c0) * B + b;
        const float v = x2_own[t] + gate_own[t] * round_bf16(acc[b]);
        x_own[t] = v;  // the next layer's residual
        if (last) a.x[b * C + n] = v;
        else put32(g_ll_x + b * C + n, v, epoch);
      }
    });
    for (int t = threadIdx.x; t < nwkv; t += kConsumerThreads) {
      const int i = (t % B) * C + c0 + t / B;
      ly.shift_att[i] = shift_att_own[t];
      ly.shift_ffn[i] = shift_ffn_own[t];
    }
    TRACE_SYNC();
    mark(9);
  }
}

// ----------------------------------------------------------------------------- launch

std::string cuda_error(const char* what, cudaError_t err) {
  return std::string(what) + ": " + cudaGetErrorString(err);
}

// How a launch for (device, C, F) is shaped: asked of the device once, then kept (outside a
// CUDA graph the FFI call launches on every step).
struct Plan {
  int sms = 0, depth = 0, slot_bytes = 0;
  size_t smem = 0;
  std::string error;
};

template <int B>
Plan make_plan(int device, int C, int F) {
  auto kernel = block_kernel<B>;
  Plan p;
  int optin = 0;
  cudaDeviceGetAttribute(&p.sms, cudaDevAttrMultiProcessorCount, device);
  cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (p.sms > 1024) {
    p.error = "more than 1024 SMs";  // g_launches has one counter per CTA
    return p;
  }
  auto stage_bytes = [C](int K) { return stage_rows(C, K) * 2 * K; };
  p.slot_bytes = (std::max(stage_bytes(C), stage_bytes(F)) + 127) / 128 * 128;
  const int cpc = (C + p.sms - 1) / p.sms + 1;
  const size_t fixed = sizeof(bf16) * B * std::max(3 * C, F) +
                       sizeof(float) * (13 * cpc * B + 2) + 16;
  // Static shared memory (segments, reductions) and the barriers (16 bytes a stage) come out
  // of the same budget.
  const long long room = (long long)optin - 1024 - (long long)fixed;
  // At least a slot for every consumer warp.
  p.depth = (int)std::min<long long>(kMaxDepth, room / (p.slot_bytes + 16));
  if (p.depth < kConsumers) {
    p.error = "rows too long for " + std::to_string(kConsumers) + " stages in shared memory";
    return p;
  }
  p.smem = (size_t)p.depth * (p.slot_bytes + 16) + fixed;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         (int)p.smem);
  if (err != cudaSuccess) {
    p.error = cuda_error("shared memory", err);
    return p;
  }
  int per_sm = 0;
  err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, p.smem);
  if (err != cudaSuccess) p.error = cuda_error("occupancy", err);
  else if (per_sm < 1) p.error = "no CTA fits on an SM";
  return p;
}

// Launches the block for a's rows on `stream`; "" or what went wrong.
template <int B>
std::string launch(cudaStream_t stream, Args a) {
  static std::mutex mutex;
  static std::map<std::tuple<int, int, int>, Plan> plans;
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return cuda_error("device", err);
  Plan p;
  {
    std::lock_guard<std::mutex> lock(mutex);
    auto key = std::make_tuple(device, a.C, a.F);
    auto it = plans.find(key);
    if (it == plans.end()) it = plans.emplace(key, make_plan<B>(device, a.C, a.F)).first;
    p = it->second;
  }
  if (!p.error.empty()) return p.error;
  if (a.layers < 1 || a.layers > kMaxLayers)
    return "layers must be 1.." + std::to_string(kMaxLayers) + ", got " + std::to_string(a.layers);
  // A caller may ask for a shallower ring (experiments); the smem reserved stays the plan's.
  a.depth = a.depth >= kConsumers && a.depth < p.depth ? a.depth : p.depth;
  if (a.window > a.depth) a.window = 0;  // a wait on a stage the ring no longer holds: no cap
  a.slot_bytes = p.slot_bytes;
  void* args[] = {&a};
  err = cudaLaunchCooperativeKernel((const void*)block_kernel<B>, p.sms, kThreads, args, p.smem,
                                    stream);
  if (err != cudaSuccess) return cuda_error("cooperative launch", err);
  return "";
}

}  // namespace rwkv_decode4
