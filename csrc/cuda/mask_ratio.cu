// Launcher of the mask pass (mask_ratio_kernel.cuh) and its instantiations. No ATen
// header: see launch.cuh.
#include "launch.cuh"
#include "launch_utils.cuh"
#include "mask_ratio_kernel.cuh"

#include <algorithm>

namespace pconv {
namespace cuda {
namespace {

constexpr int64_t kMaxStagedBytes = 48 * 1024;  // dynamic shared memory without opt-in
constexpr int64_t kBlockThreads = 256;

}  // namespace

template <typename scalar_t>
void launch_mask_ratio(MaskRatioParams<scalar_t, acc_type<scalar_t>> p, cudaStream_t stream) {
  using acc_t = acc_type<scalar_t>;
  if (p.planes <= 0 || p.out_h <= 0 || p.out_w <= 0) return;
  const bool has_mask = p.mask != nullptr;

  // Tile: up to 32 outputs wide and 256 threads; halved in height until the footprint fits
  // in shared memory, else every thread reads its window from global memory.
  const int64_t tile_w = std::min<int64_t>(32, next_pow2(p.out_w));
  int64_t tile_h = std::min<int64_t>(kBlockThreads / tile_w, next_pow2(p.out_h));
  bool staged = false;
  size_t smem = 0;
  if (has_mask) {
    for (int64_t th = tile_h; th >= 1; th /= 2) {
      const int64_t fh = (th - 1) * p.stride_h + (p.kernel_h - 1) * p.dil_h + 1;
      const int64_t fw = (tile_w - 1) * p.stride_w + (p.kernel_w - 1) * p.dil_w + 1;
      if (fh <= kMaxStagedBytes && fw <= kMaxStagedBytes &&
          fh * fw * static_cast<int64_t>(sizeof(acc_t)) <= kMaxStagedBytes) {
        staged = true;
        tile_h = th;
        p.foot_h = fh;
        p.foot_w = fw;
        smem = static_cast<size_t>(fh * fw) * sizeof(acc_t);
        break;
      }
    }
  }
  p.tiles_h = (p.out_h + tile_h - 1) / tile_h;
  p.tiles_w = (p.out_w + tile_w - 1) / tile_w;
  const int64_t tiles = p.tiles_h * p.tiles_w * p.planes;
  const int64_t max_blocks = static_cast<int64_t>(multiprocessor_count()) * 64;
  const dim3 grid(static_cast<unsigned>(std::min(tiles, max_blocks)));
  const dim3 block(static_cast<unsigned>(tile_w), static_cast<unsigned>(tile_h));

  if (!has_mask) {
    launch_kernel(mask_ratio_kernel<scalar_t, acc_t, false, false>, grid, block, 0, stream, p);
  } else if (staged) {
    launch_kernel(mask_ratio_kernel<scalar_t, acc_t, true, true>, grid, block, smem, stream, p);
  } else {
    launch_kernel(mask_ratio_kernel<scalar_t, acc_t, true, false>, grid, block, 0, stream, p);
  }
}

#define PCONV_INSTANTIATE(T) \
  template void launch_mask_ratio<T>(MaskRatioParams<T, acc_type<T>>, cudaStream_t);
PCONV_INSTANTIATE(float)
PCONV_INSTANTIATE(double)
PCONV_INSTANTIATE(c10::Half)
PCONV_INSTANTIATE(c10::BFloat16)
#undef PCONV_INSTANTIATE

}  // namespace cuda
}  // namespace pconv
