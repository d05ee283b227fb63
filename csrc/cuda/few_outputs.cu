// Launchers of the direct convolutions for few output channels (few_outputs_kernel.cuh) and
// their instantiations. No ATen header: see launch.cuh.
#include "few_outputs_kernel.cuh"
#include "few_outputs_mma_kernel.cuh"
#include "launch.cuh"
#include "launch_utils.cuh"

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>

namespace pconv {
namespace cuda {
namespace {

constexpr int64_t kMaxWeightBytes = 48 * 1024;  // dynamic shared memory without opt-in
constexpr int kThreads = 256;
// Blocks per multiprocessor in the grid. At 48-80 registers a thread (sm_90; the input
// gradient keeps C_out * 9 gradient values in registers) 3 to 5 blocks of 256 are resident
// at a time; 16 keeps the last wave short, and a block stages the weight once for all the
// pixels it walks.
constexpr int64_t kBlocksPerMultiprocessor = 16;

// Sets chunk_channels for the shared memory a block may give the weight (all of it, less
// what it uses otherwise); returns the bytes of the weight.
template <int kOut, typename scalar_t, typename acc_t>
size_t plan_weight_chunks(FewOutputsConv<scalar_t, acc_t>& g, int64_t other_bytes = 0) {
  const int64_t per_channel =
      static_cast<int64_t>(kFewOutputsTaps * out_stride<kOut>() * sizeof(acc_t));
  const int64_t fits = (kMaxWeightBytes - other_bytes) / per_channel;
  g.chunk_channels = std::max<int64_t>(1, std::min(g.in_channels, fits));
  return static_cast<size_t>(g.chunk_channels * per_channel);
}

dim3 pixel_grid(int64_t pixels) {
  const int64_t max_blocks =
      static_cast<int64_t>(multiprocessor_count()) * kBlocksPerMultiprocessor;
  const int64_t blocks = std::min(ceil_div(pixels, kThreads), max_blocks);
  return dim3(static_cast<unsigned>(std::max<int64_t>(1, blocks)));
}

// A block per tile, at most kBlocksPerMultiprocessor of them a multiprocessor.
dim3 tile_grid(const Tiles& tiles) {
  return dim3(static_cast<unsigned>(std::min<int64_t>(
      tiles.count, static_cast<int64_t>(multiprocessor_count()) * kBlocksPerMultiprocessor)));
}

// Launches a CUDA-core tiled kernel over the tiles of [batch, h, w], with the bytes it
// stages (first in shared memory) and the weight chunks that fit after them.
template <int kOut, typename Kernel, typename Params>
void launch_tiled(Kernel kernel, Params& p, int64_t h, int64_t w, int64_t staged_bytes,
                  cudaStream_t stream) {
  const size_t smem = staged_bytes + plan_weight_chunks<kOut>(p.conv, staged_bytes);
  launch_kernel(kernel, tile_grid(Tiles(p.conv.batch, h, w)), dim3(kTileThreads), smem, stream,
                p);
}

// The layers of the tiled kernels: 3x3, unit stride and dilation (any padding), where the
// offsets within a sample of the tensor they index by input pixel (x, or dx) and of the
// mask fit their 32-bit offsets.
template <typename scalar_t, typename acc_t>
bool takes_tiled_kernels(const FewOutputsConv<scalar_t, acc_t>& g, const Strides4& pixel_strides,
                         const scalar_t* mask, const Strides4& mask_strides) {
  if (g.kernel_h != 3 || g.kernel_w != 3 || g.stride_h != 1 || g.stride_w != 1 ||
      g.dil_h != 1 || g.dil_w != 1) {
    return false;
  }
  const int64_t mask_channels = mask_strides.c == 0 ? 1 : g.in_channels;
  return fits_32_bits(pixel_strides, g.in_channels, g.in_h, g.in_w) &&
         (mask == nullptr || fits_32_bits(mask_strides, mask_channels, g.in_h, g.in_w));
}

// Calls launch(std::integral_constant<int, C_out>{}, std::integral_constant<bool, has_mask>{}).
template <typename Launch>
void with_outputs_and_mask(int64_t out_channels, bool has_mask, Launch&& launch) {
  auto outputs = [&](auto mask_flag) {
    switch (out_channels) {
      case 1: launch(std::integral_constant<int, 1>{}, mask_flag); break;
      case 2: launch(std::integral_constant<int, 2>{}, mask_flag); break;
      case 3: launch(std::integral_constant<int, 3>{}, mask_flag); break;
      default: launch(std::integral_constant<int, 4>{}, mask_flag); break;
    }
  };
  has_mask ? outputs(std::true_type{}) : outputs(std::false_type{});
}

}  // namespace

// The tensor-core forward (few_outputs_mma_kernel.cuh): bfloat16 and float16 on devices of
// compute capability 8.0 and later. Its weight is staged in whole groups of 16 channels.
template <int kOut, bool kHasMask, typename scalar_t>
void launch_mma_forward(FewOutputsForwardParams<scalar_t, float>& p, cudaStream_t stream) {
  FewOutputsConv<scalar_t, float>& g = p.conv;
  const int64_t groups = ceil_div(g.in_channels, kGroupChannels);
  const int64_t fit = (kMaxWeightBytes - kMmaStagedBytes) / kGroupWeightBytes;
  const int64_t chunk_groups = std::min(groups, fit);
  g.chunk_channels = chunk_groups * kGroupChannels;
  const size_t smem = kMmaStagedBytes + chunk_groups * kGroupWeightBytes;
  launch_kernel(few_outputs_3x3_mma_forward_kernel<scalar_t, kOut, kHasMask>,
                tile_grid(Tiles(g.batch, g.out_h, g.out_w, kMmaTileRows)), dim3(kMmaThreads),
                smem, stream, p);
}

template <typename scalar_t>
void launch_few_outputs_forward(FewOutputsForwardParams<scalar_t, acc_type<scalar_t>> p,
                                cudaStream_t stream) {
  using acc_t = acc_type<scalar_t>;
  const int64_t pixels = p.conv.batch * p.conv.out_h * p.conv.out_w;
  if (pixels <= 0) return;
  const bool tiled = takes_tiled_kernels(p.conv, p.input_strides, p.mask, p.mask_strides);
  with_outputs_and_mask(p.conv.out_channels, p.mask != nullptr, [&](auto outputs, auto mask) {
    constexpr int kOut = decltype(outputs)::value;
    constexpr bool kHasMask = decltype(mask)::value;
    if constexpr (sizeof(scalar_t) == 2) {
      if (tiled && compute_capability() >= 80) {
        launch_mma_forward<kOut, kHasMask>(p, stream);
        return;
      }
    }
    if (tiled) {  // tiles of outputs, staging x * m
      launch_tiled<kOut>(few_outputs_3x3_forward_kernel<scalar_t, acc_t, kOut, kHasMask>, p,
                         p.conv.out_h, p.conv.out_w, staged_tile_bytes<acc_t>(), stream);
    } else {
      const size_t smem = plan_weight_chunks<kOut>(p.conv);
      launch_kernel(few_outputs_forward_kernel<scalar_t, acc_t, kOut, kHasMask>,
                    pixel_grid(pixels), dim3(kThreads), smem, stream, p);
    }
  });
}

// The tensor-core input gradient: bfloat16 and float16 on compute capability 8.0 and
// later, where the whole weight fits in shared memory next to the staged g_raw (C_in up
// to 456 at 4 outputs, 704 at 3); false where it does not, for the CUDA-core kernel to take.
template <int kOut, bool kHasMask, typename scalar_t>
bool launch_mma_input_grad(const FewOutputsInputGradParams<scalar_t, float>& p,
                           cudaStream_t stream) {
  const FewOutputsConv<scalar_t, float>& g = p.conv;
  const int64_t weight_bytes =
      ceil_div(g.in_channels, 8) * channel_group_words<kOut>() * int64_t{4};
  const int64_t smem = staged_grad_mma_bytes<kOut>() + weight_bytes;
  if (smem > kMaxWeightBytes) return false;
  launch_kernel(few_outputs_3x3_mma_input_grad_kernel<scalar_t, kOut, kHasMask>,
                tile_grid(Tiles(g.batch, g.in_h, g.in_w, kMmaTileRows)), dim3(kMmaThreads),
                static_cast<size_t>(smem), stream, p);
  return true;
}

template <typename scalar_t>
void launch_few_outputs_input_grad(FewOutputsInputGradParams<scalar_t, acc_type<scalar_t>> p,
                                   cudaStream_t stream) {
  using acc_t = acc_type<scalar_t>;
  const int64_t pixels = p.conv.batch * p.conv.in_h * p.conv.in_w;
  if (pixels <= 0 || p.conv.in_channels <= 0) return;
  const bool tiled =
      takes_tiled_kernels(p.conv, p.grad_input_strides, p.mask, p.mask_strides);
  with_outputs_and_mask(p.conv.out_channels, p.mask != nullptr, [&](auto outputs, auto mask) {
    constexpr int kOut = decltype(outputs)::value;
    constexpr bool kHasMask = decltype(mask)::value;
    if constexpr (sizeof(scalar_t) == 2) {
      if (tiled && compute_capability() >= 80 &&
          launch_mma_input_grad<kOut, kHasMask>(p, stream)) {
        return;
      }
    }
    if (tiled) {  // tiles of input pixels, staging g_raw
      launch_tiled<kOut>(few_outputs_3x3_input_grad_kernel<scalar_t, acc_t, kOut, kHasMask>, p,
                         p.conv.in_h, p.conv.in_w, staged_grad_bytes<acc_t, kOut>(), stream);
    } else {
      const size_t smem = plan_weight_chunks<kOut>(p.conv);
      launch_kernel(few_outputs_input_grad_kernel<scalar_t, acc_t, kOut, kHasMask>,
                    pixel_grid(pixels), dim3(kThreads), smem, stream, p);
    }
  });
}

#define PCONV_INSTANTIATE(T)                                                                  \
  template void launch_few_outputs_forward<T>(FewOutputsForwardParams<T, acc_type<T>>,        \
                                              cudaStream_t);                                  \
  template void launch_few_outputs_input_grad<T>(FewOutputsInputGradParams<T, acc_type<T>>,   \
                                                 cudaStream_t);
PCONV_INSTANTIATE(float)
PCONV_INSTANTIATE(double)
PCONV_INSTANTIATE(c10::Half)
PCONV_INSTANTIATE(c10::BFloat16)
#undef PCONV_INSTANTIATE

}  // namespace cuda
}  // namespace pconv
