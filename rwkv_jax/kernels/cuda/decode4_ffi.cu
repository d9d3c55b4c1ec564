// The CUDA decode kernel (decode4_block.cuh) as an XLA FFI handler: rwkv_jax.kernels.cuda.decode4
// builds this file into a shared library with nvcc on first use and registers the handler with
// jax.ffi. Command-buffer compatible, so XLA records it into the decode loop's CUDA graph.
//
// Operands: x (B, C), then for each layer shift_att, aa, bb, pp, shift_ffn (B, C) float32,
// vecs (NVEC, C) float32, w_kvr (3C, C), w_o (C, C), w_kr (F + C, C), w_v (C, F) bf16.
// Results: x, then each layer's five state arrays, which the caller aliases to the operands
// (input_output_aliases): the kernel updates them in place.

#include <cstdint>
#include <string>
#include <utility>

#include "decode4_block.cuh"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using namespace rwkv_decode4;

constexpr int kPerLayerIn = 10, kPerLayerOut = 5;

ffi::Error bad(const std::string& what) {
  return ffi::Error(ffi::ErrorCode::kInvalidArgument, "rwkv4 CUDA decode kernel: " + what);
}

// The result's buffer holding the operand's values: the operand's own when XLA aliased them
// (always, with input_output_aliases), else a copy made on the stream.
template <typename In, typename Out>
float* in_place(cudaStream_t stream, const In& in, Out& out, size_t n, std::string& err) {
  float* dst = out->typed_data();
  const float* src = in.typed_data();
  if (dst != src) {
    cudaError_t e = cudaMemcpyAsync(dst, src, n * sizeof(float), cudaMemcpyDeviceToDevice, stream);
    if (e != cudaSuccess) err = cuda_error("copy", e);
  }
  return dst;
}

ffi::Error Decode4Layers(cudaStream_t stream, ffi::Buffer<ffi::F32> x, ffi::RemainingArgs args,
                         float eps, ffi::ResultBuffer<ffi::F32> x_out,
                         ffi::RemainingRets rets) {
  auto xd = x.dimensions();
  if (xd.size() != 2) return bad("x must be (rows, C)");
  const int64_t B = xd[0], C = xd[1];
  if (args.size() % kPerLayerIn || args.size() == 0)
    return bad("expected 10 operands a layer after x, got " + std::to_string(args.size()));
  const int64_t L = args.size() / kPerLayerIn;
  if (L > kMaxLayers)
    return bad(std::to_string(L) + " layers in one call; at most " + std::to_string(kMaxLayers));
  if ((int64_t)rets.size() != kPerLayerOut * L)
    return bad("expected 5 results a layer after x, got " + std::to_string(rets.size()));
  if (B < 1 || B > 2) return bad("rows must be 1 or 2, got " + std::to_string(B));
  auto w_v0 = args.get<ffi::Buffer<ffi::BF16>>(9);
  if (!w_v0.has_error() && w_v0->dimensions().size() != 2) return bad("w_v must be (C, F)");
  if (w_v0.has_error()) return w_v0.error();
  const int64_t F = w_v0->dimensions()[1];
  if (C < 8 || F < 8 || C % 8 || F % 8 || C > kMaxC || F > kMaxF)
    return bad("C and F must be multiples of 8, 8 <= C <= " + std::to_string(kMaxC) +
               ", 8 <= F <= " + std::to_string(kMaxF) + "; got " + std::to_string(C) + ", " +
               std::to_string(F));
  const int64_t want[kPerLayerIn] = {B * C, B * C, B * C, B * C, B * C, NVEC * C,
                                     3 * C * C, C * C, (F + C) * C, C * F};
  const char* names[kPerLayerIn] = {"shift_att", "aa", "bb", "pp", "shift_ffn",
                                    "vecs", "w_kvr", "w_o", "w_kr", "w_v"};
  auto wrong = [&](int64_t l, int k, size_t got) {
    return bad("layer " + std::to_string(l) + "'s " + names[k] + " has " + std::to_string(got) +
               " elements; x (" + std::to_string(B) + ", " + std::to_string(C) +
               ") and w_v (C, " + std::to_string(F) + ") need " + std::to_string(want[k]));
  };
  if (x_out->element_count() != (size_t)(B * C)) return bad("the x result is not (rows, C)");
  Args a{};
  std::string err;
  a.x = in_place(stream, x, x_out, B * C, err);
  float* Layer::*states[kPerLayerOut] = {&Layer::shift_att, &Layer::aa, &Layer::bb, &Layer::pp,
                                         &Layer::shift_ffn};
  const bf16* Layer::*mats[4] = {&Layer::w_kvr, &Layer::w_o, &Layer::w_kr, &Layer::w_v};
  for (int64_t l = 0; l < L; ++l) {
    Layer& ly = a.layer[l];
    for (int k = 0; k < kPerLayerOut; ++k) {
      auto in = args.get<ffi::Buffer<ffi::F32>>(l * kPerLayerIn + k);
      auto out = rets.get<ffi::Buffer<ffi::F32>>(l * kPerLayerOut + k);
      if (in.has_error()) return in.error();
      if (out.has_error()) return out.error();
      if (in->element_count() != (size_t)want[k]) return wrong(l, k, in->element_count());
      if ((*out)->element_count() != (size_t)want[k]) return wrong(l, k, (*out)->element_count());
      ly.*states[k] = in_place(stream, *in, *out, want[k], err);
    }
    auto vecs = args.get<ffi::Buffer<ffi::F32>>(l * kPerLayerIn + 5);
    if (vecs.has_error()) return vecs.error();
    if (vecs->element_count() != (size_t)want[5]) return wrong(l, 5, vecs->element_count());
    ly.vecs = vecs->typed_data();
    for (int k = 0; k < 4; ++k) {
      auto w = args.get<ffi::Buffer<ffi::BF16>>(l * kPerLayerIn + 6 + k);
      if (w.has_error()) return w.error();
      if (w->element_count() != (size_t)want[6 + k]) return wrong(l, 6 + k, w->element_count());
      ly.*mats[k] = reinterpret_cast<const bf16*>(w->typed_data());
    }
  }
  if (!err.empty()) return ffi::Error(ffi::ErrorCode::kInternal, "rwkv4 CUDA decode kernel: " + err);
  a.layers = (int)L;
  a.C = (int)C;
  a.F = (int)F;
  a.eps = eps;
  a.window = kWindow;
  err = B == 1 ? launch<1>(stream, a) : launch<2>(stream, a);
  if (!err.empty())
    return ffi::Error(ffi::ErrorCode::kInternal, "rwkv4 CUDA decode kernel: " + err);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(RwkvDecode4Layers, Decode4Layers,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .RemainingArgs()               // 10 a layer
                                  .Attr<float>("eps")
                                  .Ret<ffi::Buffer<ffi::F32>>()  // x
                                  .RemainingRets(),              // 5 a layer
                              {ffi::Traits::kCmdBufferCompatible});
