#include "workspace.h"

#include <ATen/ATen.h>

#include <array>

namespace pconv {
namespace {

constexpr int64_t kMaxScratchBytes = int64_t(1) << 30;
thread_local std::array<at::Tensor, 2> scratch_buffers;  // uint8 holders, one per slot

std::vector<int64_t> strides_for(c10::IntArrayRef sizes, at::MemoryFormat format) {
  std::vector<int64_t> strides(sizes.size());
  if (format == at::MemoryFormat::ChannelsLast && sizes.size() == 4) {
    // N, C, H, W sizes with C innermost.
    strides[1] = 1;
    strides[3] = std::max<int64_t>(sizes[1], 1);
    strides[2] = strides[3] * std::max<int64_t>(sizes[3], 1);
    strides[0] = strides[2] * std::max<int64_t>(sizes[2], 1);
    return strides;
  }
  int64_t stride = 1;
  for (int64_t d = static_cast<int64_t>(sizes.size()) - 1; d >= 0; --d) {
    strides[d] = stride;
    stride *= std::max<int64_t>(sizes[d], 1);
  }
  return strides;
}

}  // namespace

at::Tensor cpu_scratch(Scratch slot, c10::IntArrayRef sizes, const at::TensorOptions& options,
                       at::MemoryFormat format) {
  int64_t numel = 1;
  for (int64_t s : sizes) numel *= s;
  const int64_t nbytes = numel * static_cast<int64_t>(options.dtype().itemsize());
  if (nbytes > kMaxScratchBytes || numel == 0) {
    return at::empty(sizes, options.memory_format(format));
  }
  at::Tensor& holder = scratch_buffers[static_cast<int>(slot)];
  if (!holder.defined() || holder.numel() < nbytes) {
    holder = at::empty({nbytes}, at::TensorOptions().dtype(at::kByte).device(at::kCPU));
  }
  at::Tensor view = at::empty({0}, options);
  view.set_(holder.storage(), /*storage_offset=*/0, sizes, strides_for(sizes, format));
  return view;
}

}  // namespace pconv
