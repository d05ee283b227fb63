// Scratch tensors of the CPU kernels, reused across calls on the same thread.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

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

// Per-thread work buffers of the direct kernels, which live only inside one task.
enum class ThreadBuffer : int { kBand = 0, kAccumulators = 1, kMaskSum = 2 };

// This thread's buffer `slot`, at least `bytes` long and 64-byte aligned, its contents
// undefined. It grows as needed and is kept for the thread's next call: the kernels ask for
// the same sizes on every call. Aligned the same on every thread, so that a BLAS call
// rounds the same whichever thread makes it (MKL's kernels may round differently for
// differently aligned operands).
void* cpu_thread_buffer_bytes(ThreadBuffer slot, int64_t bytes);

template <typename T>
T* cpu_thread_buffer(ThreadBuffer slot, int64_t numel) {
  return static_cast<T*>(cpu_thread_buffer_bytes(slot, numel * static_cast<int64_t>(sizeof(T))));
}

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
