// Which oneDNN implementation is fastest for the ConvLSTM's forward convolutions at 256 px (the
// shapes of its profile, benchmarks/results/convlstm_profile_256): for each shape, every
// implementation oneDNN offers for NHWC float32 activations (primitive_desc::next_impl), except the
// reference, SSE4.1 and im2col-gemm ones (5-500x slower in a first run), timed back to back
// (median of 7 after 2 warm-up runs). See RUN.md.
#include <omp.h>
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <vector>
#include <string>
#include "oneapi/dnnl/dnnl.hpp"
using namespace dnnl;
using tag = memory::format_tag;
int main() {
  engine eng(engine::kind::cpu, 0);
  stream s(eng);
  // n h w c o stride
  std::vector<std::vector<long>> shapes = {
      {48, 128, 128, 32, 32, 1}, {16, 128, 128, 96, 32, 1}, {16, 64, 64, 192, 64, 1},
      {48, 16, 16, 256, 512, 1}, {48, 32, 32, 128, 256, 1}, {16, 32, 32, 384, 128, 1},
      {16, 16, 16, 128, 512, 1}, {48, 64, 64, 64, 64, 1}, {16, 32, 32, 192, 128, 1},
      {48, 32, 32, 128, 128, 1}, {16, 128, 128, 64, 32, 1}, {48, 128, 128, 4, 32, 1},
      {48, 128, 128, 32, 64, 2}, {16, 32, 32, 64, 256, 1}};
  for (auto& sh : shapes) {
    long n = sh[0], h = sh[1], w = sh[2], c = sh[3], o = sh[4], st = sh[5];
    long oh = h / st, ow = w / st;
    long pl = st == 1 ? 1 : 0, pr = 1;
    memory::desc src({n, c, h, w}, memory::data_type::f32, tag::nhwc);
    memory::desc dst({n, o, oh, ow}, memory::data_type::f32, tag::nhwc);
    memory::desc wei({o, c, 3, 3}, memory::data_type::f32, tag::any);
    primitive_attr attr;
    auto pd = convolution_forward::primitive_desc(eng, prop_kind::forward_inference,
        algorithm::convolution_direct, src, wei, dst, {st, st}, {pl, pl}, {pr, pr}, attr, true);
    double gflop = 2.0 * n * oh * ow * o * c * 9 / 1e9;
    memory src_m(src, eng), dst_m(dst, eng);
    float* x = static_cast<float*>(src_m.get_data_handle());
    for (long i = 0; i < n * h * w * c; ++i) x[i] = (i % 7) * 0.1f;
    do {
      std::string impl = pd.impl_info_str();
      bool slow = impl.find("ref") != std::string::npos || impl.find("sse41") != std::string::npos ||
                  impl.find("gemm") != std::string::npos;
      if (slow) continue;
      if (pd.src_desc() != src || pd.dst_desc() != dst) continue;
      memory wei_m(pd.weights_desc(), eng);
      convolution_forward prim(pd);
      std::vector<double> ts;
      for (int r = 0; r < 9; ++r) {
        auto t0 = std::chrono::steady_clock::now();
        prim.execute(s, {{DNNL_ARG_SRC, src_m}, {DNNL_ARG_WEIGHTS, wei_m}, {DNNL_ARG_DST, dst_m}});
        s.wait();
        std::chrono::duration<double> dt = std::chrono::steady_clock::now() - t0;
        if (r >= 2) ts.push_back(dt.count());
      }
      std::sort(ts.begin(), ts.end());
      printf("n%ld %ldx%ld %ld->%ld s%ld  %-14s %7.1f ms %6.1f GFLOP/s\n", n, h, w, c, o, st,
             impl.c_str(), ts[3] * 1e3, gflop / ts[3]);
      fflush(stdout);
    } while (pd.next_impl());
  }
}
