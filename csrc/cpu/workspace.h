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

// An uninitialised tensor for a result that outlives the op (x * m kept for the backward):
// its memory comes from a process-wide cache of freed blocks of the same byte size and goes
// back there when the tensor dies, so a training loop touches fresh pages only in its first
// step. The cache holds at most kMaxCachedBytes of idle blocks; release_cached_blocks()
// hands them all back to the system.
at::Tensor cpu_cached_empty(c10::IntArrayRef sizes, const at::TensorOptions& options,
                            at::MemoryFormat format);

// Frees every idle cached block; returns the bytes freed.
int64_t release_cached_blocks();

// Bytes held by idle cached blocks.
int64_t cached_block_bytes();

}  // namespace pconv
