// Scratch tensors of the CPU kernels, reused across calls on the same thread.
#pragma once

#include <ATen/core/Tensor.h>

namespace pconv {

// Slots of scratch memory: each holds one intermediate at a time.
enum class Scratch : int { kMaskedInput = 0, kGradRaw = 1 };

// An uninitialised tensor of `sizes` in `format` whose memory is reused by the next call
// on this thread that asks for the same slot. Only for intermediates that never outlive
// the op (x * m, g_raw): a fresh multi-megabyte buffer costs a page fault per 4 KiB page
// on first touch, which on small VMs adds a third to the convolution's time. Buffers
// above a size cap are allocated normally.
at::Tensor cpu_scratch(Scratch slot, c10::IntArrayRef sizes, const at::TensorOptions& options,
                       at::MemoryFormat format);

}  // namespace pconv
