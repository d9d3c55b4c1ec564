// The CUDA decode block (decode4_block.cuh) as an XLA FFI handler: rwkv_jax.ops.cuda.decode4
// builds this file into a shared library with nvcc on first use and registers the handler with
// jax.ffi. Command-buffer compatible, so XLA records it into the decode loop's CUDA graph.

#include <cstdint>
#include <string>
#include <utility>

#include "decode4_block.cuh"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using namespace rwkv_decode4;

ffi::Error bad(const std::string& what) {
  return ffi::Error(ffi::ErrorCode::kInvalidArgument, "rwkv4 CUDA decode block: " + what);
}

ffi::Error Decode4Block(cudaStream_t stream, ffi::Buffer<ffi::F32> x,
                        ffi::Buffer<ffi::F32> shift_att, ffi::Buffer<ffi::F32> aa,
                        ffi::Buffer<ffi::F32> bb, ffi::Buffer<ffi::F32> pp,
                        ffi::Buffer<ffi::F32> shift_ffn, ffi::Buffer<ffi::F32> vecs,
                        ffi::Buffer<ffi::BF16> w_kvr, ffi::Buffer<ffi::BF16> w_o,
                        ffi::Buffer<ffi::BF16> w_kr, ffi::Buffer<ffi::BF16> w_v, float eps,
                        ffi::ResultBuffer<ffi::F32> x_out,
                        ffi::ResultBuffer<ffi::F32> shift_att_out,
                        ffi::ResultBuffer<ffi::F32> aa_out, ffi::ResultBuffer<ffi::F32> bb_out,
                        ffi::ResultBuffer<ffi::F32> pp_out,
                        ffi::ResultBuffer<ffi::F32> shift_ffn_out) {
  auto xd = x.dimensions();
  if (xd.size() != 2) return bad("x must be (rows, C)");
  const int64_t B = xd[0], C = xd[1];
  auto vd = w_v.dimensions();
  if (vd.size() != 2 || vd[0] != C) return bad("w_v must be (C, F)");
  const int64_t F = vd[1];
  if (B < 1 || B > 2) return bad("rows must be 1 or 2, got " + std::to_string(B));
  if (C < 8 || F < 8 || C % 8 || F % 8 || C > kMaxC || F > kMaxF)
    return bad("C and F must be multiples of 8, 8 <= C <= " + std::to_string(kMaxC) +
               ", 8 <= F <= " + std::to_string(kMaxF) + "; got " + std::to_string(C) + ", " +
               std::to_string(F));
  const std::pair<const char*, std::pair<size_t, int64_t>> sizes[] = {
      {"w_kvr", {w_kvr.element_count(), 3 * C * C}},
      {"w_o", {w_o.element_count(), C * C}},
      {"w_kr", {w_kr.element_count(), (F + C) * C}},
      {"vecs", {vecs.element_count(), NVEC * C}},
      {"shift_att", {shift_att.element_count(), B * C}},
      {"aa", {aa.element_count(), B * C}},
      {"bb", {bb.element_count(), B * C}},
      {"pp", {pp.element_count(), B * C}},
      {"shift_ffn", {shift_ffn.element_count(), B * C}},
      {"x_out", {x_out->element_count(), B * C}},
      {"shift_att_out", {shift_att_out->element_count(), B * C}},
      {"aa_out", {aa_out->element_count(), B * C}},
      {"bb_out", {bb_out->element_count(), B * C}},
      {"pp_out", {pp_out->element_count(), B * C}},
      {"shift_ffn_out", {shift_ffn_out->element_count(), B * C}}};
  for (const auto& [name, got_want] : sizes)
    if ((int64_t)got_want.first != got_want.second)
      return bad(std::string(name) + " has " + std::to_string(got_want.first) +
                 " elements; x (" + std::to_string(B) + ", " + std::to_string(C) +
                 ") and w_v (C, " + std::to_string(F) + ") need " +
                 std::to_string(got_want.second));
  Args a{};
  a.x = x.typed_data();
  a.shift_att = shift_att.typed_data();
  a.aa = aa.typed_data();
  a.bb = bb.typed_data();
  a.pp = pp.typed_data();
  a.shift_ffn = shift_ffn.typed_data();
  a.vecs = vecs.typed_data();
  a.w_kvr = reinterpret_cast<const bf16*>(w_kvr.typed_data());
  a.w_o = reinterpret_cast<const bf16*>(w_o.typed_data());
  a.w_kr = reinterpret_cast<const bf16*>(w_kr.typed_data());
  a.w_v = reinterpret_cast<const bf16*>(w_v.typed_data());
  a.x_out = x_out->typed_data();
  a.shift_att_out = shift_att_out->typed_data();
  a.aa_out = aa_out->typed_data();
  a.bb_out = bb_out->typed_data();
  a.pp_out = pp_out->typed_data();
  a.shift_ffn_out = shift_ffn_out->typed_data();
  a.C = (int)C;
  a.F = (int)F;
  a.eps = eps;
  a.window = kWindow;
  const std::string err = B == 1 ? launch<1>(stream, a) : launch<2>(stream, a);
  if (!err.empty())
    return ffi::Error(ffi::ErrorCode::kInternal, "rwkv4 CUDA decode block: " + err);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(RwkvDecode4Block, Decode4Block,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // x
                                  .Arg<ffi::Buffer<ffi::F32>>()   // shift_att
                                  .Arg<ffi::Buffer<ffi::F32>>()   // aa
                                  .Arg<ffi::Buffer<ffi::F32>>()   // bb
                                  .Arg<ffi::Buffer<ffi::F32>>()   // pp
                                  .Arg<ffi::Buffer<ffi::F32>>()   // shift_ffn
                                  .Arg<ffi::Buffer<ffi::F32>>()   // vecs (NVEC, C)
                                  .Arg<ffi::Buffer<ffi::BF16>>()  // w_kvr (3C, C)
                                  .Arg<ffi::Buffer<ffi::BF16>>()  // w_o (C, C)
                                  .Arg<ffi::Buffer<ffi::BF16>>()  // w_kr (F + C, C)
                                  .Arg<ffi::Buffer<ffi::BF16>>()  // w_v (C, F)
                                  .Attr<float>("eps")
                                  .Ret<ffi::Buffer<ffi::F32>>()   // x
                                  .Ret<ffi::Buffer<ffi::F32>>()   // shift_att
                                  .Ret<ffi::Buffer<ffi::F32>>()   // aa
                                  .Ret<ffi::Buffer<ffi::F32>>()   // bb
                                  .Ret<ffi::Buffer<ffi::F32>>()   // pp
                                  .Ret<ffi::Buffer<ffi::F32>>(),  // shift_ffn
                              {ffi::Traits::kCmdBufferCompatible});
