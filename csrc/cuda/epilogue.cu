// Launcher of the forward epilogue (elementwise_kernel.cuh) and its instantiations.
// No ATen header: see launch.cuh.
#include "elementwise_kernel.cuh"
#include "launch.cuh"
#include "launch_utils.cuh"

#include <algorithm>

namespace pconv {
namespace cuda {
namespace {

constexpr int kThreads = 256;

template <typename scalar_t, typename acc_t, int VEC, bool kChannelsLast>
void epilogue_launch(const EpilogueParams<scalar_t, acc_t>& p, cudaStream_t stream) {
  const int64_t groups = p.numel / VEC;
  const int64_t max_blocks = static_cast<int64_t>(multiprocessor_count()) * 32;
  const int64_t blocks = std::max<int64_t>(1, std::min(ceil_div(groups, kThreads), max_blocks));
  launch_kernel(epilogue_kernel<scalar_t, acc_t, VEC, kChannelsLast>,
                dim3(static_cast<unsigned>(blocks)), dim3(kThreads), 0, stream, p);
}

}  // namespace

template <typename scalar_t>
void launch_epilogue(const EpilogueParams<scalar_t, acc_type<scalar_t>>& p, cudaStream_t stream) {
  using acc_t = acc_type<scalar_t>;
  constexpr int kVec = vec_width<scalar_t>();
  if (p.numel <= 0) return;
  // A group of kVec values must share (n, c) (NCHW) or the pixel (channels_last).
  const int64_t inner = p.channels_last ? p.channels : p.plane;
  const bool vec = inner % kVec == 0 && aligned16(p.out);
  with_vec_and_layout<kVec>(vec, p.channels_last, [&](auto width, auto channels_last) {
    epilogue_launch<scalar_t, acc_t, decltype(width)::value, decltype(channels_last)::value>(
        p, stream);
  });
}

#define PCONV_INSTANTIATE(T)                                                          \
  template void launch_epilogue<T>(const EpilogueParams<T, acc_type<T>>&, cudaStream_t);
PCONV_INSTANTIATE(float)
PCONV_INSTANTIATE(double)
PCONV_INSTANTIATE(c10::Half)
PCONV_INSTANTIATE(c10::BFloat16)
#undef PCONV_INSTANTIATE

}  // namespace cuda
}  // namespace pconv
