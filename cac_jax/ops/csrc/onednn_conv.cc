// XLA FFI handlers running 2D NHWC convolutions through oneDNN on the CPU: the forward pass, the
// input gradient and the weight gradient, in float32 and in bfloat16 (docs/onednn.md). The
// bfloat16 handlers take and return bfloat16 tensors (oneDNN accumulates in float32); the Python
// side uses them only where `cac_onednn_bf16_native` says the CPU computes in bfloat16.
//
// Layouts: activations NHWC (JAX's), kernels HWIO (flax's). oneDNN is asked for the activations in
// NHWC (no reorder of the large tensors) and picks its own blocked layout for the kernel
// (`format_tag::any`); the kernel is reordered from/to HWIO on every call (it is small).
// Primitives are created once per shape and kept in a process-wide cache. Scratchpads are owned
// by the caller (`scratchpad_mode::user`, one growing buffer per calling thread), so concurrent
// calls from several XLA threads (pmap over host devices) never share memory.
// oneDNN's CPU runtime here is OpenMP (the PyPI `onednn-cpu-gomp` build): the team size follows
// `cac_onednn_set_num_threads`, which the Python side sets to the cores the process may use.

#include <omp.h>

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;
using tag = dnnl::memory::format_tag;
using dt = dnnl::memory::data_type;

namespace {

std::atomic<int> g_num_threads{0};  // 0: leave OpenMP's default

dnnl::engine& cpu_engine() {
  static dnnl::engine eng(dnnl::engine::kind::cpu, 0);
  return eng;
}

void apply_threads() {
  thread_local int applied = -1;
  int want = g_num_threads.load(std::memory_order_relaxed);
  if (want > 0 && want != applied) {
    omp_set_num_threads(want);
    applied = want;
  }
}

// A 64-byte aligned, growing buffer owned by one thread.
struct ThreadBuffer {
  void* ptr = nullptr;
  size_t size = 0;
  void* get(size_t bytes) {
    if (bytes > size) {
      std::free(ptr);
      size_t rounded = (bytes + 63) / 64 * 64;
      ptr = std::aligned_alloc(64, rounded);
      size = ptr ? rounded : 0;
    }
    return ptr;
  }
  ~ThreadBuffer() { std::free(ptr); }
};

struct Geometry {
  int64_t n, h, w, c, o, kh, kw, oh, ow, sh, sw, pt, pb, pl, pr;
  dt type = dt::f32;  // of every tensor: activations, kernel and their gradients
  auto key() const {
    return std::make_tuple(static_cast<int64_t>(type), n, h, w, c, o, kh, kw, oh, ow, sh, sw, pt,
                           pb, pl, pr);
  }
  memory::desc src() const { return memory::desc({n, c, h, w}, type, tag::nhwc); }
  memory::desc dst() const { return memory::desc({n, o, oh, ow}, type, tag::nhwc); }
  memory::desc wei_any() const { return memory::desc({o, c, kh, kw}, type, tag::any); }
  memory::desc wei_hwio() const { return memory::desc({o, c, kh, kw}, type, tag::hwio); }
  memory::dims strides() const { return {sh, sw}; }
  memory::dims pad_l() const { return {pt, pl}; }
  memory::dims pad_r() const { return {pb, pr}; }
};

dnnl::primitive_attr user_scratchpad() {
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  return attr;
}

dnnl::convolution_forward::primitive_desc forward_pd(const Geometry& g, dnnl::prop_kind prop) {
  return dnnl::convolution_forward::primitive_desc(
      cpu_engine(), prop, dnnl::algorithm::convolution_direct, g.src(), g.wei_any(), g.dst(),
      g.strides(), g.pad_l(), g.pad_r(), user_scratchpad());
}

// One cached convolution: the primitive, the kernel layout it wants, and the reorder between
// that layout and HWIO (empty when they are the same).
struct Entry {
  dnnl::primitive prim;
  memory::desc wei_md;
  memory::desc scratch_md;
  bool needs_reorder = false;
  dnnl::reorder reorder;
};

enum class Kind { kForward, kBackwardData, kBackwardWeights };

Entry build(Kind kind, const Geometry& g) {
  Entry e;
  auto& eng = cpu_engine();
  if (kind == Kind::kForward) {
    auto pd = forward_pd(g, dnnl::prop_kind::forward_inference);
    e.prim = dnnl::convolution_forward(pd);
    e.wei_md = pd.weights_desc();
    e.scratch_md = pd.scratchpad_desc();
  } else if (kind == Kind::kBackwardData) {
    auto hint = forward_pd(g, dnnl::prop_kind::forward_training);
    auto pd = dnnl::convolution_backward_data::primitive_desc(
        eng, dnnl::algorithm::convolution_direct, g.src(), g.wei_any(), g.dst(), g.strides(),
        g.pad_l(), g.pad_r(), hint, user_scratchpad());
    e.prim = dnnl::convolution_backward_data(pd);
    e.wei_md = pd.weights_desc();
    e.scratch_md = pd.scratchpad_desc();
  } else {
    auto hint = forward_pd(g, dnnl::prop_kind::forward_training);
    auto pd = dnnl::convolution_backward_weights::primitive_desc(
        eng, dnnl::algorithm::convolution_direct, g.src(), g.wei_any(), g.dst(), g.strides(),
        g.pad_l(), g.pad_r(), hint, user_scratchpad());
    e.prim = dnnl::convolution_backward_weights(pd);
    e.wei_md = pd.diff_weights_desc();
    e.scratch_md = pd.scratchpad_desc();
  }
  e.needs_reorder = e.wei_md != g.wei_hwio();
  if (e.needs_reorder) {
    e.reorder = kind == Kind::kBackwardWeights
                    ? dnnl::reorder(dnnl::reorder::primitive_desc(eng, e.wei_md, eng, g.wei_hwio()))
                    : dnnl::reorder(dnnl::reorder::primitive_desc(eng, g.wei_hwio(), eng, e.wei_md));
  }
  return e;
}

const Entry& lookup(Kind kind, const Geometry& g) {
  static std::mutex mu;
  static std::map<std::tuple<int, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                             int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                             int64_t, int64_t>,
                  std::unique_ptr<Entry>>
      cache;
  auto key = std::tuple_cat(std::make_tuple(static_cast<int>(kind)), g.key());
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache.find(key);
  if (it == cache.end()) {
    it = cache.emplace(key, std::make_unique<Entry>(build(kind, g))).first;
  }
  return *it->second;  // entries are never erased, so the reference stays valid
}

// Runs one convolution. `act` is the NHWC tensor on the src side (x, or dx for the input
// gradient), `out` the one on the dst side (y or dy), `wei` the HWIO kernel (or its gradient).
void run(Kind kind, const Geometry& g, void* act, void* out, void* wei) {
  apply_threads();
  const Entry& e = lookup(kind, g);
  auto& eng = cpu_engine();
  thread_local dnnl::stream stream(cpu_engine());
  thread_local ThreadBuffer scratch_buf, wei_buf;
  memory act_mem(g.src(), eng, act);
  memory out_mem(g.dst(), eng, out);
  memory user_wei(g.wei_hwio(), eng, wei);
  memory wei_mem = e.needs_reorder ? memory(e.wei_md, eng, wei_buf.get(e.wei_md.get_size()))
                                   : user_wei;
  memory scratch(e.scratch_md, eng, scratch_buf.get(std::max<size_t>(e.scratch_md.get_size(), 1)));
  if (kind != Kind::kBackwardWeights && e.needs_reorder) {
    e.reorder.execute(stream, user_wei, wei_mem);
  }
  if (kind == Kind::kForward) {
    e.prim.execute(stream, {{DNNL_ARG_SRC, act_mem}, {DNNL_ARG_WEIGHTS, wei_mem},
                            {DNNL_ARG_DST, out_mem}, {DNNL_ARG_SCRATCHPAD, scratch}});
  } else if (kind == Kind::kBackwardData) {
    e.prim.execute(stream, {{DNNL_ARG_DIFF_SRC, act_mem}, {DNNL_ARG_WEIGHTS, wei_mem},
                            {DNNL_ARG_DIFF_DST, out_mem}, {DNNL_ARG_SCRATCHPAD, scratch}});
  } else {
    e.prim.execute(stream, {{DNNL_ARG_SRC, act_mem}, {DNNL_ARG_DIFF_WEIGHTS, wei_mem},
                            {DNNL_ARG_DIFF_DST, out_mem}, {DNNL_ARG_SCRATCHPAD, scratch}});
    if (e.needs_reorder) e.reorder.execute(stream, wei_mem, user_wei);
  }
  stream.wait();
}

using Dims = ffi::Buffer<ffi::F32, 4>::Dimensions;

Geometry geometry(Dims act, Dims out, Dims wei, int64_t sh, int64_t sw, int64_t pt, int64_t pb,
                  int64_t pl, int64_t pr, dt type) {
  return Geometry{act[0], act[1], act[2], act[3], wei[3], wei[0], wei[1], out[1], out[2],
                  sh, sw, pt, pb, pl, pr, type};
}

// oneDNN's data type for an XLA FFI element type (the two this extension handles).
template <ffi::DataType T>
constexpr dt onednn_type() {
  static_assert(T == ffi::F32 || T == ffi::BF16, "float32 or bfloat16 only");
  return T == ffi::F32 ? dt::f32 : dt::bf16;
}

ffi::Error checked(Kind kind, const Geometry& g, void* act, void* out, void* wei) {
  if (g.n == 0 || g.o == 0 || g.c == 0) return ffi::Error::Success();
  try {
    run(kind, g, act, out, wei);
  } catch (const dnnl::error& err) {
    return ffi::Error::Internal(std::string("oneDNN convolution failed: ") + err.what());
  }
  return ffi::Error::Success();
}

template <ffi::DataType T>
using In = ffi::Buffer<T, 4>;
template <ffi::DataType T>
using Out = ffi::ResultBuffer<T, 4>;

template <ffi::DataType T>
ffi::Error Forward(In<T> x, In<T> w, Out<T> y, int64_t sh, int64_t sw, int64_t pt, int64_t pb,
                   int64_t pl, int64_t pr) {
  Geometry g = geometry(x.dimensions(), y->dimensions(), w.dimensions(), sh, sw, pt, pb, pl, pr,
                        onednn_type<T>());
  return checked(Kind::kForward, g, x.untyped_data(), y->untyped_data(), w.untyped_data());
}

template <ffi::DataType T>
ffi::Error BackwardData(In<T> dy, In<T> w, Out<T> dx, int64_t sh, int64_t sw, int64_t pt,
                        int64_t pb, int64_t pl, int64_t pr) {
  Geometry g = geometry(dx->dimensions(), dy.dimensions(), w.dimensions(), sh, sw, pt, pb, pl, pr,
                        onednn_type<T>());
  return checked(Kind::kBackwardData, g, dx->untyped_data(), dy.untyped_data(), w.untyped_data());
}

template <ffi::DataType T>
ffi::Error BackwardWeights(In<T> x, In<T> dy, Out<T> dw, int64_t sh, int64_t sw, int64_t pt,
                           int64_t pb, int64_t pl, int64_t pr) {
  Geometry g = geometry(x.dimensions(), dy.dimensions(), dw->dimensions(), sh, sw, pt, pb, pl, pr,
                        onednn_type<T>());
  return checked(Kind::kBackwardWeights, g, x.untyped_data(), dy.untyped_data(),
                 dw->untyped_data());
}

template <ffi::DataType T>
auto binding() {
  return ffi::Ffi::Bind().template Arg<In<T>>().template Arg<In<T>>().template Ret<In<T>>();
}

template <typename B>
auto with_attrs(B binding) {
  return std::move(binding).template Attr<int64_t>("stride_h")
      .template Attr<int64_t>("stride_w")
      .template Attr<int64_t>("pad_top")
      .template Attr<int64_t>("pad_bottom")
      .template Attr<int64_t>("pad_left")
      .template Attr<int64_t>("pad_right");
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(CacOnednnConvForward, Forward<ffi::F32>,
                              with_attrs(binding<ffi::F32>()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(CacOnednnConvBackwardData, BackwardData<ffi::F32>,
                              with_attrs(binding<ffi::F32>()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(CacOnednnConvBackwardWeights, BackwardWeights<ffi::F32>,
                              with_attrs(binding<ffi::F32>()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(CacOnednnConvForwardBf16, Forward<ffi::BF16>,
                              with_attrs(binding<ffi::BF16>()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(CacOnednnConvBackwardDataBf16, BackwardData<ffi::BF16>,
                              with_attrs(binding<ffi::BF16>()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(CacOnednnConvBackwardWeightsBf16, BackwardWeights<ffi::BF16>,
                              with_attrs(binding<ffi::BF16>()));

extern "C" {
// Sets oneDNN's OpenMP team size for every later call (from any thread); 0 keeps the default.
void cac_onednn_set_num_threads(int n) { g_num_threads.store(n, std::memory_order_relaxed); }
// 1 where oneDNN computes bfloat16 convolutions with the CPU's own bfloat16 instructions
// (AVX512-BF16, AMX or AVX2-VNNI-2) and builds the three primitives for one; 0 otherwise (older
// CPUs would emulate bfloat16, slower than float32: the Python side keeps XLA there).
int cac_onednn_bf16_native() {
  const int isa = static_cast<int>(dnnl::get_effective_cpu_isa());
  const bool native = (isa & dnnl_cpu_isa_avx512_core_bf16) == dnnl_cpu_isa_avx512_core_bf16 ||
                      (isa & dnnl_cpu_isa_avx2_vnni_2) == dnnl_cpu_isa_avx2_vnni_2;
  if (!native) return 0;
  try {
    Geometry g{1, 4, 4, 8, 8, 3, 3, 4, 4, 1, 1, 1, 1, 1, 1, dt::bf16};
    build(Kind::kForward, g);
    build(Kind::kBackwardData, g);
    build(Kind::kBackwardWeights, g);
  } catch (const dnnl::error&) {
    return 0;
  }
  return 1;
}
// oneDNN's version as major * 10000 + minor * 100 + patch (reported by the Python side).
int cac_onednn_version() {
  const dnnl_version_t* v = dnnl_version();
  return v->major * 10000 + v->minor * 100 + v->patch;
}
}
