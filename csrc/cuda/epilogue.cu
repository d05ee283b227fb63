// Launcher of the forward epilogue (elementwise_kernel.cuh) and its instantiations.
// No ATen header: see launch.cuh.
#include "elementwise_kernel.cuh"
#include "launch.cuh"
#include "launch_utils.cuh"

namespace pconv {
namespace cuda {

template <typename scalar_t>
void launch_epilogue(const EpilogueParams<scalar_t, acc_type<scalar_t>>& p, cudaStream_t stream) {
  using acc_t = acc_type<scalar_t>;
  constexpr int kVec = vec_width<scalar_t>();
  if (p.numel <= 0) return;
  // A group of kVec values must share (n, c) (NCHW) or the pixel (channels_last).
  const int64_t inner = p.channels_last ? p.channels : p.plane;
  const bool vec = inner % kVec == 0 && aligned16(p.out);
  with_vec_and_layout<kVec>(vec, p.channels_last, [&](auto width, auto channels_last) {
    constexpr int VEC = decltype(width)::value;
    launch_kernel(epilogue_kernel<scalar_t, acc_t, VEC, decltype(channels_last)::value>,
                  elementwise_grid(p.numel / VEC), dim3(kElementwiseThreads), 0, stream, p);
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
