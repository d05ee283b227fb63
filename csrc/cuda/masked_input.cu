// Launcher of the masking with the mask's channel sum (masked_input_kernel.cuh) and its
// instantiations. No ATen header: see launch.cuh.
#include "launch.cuh"
#include "launch_utils.cuh"
#include "masked_input_kernel.cuh"

#include <algorithm>

namespace pconv {
namespace cuda {
namespace {

constexpr int kThreads = 256;

template <typename scalar_t, typename acc_t, int VEC, bool kChannelsLast>
void masked_input_launch(const MaskedInputParams<scalar_t, acc_t>& p, cudaStream_t stream) {
  // One work item: a group of VEC pixels (NCHW) or one pixel (channels_last).
  const int64_t items = kChannelsLast ? p.batch * p.plane : p.batch * (p.plane / VEC);
  const int64_t max_blocks = static_cast<int64_t>(multiprocessor_count()) * 32;
  const int64_t blocks = std::max<int64_t>(1, std::min(ceil_div(items, kThreads), max_blocks));
  launch_kernel(masked_input_kernel<scalar_t, acc_t, VEC, kChannelsLast>,
                dim3(static_cast<unsigned>(blocks)), dim3(kThreads), 0, stream, p);
}

}  // namespace

template <typename scalar_t>
void launch_masked_input(const MaskedInputParams<scalar_t, acc_type<scalar_t>>& p,
                         cudaStream_t stream) {
  using acc_t = acc_type<scalar_t>;
  constexpr int kVec = vec_width<scalar_t>();
  if (p.batch <= 0 || p.channels <= 0 || p.plane <= 0) return;
  const int64_t inner = p.channels_last ? p.channels : p.plane;
  const bool vec = inner % kVec == 0 && aligned16(p.input) && aligned16(p.mask) && aligned16(p.out);
  with_vec_and_layout<kVec>(vec, p.channels_last, [&](auto width, auto channels_last) {
    masked_input_launch<scalar_t, acc_t, decltype(width)::value, decltype(channels_last)::value>(
        p, stream);
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
