// Launcher of the masking with the mask's channel sum (masked_input_kernel.cuh) and its
// instantiations. No ATen header: see launch.cuh.
#include "launch.cuh"
#include "launch_utils.cuh"
#include "masked_input_kernel.cuh"

namespace pconv {
namespace cuda {

template <typename scalar_t>
void launch_masked_input(const MaskedInputParams<scalar_t, acc_type<scalar_t>>& p,
                         cudaStream_t stream) {
  using acc_t = acc_type<scalar_t>;
  constexpr int kVec = vec_width<scalar_t>();
  if (p.batch <= 0 || p.channels <= 0 || p.plane <= 0) return;
  const int64_t inner = p.channels_last ? p.channels : p.plane;
  const bool vec = inner % kVec == 0 && aligned16(p.input) && aligned16(p.mask) && aligned16(p.out);
  with_vec_and_layout<kVec>(vec, p.channels_last, [&](auto width, auto channels_last) {
    constexpr int VEC = decltype(width)::value;
    constexpr bool kChannelsLast = decltype(channels_last)::value;
    // One work item: a group of VEC pixels (NCHW) or one pixel (channels_last).
    const int64_t items = kChannelsLast ? p.batch * p.plane : p.batch * (p.plane / VEC);
    launch_kernel(masked_input_kernel<scalar_t, acc_t, VEC, kChannelsLast>,
                  elementwise_grid(items), dim3(kElementwiseThreads), 0, stream, p);
  });
}

#define PCONV_INSTANTIATE(T)                                                              \
  template void launch_masked_input<T>(const MaskedInputParams<T, acc_type<T>>&, cudaStream_t);
PCONV_INSTANTIATE(float)
PCONV_INSTANTIATE(double)
PCONV_INSTANTIATE(c10::Half)
PCONV_INSTANTIATE(c10::BFloat16)
#undef PCONV_INSTANTIATE

}  // namespace cuda
}  // namespace pconv
