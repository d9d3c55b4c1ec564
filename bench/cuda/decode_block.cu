// The CUDA decode block (rwkv_jax/ops/cuda/decode4_block.cuh) alone: checked against a host
// reference with the kernel's roundings, then timed as 4 layers x 25 steps in one CUDA graph.
// bench/decode_block_cuda.py builds and runs it and prints the tables bench/README.md quotes.
//
// Build flags (on top of the kernel's): -DRWKV_TRACE records each CTA's phase times
// (%globaltimer); -DRWKV_NOCOMPUTE skips the products (the streaming and exchanges alone).

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <utility>
#include <vector>

#include "../../rwkv_jax/ops/cuda/decode4_block.cuh"

using namespace rwkv_decode4;

// ----------------------------------------------------------------------------- host side

namespace {

struct Host {  // one layer's inputs on the host, bf16 matrices as float
  int B, C, F;
  std::vector<float> x, shift_att, aa, bb, pp, shift_ffn, vecs, w_kvr, w_o, w_kr, w_v;
};

float uniform(float lo, float hi) { return lo + (hi - lo) * (rand() / (float)RAND_MAX); }
float bf16r(float v) { return __bfloat162float(__float2bfloat16(v)); }

Host random_layer(int B, int C, int F) {
  Host h{B, C, F};
  auto fill = [](std::vector<float>& v, size_t n, float lo, float hi) {
    v.resize(n);
    for (auto& e : v) e = uniform(lo, hi);
  };
  fill(h.x, B * C, -2, 2);
  fill(h.shift_att, B * C, -1, 1);
  fill(h.aa, B * C, -1, 1);
  fill(h.bb, B * C, 0.1f, 2);
  fill(h.pp, B * C, -1, 1);
  fill(h.shift_ffn, B * C, -1, 1);
  h.vecs.resize(NVEC * C);
  for (int i = 0; i < C; ++i) {
    h.vecs[LN1_SCALE * C + i] = uniform(0.5f, 1.5f);
    h.vecs[LN1_BIAS * C + i] = uniform(-0.1f, 0.1f);
    h.vecs[LN2_SCALE * C + i] = uniform(0.5f, 1.5f);
    h.vecs[LN2_BIAS * C + i] = uniform(-0.1f, 0.1f);
    for (int m : {MIX_K, MIX_V, MIX_R, FMIX_K, FMIX_R}) h.vecs[m * C + i] = uniform(0, 1);
    h.vecs[DECAY * C + i] = -std::exp(uniform(-3, 1));
    h.vecs[FIRST * C + i] = uniform(-1, 1);
  }
  auto mat = [](std::vector<float>& w, size_t rows, int K) {
    const float s = std::sqrt(3.f / K);
    w.resize(rows * K);
    for (auto& e : w) e = bf16r(uniform(-s, s));
  };
  mat(h.w_kvr, 3 * C, C);
  mat(h.w_o, C, C);
  mat(h.w_kr, F + C, C);
  mat(h.w_v, C, F);
  return h;
}

// sum over i < C of term(i) (or of its squares, fused as nvcc fuses the kernel's), in float32
// in the order of the kernel's norms: thread t sums elements t, t + T, ... in turn, each warp
// its lanes by xor shuffles, then the warps in order (consumers_sum). The order changes with
// the warp count, and with it, rarely, a normalised value's bf16 rounding, which then moves
// every later value a little: with the norms summed in double, 4, 6 and 8 warps put 50.8% of
// a 169M layer's x off by up to 1.4e-3 (session 12); in this order, none (session 13).
template <typename Term>
float kernel_order_sum(int C, bool squares, Term term) {
  constexpr int T = kConsumerThreads;
  float total = 0.f;
  for (int w = 0; w < kConsumers; ++w) {
    float lane[32], next[32];
    for (int l = 0; l < 32; ++l) {
      float s = 0.f;
      for (int j = 0; j < kPer; ++j) {
        const int i = 32 * w + l + j * T;
        const float d = i < C ? term(i) : 0.f;
        s = squares ? std::fma(d, d, s) : s + d;
      }
      lane[l] = s;
    }
    for (int o = 16; o > 0; o >>= 1) {
      for (int l = 0; l < 32; ++l) next[l] = lane[l] + lane[l ^ o];
      std::copy(next, next + 32, lane);
    }
    total += lane[0];
  }
  return total;
}

// The block on the host with the kernel's roundings (dots in double, norms in the kernel's
// order).
[[maybe_unused]] void reference(const Host& h, std::vector<float>& x_out, std::vector<float>& state_out) {
  const int B = h.B, C = h.C, F = h.F;
  auto dot = [](const float* w, const float* x, int K) {
    double s = 0;
    for (int j = 0; j < K; ++j) s += (double)w[j] * x[j];
    return (float)s;
  };
  auto sigmoid_h = [](float v) { return 1.f / (1.f + std::exp(-v)); };
  auto norm_mix = [&](const float* x, const float* shift, int scale_row, const int* mixes, int M,
                      std::vector<float>& xs, float* shift_out) {
    const float mean = kernel_order_sum(C, false, [&](int i) { return x[i]; }) / C;
    const float var = kernel_order_sum(C, true, [&](int i) { return x[i] - mean; });
    const float rstd = 1.f / std::sqrt(var / C + 1e-5f);
    xs.assign(M * C, 0.f);
    for (int i = 0; i < C; ++i) {
      const float xn = (x[i] - mean) * rstd * h.vecs[scale_row * C + i] +
                       h.vecs[(scale_row + 1) * C + i];
      for (int m = 0; m < M; ++m) {
        const float mix = h.vecs[mixes[m] * C + i];
        xs[m * C + i] = bf16r(xn * mix + shift[i] * (1.f - mix));
      }
      shift_out[i] = xn;
    }
  };
  x_out.assign(B * C, 0.f);
  state_out.assign(5 * B * C, 0.f);  // shift_att, aa, bb, pp, shift_ffn
  for (int b = 0; b < B; ++b) {
    std::vector<float> xs, g(C), x2(C), h2(F), gate(C);
    const int att_mix[3] = {MIX_K, MIX_V, MIX_R}, ffn_mix[2] = {FMIX_K, FMIX_R};
    float* so = state_out.data();
    norm_mix(&h.x[b * C], &h.shift_att[b * C], LN1_SCALE, att_mix, 3, xs, so + b * C);
    for (int c = 0; c < C; ++c) {
      const float k = bf16r(dot(&h.w_kvr[(size_t)c * C], &xs[0], C));
      const float v = bf16r(dot(&h.w_kvr[(size_t)(C + c) * C], &xs[C], C));
      const float r = bf16r(dot(&h.w_kvr[(size_t)(2 * C + c) * C], &xs[2 * C], C));
      const int i = b * C + c;
      const float aa = h.aa[i], bb = h.bb[i], pp = h.pp[i];
      const float w = h.vecs[DECAY * C + c], u = h.vecs[FIRST * C + c];
      float ww = u + k, q = std::max(pp, ww), e1 = std::exp(pp - q), e2 = std::exp(ww - q);
      const float y = (e1 * aa + e2 * v) / (e1 * bb + e2);
      ww = w + pp;
      q = std::max(ww, k);
      e1 = std::exp(ww - q);
      e2 = std::exp(k - q);
      so[B * C + i] = e1 * aa + e2 * v;
      so[2 * B * C + i] = e1 * bb + e2;
      so[3 * B * C + i] = q;
      g[c] = bf16r(sigmoid_h(r) * y);
    }
    for (int n = 0; n < C; ++n) x2[n] = h.x[b * C + n] + bf16r(dot(&h.w_o[(size_t)n * C], g.data(), C));
    norm_mix(x2.data(), &h.shift_ffn[b * C], LN2_SCALE, ffn_mix, 2, xs, so + 4 * B * C + b * C);
    for (int n = 0; n < F; ++n) {
      const float relu = std::max(bf16r(dot(&h.w_kr[(size_t)n * C], &xs[0], C)), 0.f);
      h2[n] = bf16r(relu * relu);
    }
    for (int n = 0; n < C; ++n) gate[n] = sigmoid_h(bf16r(dot(&h.w_kr[(size_t)(F + n) * C], &xs[C], C)));
    for (int n = 0; n < C; ++n)
      x_out[b * C + n] = x2[n] + gate[n] * bf16r(dot(&h.w_v[(size_t)n * F], h2.data(), F));
  }
}

template <typename T>
T* to_device(const std::vector<float>& v) {
  std::vector<T> t(v.size());
  for (size_t i = 0; i < v.size(); ++i) t[i] = (T)v[i];
  T* d;
  cudaMalloc(&d, t.size() * sizeof(T));
  cudaMemcpy(d, t.data(), t.size() * sizeof(T), cudaMemcpyHostToDevice);
  return d;
}

template <>
bf16* to_device<bf16>(const std::vector<float>& v) {
  std::vector<bf16> t(v.size());
  for (size_t i = 0; i < v.size(); ++i) t[i] = __float2bfloat16(v[i]);
  bf16* d;
  cudaMalloc(&d, t.size() * sizeof(bf16));
  cudaMemcpy(d, t.data(), t.size() * sizeof(bf16), cudaMemcpyHostToDevice);
  return d;
}

void upload(float* d, const std::vector<float>& v) {
  cudaMemcpy(d, v.data(), v.size() * sizeof(float), cudaMemcpyHostToDevice);
}

// A model of `layers` layers on the device whose weights cycle through the host layers' (more
// of them than L2 holds, so no layer's weights are still cached when it runs again), each
// layer with its own state. The kernel updates x and the states in place; reset() puts the
// host layers' back.
struct Model {
  const std::vector<Host>& hosts;
  int layers, B, C;
  float* x;
  std::vector<Layer> table;

  Model(const std::vector<Host>& h, int n) : hosts(h), layers(n), B(h[0].B), C(h[0].C) {
    std::vector<Layer> weights;
    for (const Host& w : hosts)
      weights.push_back(Layer{to_device<bf16>(w.w_kvr), to_device<bf16>(w.w_o),
                              to_device<bf16>(w.w_kr), to_device<bf16>(w.w_v),
                              to_device<float>(w.vecs)});
    x = to_device<float>(hosts[0].x);
    for (int l = 0; l < layers; ++l) {
      Layer ly = weights[l % hosts.size()];
      float* st;
      cudaMalloc(&st, 5 * B * C * sizeof(float));
      ly.shift_att = st;
      ly.aa = st + B * C;
      ly.bb = st + 2 * B * C;
      ly.pp = st + 3 * B * C;
      ly.shift_ffn = st + 4 * B * C;
      table.push_back(ly);
    }
    reset();
  }

  void reset() {
    upload(x, hosts[0].x);
    for (int l = 0; l < layers; ++l) {
      const Host& h = hosts[l % hosts.size()];
      const Layer& ly = table[l];
      upload(ly.shift_att, h.shift_att);
      upload(ly.aa, h.aa);
      upload(ly.bb, h.bb);
      upload(ly.pp, h.pp);
      upload(ly.shift_ffn, h.shift_ffn);
    }
    // A copy from pageable memory may return before it lands, and the launches go on a
    // non-blocking stream that does not wait for it.
    cudaDeviceSynchronize();
  }

  // Layers first .. first + n - 1 as one launch.
  std::string run(cudaStream_t s, int first, int n, int window, int depth = 0) const {
    Args a{};
    a.depth = depth;
    a.x = x;
    a.layers = n;
    a.C = C;
    a.F = hosts[0].F;
    a.eps = 1e-5f;
    a.window = window;
    for (int i = 0; i < n; ++i) a.layer[i] = table[first + i];
    return B == 1 ? launch<1>(s, a) : launch<2>(s, a);
  }

  // One token through every layer, `per` layers a launch.
  std::string step(cudaStream_t s, int per, int window, int depth) const {
    for (int l = 0; l < layers; l += per) {
      std::string err = run(s, l, std::min(per, layers - l), window, depth);
      if (!err.empty()) return err;
    }
    return "";
  }

  std::vector<float> state(int l) const {
    std::vector<float> v(5 * B * C);
    cudaMemcpy(v.data(), table[l].shift_att, v.size() * sizeof(float), cudaMemcpyDeviceToHost);
    return v;
  }
};

// max |got - want| / max |want| (infinite where got is not finite), and the fraction of
// elements that differ beyond float noise. With the kernel's roundings matched, only the rare
// product whose float sum lands on the other side of a bf16 rounding boundary differs (by one
// bf16 ulp); a rounding missed or added shows in most elements.
[[maybe_unused]] std::pair<float, float> compare(const float* got, const float* want, size_t n) {
  float d = 0, m = 0;
  for (size_t i = 0; i < n; ++i) m = std::max(m, std::fabs(want[i]));
  size_t off = 0;
  for (size_t i = 0; i < n; ++i) {
    const float e = std::fabs(got[i] - want[i]);
    if (!std::isfinite(got[i])) return {INFINITY, 1.f};
    d = std::max(d, e);
    off += e > 1e-4f * std::max(std::fabs(want[i]), 1e-3f * m);
  }
  return {d / std::max(m, 1e-30f), (float)off / n};
}

// Prints "WHAT x MAX_ERROR FRACTION_OFF shift_att ..." for x and the states of `layers`
// against the reference's, which starts from the host layers' x and runs them in turn.
[[maybe_unused]] void check(const char* what, const Model& m, int layers) {
  const int B = m.B, C = m.C;
  std::vector<float> x_ref = m.hosts[0].x, state_ref, x(B * C);
  std::vector<std::vector<float>> states;
  for (int l = 0; l < layers; ++l) {
    Host h = m.hosts[l % m.hosts.size()];
    h.x = x_ref;
    reference(h, x_ref, state_ref);
    states.push_back(state_ref);
  }
  cudaMemcpy(x.data(), m.x, B * C * sizeof(float), cudaMemcpyDeviceToHost);
  const char* names[5] = {"shift_att", "aa", "bb", "pp", "shift_ffn"};
  auto [e, off] = compare(x.data(), x_ref.data(), B * C);
  printf("%s x %.2e %.4f", what, e, off);
  for (int k = 0; k < 5; ++k) {
    float ek = 0, offk = 0;
    for (int l = 0; l < layers; ++l) {
      const std::vector<float> got = m.state(l);
      auto [el, offl] = compare(&got[k * B * C], &states[l][k * B * C], B * C);
      ek = std::max(ek, el);
      offk = std::max(offk, offl);
    }
    printf(" %s %.2e %.4f", names[k], ek, offk);
  }
  printf("\n");
}

}  // namespace

// decode_block C F rows [window [layers_per_launch [depth]]]: a model of 32 layers, one token a
// step; depth caps the ring's stages (0: as many as fit).
// Prints "check ..." (one layer from the host inputs, against the reference),
// "check_chain ..." (one launch of the first 4 layers), "us_per_block ..." (10 steps of 32
// layers in one CUDA graph, best of 5), and with RWKV_TRACE "trace ..." lines (the second layer
// of a launch, where it has two).
int main(int argc, char** argv) {
  if (argc < 4 || argc > 7) {
    fprintf(stderr, "usage: %s C F rows [window_stages [layers_per_launch [depth]]]\n", argv[0]);
    return 2;
  }
  const int C = atoi(argv[1]), F = atoi(argv[2]), B = atoi(argv[3]);
  const int window = argc >= 5 ? atoi(argv[4]) : 0;
  const int LAYERS = 32, STEPS = 10, CHAIN = 4;
  const int per = argc >= 6 ? atoi(argv[5]) : 1;
  const int depth = argc >= 7 ? atoi(argv[6]) : 0;
  if (C % 8 || F % 8 || C > kMaxC || F > kMaxF || B < 1 || B > 2 || per < 1 ||
      per > kMaxLayers) {
    fprintf(stderr, "C and F must be multiples of 8, C <= %d, F <= %d, rows 1 or 2, layers a "
            "launch 1..%d\n", kMaxC, kMaxF, kMaxLayers);
    return 2;
  }
  srand(1);
  std::vector<Host> hosts;
  for (int l = 0; l < 4; ++l) hosts.push_back(random_layer(B, C, F));
  Model model(hosts, LAYERS);
  cudaStream_t s;
  cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking);
  auto fail = [](const char* what, cudaError_t e) {
    if (e != cudaSuccess) {
      printf("error %s: %s\n", what, cudaGetErrorString(e));
      exit(1);
    }
  };
  auto checked = [&](const std::string& err) {
    if (!err.empty()) {
      printf("error %s\n", err.c_str());
      exit(1);
    }
    fail("launch", cudaStreamSynchronize(s));
  };
  // Checks: one layer alone, then a launch of several (the exchange between layers).
  auto checks = [&]() {
    model.reset();
    checked(model.run(s, 0, 1, window, depth));
#ifndef RWKV_NOCOMPUTE
    check("check", model, 1);
#endif
    model.reset();
    checked(model.run(s, 0, CHAIN, window, depth));
#ifndef RWKV_NOCOMPUTE
    check("check_chain", model, CHAIN);
#endif
    model.reset();
  };
  checks();
  cudaGraph_t graph;
  cudaGraphExec_t exec;
  fail("capture", cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal));
  for (int t = 0; t < STEPS; ++t) {
    std::string err = model.step(s, per, window, depth);
    if (!err.empty()) {
      printf("error %s\n", err.c_str());
      return 1;
    }
  }
  fail("end capture", cudaStreamEndCapture(s, &graph));
  fail("instantiate", cudaGraphInstantiate(&exec, graph, 0));
  cudaEvent_t e0, e1;
  cudaEventCreate(&e0);
  cudaEventCreate(&e1);
  fail("graph", cudaGraphLaunch(exec, s));
  fail("graph", cudaStreamSynchronize(s));
  float best = 1e30f;
  for (int r = 0; r < 5; ++r) {
    model.reset();  // x and the states stay those of a few tokens
    cudaEventRecord(e0, s);
    fail("graph", cudaGraphLaunch(exec, s));
    cudaEventRecord(e1, s);
    fail("graph", cudaEventSynchronize(e1));
    float ms;
    cudaEventElapsedTime(&ms, e0, e1);
    best = std::min(best, ms);
  }
  checks();  // after thousands of launches: the epochs and exchange words still hold
  printf("us_per_block %.2f\n", best * 1e3 / (STEPS * LAYERS));
#ifdef RWKV_TRACE
  checked(model.run(s, 0, std::min(per, LAYERS), window, depth));
  static unsigned long long tr[1024][14];
  cudaMemcpyFromSymbol(tr, g_trace, sizeof(tr));
  int sms;
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0);
  unsigned long long t0 = ~0ull;
  for (int c = 0; c < sms; ++c) t0 = std::min(t0, tr[c][0]);
  const char* names[14] = {"start", "LN1_done", "p0_consumed", "g_gathered",
                           "p1_consumed", "x2_gathered_LN2_done", nullptr, "p2_consumed",
                           "h_gathered", "p3_consumed", "producer_p0_issued",
                           "producer_p1_issued", "producer_p2_issued", "producer_p3_issued"};
  for (int i = 0; i < 14; ++i) {
    if (!names[i]) continue;
    double lo = 1e30, hi = -1e30, sum = 0;
    for (int c = 0; c < sms; ++c) {
      // Signed: where the ring holds more than a phase, the producer issues this layer's
      // stages before the first CTA begins the layer.
      const double v = (double)(long long)(tr[c][i] - t0) / 1e3;
      lo = std::min(lo, v);
      hi = std::max(hi, v);
      sum += v;
    }
    printf("trace %s %.2f %.2f %.2f\n", names[i], lo, sum / sms, hi);
  }
#endif
  return 0;
}
