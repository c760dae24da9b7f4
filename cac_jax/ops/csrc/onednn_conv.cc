// XLA FFI handlers running 2D NHWC convolutions through oneDNN on the CPU: the forward pass, the
// input gradient and the weight gradient, in float32 and in bfloat16 (docs/onednn.md). The
// bfloat16 handlers take and return bfloat16 tensors (oneDNN accumulates in float32); the Python
// side uses them only where `cac_onednn_bf16_native` says the CPU computes in bfloat16.
//
// Layouts: activations NHWC (JAX's), kernels HWIO (flax's). oneDNN is asked for the activations in
// NHWC (no reorder of the large tensors) and picks its own blocked layout for the kernel
// (`format_tag::any`); the kernel is reordered from/to HWIO on every call (it is small). The weight
// gradient runs on oneDNN's blocked activation layout (x and dy reordered on every call into
// per-thread buffers) where oneDNN's NHWC kernel for it is not a brgemm one (every shape on CPUs
// without AVX-512), up to several times faster there.
// Primitives are created once per shape and kept in a process-wide cache. Scratchpads and the
// reordered tensors are owned by the calling thread (`scratchpad_mode::user` for the
// convolutions, growing buffers), so concurrent calls from several XLA threads (pmap over host
// devices) do not share them.
//
// A fourth handler runs the 3x3, stride-1, padding-1 float32 convolution by Winograd's minimal
// filtering algorithm F(2x2, 3x3) (Lavin & Gray 2016): each 4x4 input tile and the kernel are
// transformed, multiplied per transformed position (16 matrix products over the channels,
// oneDNN's sgemm) and transformed back to a 2x2 output tile: 16 multiplications per output pair of
// channels where the direct algorithm takes 36, at the cost of the transforms (memory-bound).
// Tiles are processed in blocks small enough for the caches, one block per thread at a time.
// oneDNN's CPU runtime here is OpenMP (the PyPI `onednn-cpu-gomp` build): the team size follows
// `cac_onednn_set_num_threads`, which the Python side sets to the cores the process may use.

#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <new>
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
  // Weight gradient only: the blocked layouts of x and dy it runs on (reordered from NHWC on
  // every call) where oneDNN has no NHWC kernel of its own for it (see `build`).
  bool blocked_acts = false;
  memory::desc act_md, out_md;
  dnnl::reorder act_reorder, out_reorder;
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
    // oneDNN's NHWC weight gradients are its brgemm kernels (AVX-512 CPUs). Where it has none
    // (AVX2: its `jit` kernel on NHWC runs at a third of its speed on its own blocked layout,
    // docs/onednn.md), let it choose the activations' layout and reorder x and dy to it.
    if (std::string(pd.impl_info_str()).find("brg") == std::string::npos) {
      memory::desc src_any({g.n, g.c, g.h, g.w}, g.type, tag::any);
      memory::desc dst_any({g.n, g.o, g.oh, g.ow}, g.type, tag::any);
      auto hint_any = dnnl::convolution_forward::primitive_desc(
          eng, dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct, src_any,
          g.wei_any(), dst_any, g.strides(), g.pad_l(), g.pad_r(), user_scratchpad());
      auto blocked = dnnl::convolution_backward_weights::primitive_desc(
          eng, dnnl::algorithm::convolution_direct, src_any, g.wei_any(), dst_any, g.strides(),
          g.pad_l(), g.pad_r(), hint_any, user_scratchpad());
      if (blocked.src_desc() != g.src() || blocked.diff_dst_desc() != g.dst()) {
        pd = blocked;
        e.blocked_acts = true;
        e.act_md = pd.src_desc();
        e.out_md = pd.diff_dst_desc();
        e.act_reorder = dnnl::reorder(dnnl::reorder::primitive_desc(eng, g.src(), eng, e.act_md));
        e.out_reorder = dnnl::reorder(dnnl::reorder::primitive_desc(eng, g.dst(), eng, e.out_md));
      }
    }
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
  void* wei_ptr = e.needs_reorder ? wei_buf.get(e.wei_md.get_size()) : wei;
  void* scratch_ptr = scratch_buf.get(std::max<size_t>(e.scratch_md.get_size(), 1));
  if (wei_ptr == nullptr || scratch_ptr == nullptr) throw std::bad_alloc();
  memory wei_mem = e.needs_reorder ? memory(e.wei_md, eng, wei_ptr) : user_wei;
  memory scratch(e.scratch_md, eng, scratch_ptr);
  if (kind != Kind::kBackwardWeights && e.needs_reorder) {
    e.reorder.execute(stream, user_wei, wei_mem);
  }
  if (kind == Kind::kForward) {
    e.prim.execute(stream, {{DNNL_ARG_SRC, act_mem}, {DNNL_ARG_WEIGHTS, wei_mem},
                            {DNNL_ARG_DST, out_mem}, {DNNL_ARG_SCRATCHPAD, scratch}});
  } else if (kind == Kind::kBackwardData) {
    e.prim.execute(stream, {{DNNL_ARG_DIFF_SRC, act_mem}, {DNNL_ARG_WEIGHTS, wei_mem},
                            {DNNL_ARG_DIFF_DST, out_mem}, {DNNL_ARG_SCRATCHPAD, scratch}});
  } else if (e.blocked_acts) {
    thread_local ThreadBuffer act_buf, out_buf;
    void* act_ptr = act_buf.get(e.act_md.get_size());
    void* out_ptr = out_buf.get(e.out_md.get_size());
    if (act_ptr == nullptr || out_ptr == nullptr) throw std::bad_alloc();
    memory act_blocked(e.act_md, eng, act_ptr), out_blocked(e.out_md, eng, out_ptr);
    e.act_reorder.execute(stream, act_mem, act_blocked);
    e.out_reorder.execute(stream, out_mem, out_blocked);
    e.prim.execute(stream, {{DNNL_ARG_SRC, act_blocked}, {DNNL_ARG_DIFF_WEIGHTS, wei_mem},
                            {DNNL_ARG_DIFF_DST, out_blocked}, {DNNL_ARG_SCRATCHPAD, scratch}});
    if (e.needs_reorder) e.reorder.execute(stream, wei_mem, user_wei);
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
  } catch (const std::bad_alloc&) {
    return ffi::Error::Internal("oneDNN convolution: out of memory");
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


// ---- Winograd F(2x2, 3x3): NHWC x, HWIO 3x3 kernel, stride 1, padding 1 on every side ----

// The transforms are compiled for AVX-512, AVX2 and the baseline; the loader picks the best the
// CPU has (GCC/Clang function multi-versioning, x86-64 only).
#if defined(__x86_64__)
#define CAC_VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define CAC_VECTOR_CLONES
#endif

// U[16][C][O] = G g G^T for every (input, output) channel pair; w is HWIO (3, 3, C, O).
CAC_VECTOR_CLONES void winograd_kernel(const float* __restrict__ w, float* __restrict__ u,
                                       int64_t c0, int64_t c1, int64_t C, int64_t O) {
  const int64_t co = C * O;
  for (int64_t c = c0; c < c1; ++c) {
    const float* g[3][3];
    for (int i = 0; i < 3; ++i)
      for (int j = 0; j < 3; ++j) g[i][j] = w + (i * 3 + j) * co + c * O;
#pragma omp simd
    for (int64_t o = 0; o < O; ++o) {
      float t[4][3];
      for (int j = 0; j < 3; ++j) {
        const float g0 = g[0][j][o], g1 = g[1][j][o], g2 = g[2][j][o];
        t[0][j] = g0;
        t[1][j] = 0.5f * (g0 + g1 + g2);
        t[2][j] = 0.5f * (g0 - g1 + g2);
        t[3][j] = g2;
      }
      for (int a = 0; a < 4; ++a) {
        float* row = u + a * 4 * co + c * O + o;
        row[0] = t[a][0];
        row[co] = 0.5f * (t[a][0] + t[a][1] + t[a][2]);
        row[2 * co] = 0.5f * (t[a][0] - t[a][1] + t[a][2]);
        row[3 * co] = t[a][2];
      }
    }
  }
}

struct Tiles {
  int64_t n, h, w, c, o, th, tw;  // tiles per image: th x tw (2x2 outputs each)
  int64_t count() const { return n * th * tw; }
};

// V[16][nb][C] = B^T d B for the 4x4 input tiles t0 .. t0 + nb (zeros outside the image).
CAC_VECTOR_CLONES void winograd_input(const float* __restrict__ x, float* __restrict__ v,
                                      const Tiles& s, int64_t t0, int64_t nb,
                                      const float* zeros) {
  const int64_t C = s.c;
  for (int64_t k = 0; k < nb; ++k) {
    const int64_t t = t0 + k, img = t / (s.th * s.tw), r = t % (s.th * s.tw);
    const int64_t y0 = 2 * (r / s.tw) - 1, x0 = 2 * (r % s.tw) - 1;
    const float* p[4][4];
    for (int i = 0; i < 4; ++i)
      for (int j = 0; j < 4; ++j) {
        const int64_t yy = y0 + i, xx = x0 + j;
        p[i][j] = (yy >= 0 && yy < s.h && xx >= 0 && xx < s.w)
                      ? x + ((img * s.h + yy) * s.w + xx) * C : zeros;
      }
    float* out = v + k * C;
    const int64_t stride = nb * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      float d[4][4], e[4][4];
      for (int i = 0; i < 4; ++i)
        for (int j = 0; j < 4; ++j) d[i][j] = p[i][j][c];
      for (int j = 0; j < 4; ++j) {
        e[0][j] = d[0][j] - d[2][j];
        e[1][j] = d[1][j] + d[2][j];
        e[2][j] = d[2][j] - d[1][j];
        e[3][j] = d[1][j] - d[3][j];
      }
      for (int i = 0; i < 4; ++i) {
        float* row = out + i * 4 * stride + c;
        row[0] = e[i][0] - e[i][2];
        row[stride] = e[i][1] + e[i][2];
        row[2 * stride] = e[i][2] - e[i][1];
        row[3 * stride] = e[i][1] - e[i][3];
      }
    }
  }
}

// y's 2x2 output tiles t0 .. t0 + nb = A^T m A from M[16][nb][O] (cropped at odd edges).
CAC_VECTOR_CLONES void winograd_output(const float* __restrict__ m, float* __restrict__ y,
                                       const Tiles& s, int64_t t0, int64_t nb) {
  const int64_t O = s.o, stride = nb * O;
  for (int64_t k = 0; k < nb; ++k) {
    const int64_t t = t0 + k, img = t / (s.th * s.tw), r = t % (s.th * s.tw);
    const int64_t y0 = 2 * (r / s.tw), x0 = 2 * (r % s.tw);
    const bool down = y0 + 1 < s.h, right = x0 + 1 < s.w;
    float* q00 = y + ((img * s.h + y0) * s.w + x0) * O;
    float* q01 = right ? q00 + O : q00;  // (the cut-off tile's pointers stay inside the image)
    float* q10 = down ? q00 + s.w * O : q00;
    float* q11 = down && right ? q10 + O : q00;
    const float* in = m + k * O;
#pragma omp simd
    for (int64_t o = 0; o < O; ++o) {
      float e[2][4];
      for (int b = 0; b < 4; ++b) {
        const float m0 = in[b * stride + o], m1 = in[(4 + b) * stride + o];
        const float m2 = in[(8 + b) * stride + o], m3 = in[(12 + b) * stride + o];
        e[0][b] = m0 + m1 + m2;
        e[1][b] = m1 - m2 - m3;
      }
      q00[o] = e[0][0] + e[0][1] + e[0][2];
      if (right) q01[o] = e[0][1] - e[0][2] - e[0][3];
      if (down) {
        q10[o] = e[1][0] + e[1][1] + e[1][2];
        if (right) q11[o] = e[1][1] - e[1][2] - e[1][3];
      }
    }
  }
}

// Tiles per block: the block's transformed inputs (16 x nb x C floats) about 2 MB, and at least
// two blocks per thread so the threads share the work.
int64_t winograd_block(const Tiles& s, int threads) {
  int64_t nb = std::clamp<int64_t>((int64_t{1} << 15) / std::max<int64_t>(s.c, 1), 16, 256);
  const int64_t per_thread = (s.count() + 2 * threads - 1) / (2 * threads);
  return std::max<int64_t>(1, std::min(nb, per_thread));
}

ffi::Error winograd_run(const float* x, const float* w, float* y, const Tiles& s) {
  apply_threads();
  const int threads = omp_get_max_threads();
  const int64_t tiles = s.count(), nb = winograd_block(s, threads);
  const int64_t blocks = (tiles + nb - 1) / nb;
  thread_local ThreadBuffer kernel_buf;
  float* u = static_cast<float*>(kernel_buf.get(sizeof(float) * 16 * s.c * s.o));
  if (u == nullptr) return ffi::Error::Internal("Winograd convolution: out of memory");
  std::atomic<int> failed{0};
#pragma omp parallel
  {
    const int64_t team = omp_get_num_threads(), id = omp_get_thread_num();
    const int64_t per = (s.c + team - 1) / team;
    winograd_kernel(w, u, std::min(s.c, id * per), std::min(s.c, (id + 1) * per), s.c, s.o);
#pragma omp barrier
    thread_local ThreadBuffer v_buf, m_buf, zero_buf;
    float* v = static_cast<float*>(v_buf.get(sizeof(float) * 16 * nb * s.c));
    float* m = static_cast<float*>(m_buf.get(sizeof(float) * 16 * nb * s.o));
    float* zeros = static_cast<float*>(zero_buf.get(sizeof(float) * s.c));
    if (v == nullptr || m == nullptr || zeros == nullptr) failed = 1;
    else std::fill(zeros, zeros + s.c, 0.0f);
#pragma omp for schedule(static)
    for (int64_t b = 0; b < blocks; ++b) {
      if (failed.load(std::memory_order_relaxed)) continue;
      const int64_t t0 = b * nb, count = std::min(nb, tiles - t0);
      winograd_input(x, v, s, t0, count, zeros);
      for (int a = 0; a < 16; ++a) {
        // Inside the parallel region oneDNN's sgemm runs on this thread alone (row-major).
        if (dnnl_sgemm('N', 'N', count, s.o, s.c, 1.0f, v + a * count * s.c, s.c,
                       u + a * s.c * s.o, s.o, 0.0f, m + a * count * s.o, s.o) != dnnl_success)
          failed = 2;
      }
      winograd_output(m, y, s, t0, count);
    }
  }
  if (failed == 1) return ffi::Error::Internal("Winograd convolution: out of memory");
  if (failed == 2) return ffi::Error::Internal("Winograd convolution: oneDNN sgemm failed");
  return ffi::Error::Success();
}

ffi::Error Winograd(In<ffi::F32> x, In<ffi::F32> w, Out<ffi::F32> y) {
  auto xd = x.dimensions(), wd = w.dimensions();
  if (wd[0] != 3 || wd[1] != 3 || wd[2] != xd[3] || y->dimensions()[1] != xd[1] ||
      y->dimensions()[2] != xd[2])
    return ffi::Error::InvalidArgument("Winograd convolution: 3x3 kernel, same-size output only");
  Tiles s{xd[0], xd[1], xd[2], xd[3], wd[3], (xd[1] + 1) / 2, (xd[2] + 1) / 2};
  if (s.count() == 0 || s.c == 0 || s.o == 0) {
    std::fill(y->typed_data(), y->typed_data() + y->element_count(), 0.0f);
    return ffi::Error::Success();
  }
  return winograd_run(x.typed_data(), w.typed_data(), y->typed_data(), s);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(CacOnednnConvForward, Forward<ffi::F32>,
                              with_attrs(binding<ffi::F32>()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(CacOnednnConvBackwardData, BackwardData<ffi::F32>,
                              with_attrs(binding<ffi::F32>()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(CacOnednnConvBackwardWeights, BackwardWeights<ffi::F32>,
                              with_attrs(binding<ffi::F32>()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(CacOnednnConvWinograd, Winograd,
                              ffi::Ffi::Bind()
                                  .Arg<In<ffi::F32>>()
                                  .Arg<In<ffi::F32>>()
                                  .Ret<In<ffi::F32>>());
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
