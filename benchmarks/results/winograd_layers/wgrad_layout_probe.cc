// Weight gradient of a 3x3 stride-1 convolution on the AVX2 host: oneDNN on NHWC activations (what the
// extension ran), oneDNN on its own blocked layout with x and dy reordered to it (what it runs
// now where oneDNN has no brgemm NHWC kernel), and 9 sgemms over the padded input (a probe, not
// used). See RUN.md.
#include <omp.h>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <vector>
#include <algorithm>
#include "oneapi/dnnl/dnnl.hpp"
using namespace dnnl; using tag = memory::format_tag; using dt = memory::data_type;

// dw[3][3][C][O] = sum x_pad[n, y+i, x+j, c] dy[n, y, x, o]
static void gemm_bw(const float* x, const float* dy, float* dw, long N, long H, long W, long C, long O, std::vector<float>& xp, std::vector<float>& dp) {
  long Hp = H + 2, Wp = W + 2, rows = N * Hp * Wp, extra = 2 * Wp + 2;
  xp.assign((rows + extra) * C, 0.f);
  dp.assign(rows * O, 0.f);
  #pragma omp parallel for collapse(2)
  for (long n = 0; n < N; ++n) for (long y = 0; y < H; ++y) {
    std::memcpy(&xp[((n * Hp + y + 1) * Wp + 1) * C], x + ((n * H + y) * W) * C, W * C * 4);
    std::memcpy(&dp[((n * Hp + y) * Wp) * O], dy + ((n * H + y) * W) * O, W * O * 4);
  }
  for (int i = 0; i < 3; ++i) for (int j = 0; j < 3; ++j) {
    long off = i * Wp + j;
    dnnl_sgemm('T', 'N', C, O, rows, 1.f, xp.data() + off * C, C, dp.data(), O, 0.f, dw + (i * 3 + j) * C * O, O);
  }
}

int main() {
  long shapes[][5] = {{2,256,256,64,64},{2,256,256,32,32},{2,128,128,64,64},{2,64,64,128,128},{2,32,32,256,256},{6,64,64,64,64},{6,32,32,128,256},{2,16,16,512,512}};
  engine eng(engine::kind::cpu, 0); stream s(eng);
  for (auto& sh : shapes) {
    long N = sh[0], H = sh[1], W = sh[2], C = sh[3], O = sh[4];
    std::vector<float> x(N*H*W*C), dy(N*H*W*O), dw1(9*C*O), dw2(9*C*O), xp, dp;
    srand(1); for (auto& v : x) v = rand()/(float)RAND_MAX-.5f; for (auto& v : dy) v = rand()/(float)RAND_MAX-.5f;
    memory::desc src({N,C,H,W}, dt::f32, tag::nhwc), dst({N,O,H,W}, dt::f32, tag::nhwc), wany({O,C,3,3}, dt::f32, tag::any), whwio({O,C,3,3}, dt::f32, tag::hwio);
    auto hint = convolution_forward::primitive_desc(eng, prop_kind::forward_training, algorithm::convolution_direct, src, wany, dst, {1,1},{1,1},{1,1});
    auto pd = convolution_backward_weights::primitive_desc(eng, algorithm::convolution_direct, src, wany, dst, {1,1},{1,1},{1,1}, hint);
    convolution_backward_weights bw(pd);
    memory ws(pd.diff_weights_desc(), eng), wu(whwio, eng, dw1.data()); reorder ro(ws, wu);
    memory xm(src, eng, x.data()), dm(dst, eng, dy.data());
    auto direct = [&]{ bw.execute(s, {{DNNL_ARG_SRC, xm},{DNNL_ARG_DIFF_DST, dm},{DNNL_ARG_DIFF_WEIGHTS, ws}}); ro.execute(s, ws, wu); s.wait(); };
    // blocked: src/dst any
    memory::desc sany({N,C,H,W}, dt::f32, tag::any), dany({N,O,H,W}, dt::f32, tag::any);
    auto hint2 = convolution_forward::primitive_desc(eng, prop_kind::forward_training, algorithm::convolution_direct, sany, wany, dany, {1,1},{1,1},{1,1});
    auto pd2 = convolution_backward_weights::primitive_desc(eng, algorithm::convolution_direct, sany, wany, dany, {1,1},{1,1},{1,1}, hint2);
    convolution_backward_weights bw2(pd2);
    memory xb(pd2.src_desc(), eng), db(pd2.diff_dst_desc(), eng), ws2(pd2.diff_weights_desc(), eng);
    reorder rx(xm, xb), rd(dm, db), ro2(ws2, wu);
    auto blocked = [&]{ rx.execute(s, xm, xb); rd.execute(s, dm, db); bw2.execute(s, {{DNNL_ARG_SRC, xb},{DNNL_ARG_DIFF_DST, db},{DNNL_ARG_DIFF_WEIGHTS, ws2}}); ro2.execute(s, ws2, wu); s.wait(); };
    auto gemm = [&]{ gemm_bw(x.data(), dy.data(), dw2.data(), N, H, W, C, O, xp, dp); };
    auto time = [&](auto f){ f(); double b=1e9; for(int i=0;i<3;++i){auto t=std::chrono::steady_clock::now(); f(); b=std::min(b, std::chrono::duration<double>(std::chrono::steady_clock::now()-t).count());} return b; };
    double td=time(direct); std::vector<float> ref=dw1; double tb=time(blocked); double tg=time(gemm);
    double err=0,mx=0; for(size_t i=0;i<ref.size();++i){err=std::max(err,(double)std::fabs(ref[i]-dw2[i])); mx=std::max(mx,(double)std::fabs(ref[i]));}
    double gf=2.0*N*H*W*C*O*9/1e9;
    printf("(%ld,%ld,%ld,%ld,%ld) nhwc %.1f ms (%.0f GF/s) blocked %.1f ms (%.0f) gemm %.1f ms (%.0f) err %.1e  impl %s\n", N,H,W,C,O, td*1e3, gf/td, tb*1e3, gf/tb, tg*1e3, gf/tg, err/mx, pd2.impl_info_str());
    fflush(stdout);
  }
}
