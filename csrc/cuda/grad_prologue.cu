// Launchers of the backward prologue and the bias-gradient finalize
// (elementwise_kernel.cuh) and their instantiations. No ATen header: see launch.cuh.
#include "elementwise_kernel.cuh"
#include "launch.cuh"
#include "launch_utils.cuh"

#include <c10/util/Exception.h>

#include <algorithm>

namespace pconv {
namespace cuda {
namespace {

constexpr int64_t kThreads = 256;
constexpr int kUnroll = 4;  // groups of VEC values per thread per item (NCHW)

// NCHW: small planes get small blocks (down to one warp) rather than idle threads.
int64_t nchw_threads(int64_t plane, int vec) {
  return std::min<int64_t>(kThreads,
                           std::max<int64_t>(32, next_pow2(ceil_div(plane, int64_t(vec) * kUnroll))));
}

// channels_last: threadIdx.x walks channel groups (a power of two up to 32), threadIdx.y
// pixels; blockIdx.y picks the channel groups.
struct ClShape {
  int64_t bx, by, grid_y;
};
ClShape cl_shape(int64_t channels, int vec) {
  const int64_t groups = ceil_div(channels, vec);
  ClShape s;
  s.bx = std::min<int64_t>(32, next_pow2(groups));
  s.by = kThreads / s.bx;
  s.grid_y = ceil_div(groups, s.bx);
  return s;
}

}  // namespace

template <typename scalar_t>
void plan_grad_prologue(GradPrologueParams<scalar_t, acc_type<scalar_t>>& p) {
  constexpr int kVec = vec_width<scalar_t>();
  const int64_t inner = p.channels_last ? p.channels : p.plane;
  p.vec = inner % kVec == 0 && aligned16(p.grad_out) && aligned16(p.grad_raw) ? kVec : 1;
  if (!p.channels_last) {
    const int64_t threads = nchw_threads(p.plane, p.vec);
    p.chunk_elems = threads * p.vec * kUnroll;
    p.chunks_per_row = ceil_div(p.plane, p.chunk_elems);
    p.num_partials = p.batch * p.chunks_per_row;
  } else {
    const ClShape s = cl_shape(p.channels, p.vec);
    TORCH_CHECK(s.grid_y <= 65535, "partial_conv2d_backward: ", p.channels,
                " output channels are too many for the channels_last CUDA kernel");
    const int64_t pixels = p.batch * p.plane;
    // About two waves of 256-thread blocks over the device, at least 4 pixels a thread.
    const int64_t target = std::max<int64_t>(
        1, ceil_div(static_cast<int64_t>(multiprocessor_count()) * 16, s.grid_y));
    p.chunks_per_row = 0;
    p.chunk_elems = 0;
    p.num_partials = std::max<int64_t>(1, std::min(ceil_div(pixels, s.by * 4), target));
  }
}

template <typename scalar_t>
void launch_grad_prologue(const GradPrologueParams<scalar_t, acc_type<scalar_t>>& p,
                          cudaStream_t stream) {
  using acc_t = acc_type<scalar_t>;
  constexpr int kVec = vec_width<scalar_t>();
  if (p.batch * p.channels * p.plane <= 0) return;
  TORCH_INTERNAL_ASSERT(p.vec == kVec || p.vec == 1, "pconv: plan_grad_prologue not run");
  if (!p.channels_last) {
    const int64_t threads = nchw_threads(p.plane, p.vec);
    TORCH_INTERNAL_ASSERT(p.chunk_elems == threads * p.vec * kUnroll);
    const int64_t items = p.batch * p.channels * p.chunks_per_row;
    const int64_t max_blocks = static_cast<int64_t>(multiprocessor_count()) * 32;
    const unsigned blocks = static_cast<unsigned>(std::max<int64_t>(1, std::min(items, max_blocks)));
    const dim3 block(static_cast<unsigned>(threads));
    if (p.vec == kVec) {
      launch_kernel(grad_prologue_nchw_kernel<scalar_t, acc_t, kVec, kUnroll>, dim3(blocks), block,
                    0, stream, p);
    } else {
      launch_kernel(grad_prologue_nchw_kernel<scalar_t, acc_t, 1, kUnroll>, dim3(blocks), block, 0,
                    stream, p);
    }
  } else {
    const ClShape s = cl_shape(p.channels, p.vec);
    const dim3 grid(static_cast<unsigned>(p.num_partials), static_cast<unsigned>(s.grid_y));
    const dim3 block(static_cast<unsigned>(s.bx), static_cast<unsigned>(s.by));
    const size_t smem = static_cast<size_t>(s.bx * s.by * p.vec) * sizeof(acc_t);
    if (p.vec == kVec) {
      launch_kernel(grad_prologue_cl_kernel<scalar_t, acc_t, kVec>, grid, block, smem, stream, p);
    } else {
      launch_kernel(grad_prologue_cl_kernel<scalar_t, acc_t, 1>, grid, block, smem, stream, p);
    }
  }
}

template <typename scalar_t>
void launch_bias_grad_finalize(const BiasGradParams<scalar_t, acc_type<scalar_t>>& p,
                               cudaStream_t stream) {
  using acc_t = acc_type<scalar_t>;
  if (p.channels <= 0) return;
  const int64_t max_blocks = static_cast<int64_t>(multiprocessor_count()) * 32;
  const unsigned blocks = static_cast<unsigned>(std::max<int64_t>(1, std::min(p.channels, max_blocks)));
  const unsigned threads = static_cast<unsigned>(
      std::min<int64_t>(kThreads, std::max<int64_t>(32, next_pow2(p.num_partials))));
  launch_kernel(bias_grad_finalize_kernel<scalar_t, acc_t>, dim3(blocks), dim3(threads), 0, stream,
                p);
}

#define PCONV_INSTANTIATE(T)                                                                \
  template void plan_grad_prologue<T>(GradPrologueParams<T, acc_type<T>>&);                 \
  template void launch_grad_prologue<T>(const GradPrologueParams<T, acc_type<T>>&,          \
                                        cudaStream_t);                                      \
  template void launch_bias_grad_finalize<T>(const BiasGradParams<T, acc_type<T>>&, cudaStream_t);
PCONV_INSTANTIATE(float)
PCONV_INSTANTIATE(double)
PCONV_INSTANTIATE(c10::Half)
PCONV_INSTANTIATE(c10::BFloat16)
#undef PCONV_INSTANTIATE

}  // namespace cuda
}  // namespace pconv
