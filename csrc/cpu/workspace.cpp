#include "workspace.h"

#include <ATen/ATen.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>

#include <array>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <unordered_map>
#include <vector>

namespace pconv {
namespace {

struct AlignedFree {
  void operator()(void* p) const { std::free(p); }
};
struct ThreadBufferSlot {
  std::unique_ptr<void, AlignedFree> data;
  int64_t bytes = 0;
};
thread_local std::array<ThreadBufferSlot, 3> thread_buffers;

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

// Idle blocks by exact byte size: a training loop asks for the same sizes every step.
class BlockCache {
 public:
  static constexpr int64_t kMaxCachedBytes = int64_t(2) << 30;

  void* take(int64_t nbytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto it = idle_.find(nbytes);
      if (it != idle_.end() && !it->second.empty()) {
        void* ptr = it->second.back();
        it->second.pop_back();
        idle_bytes_ -= nbytes;
        return ptr;
      }
    }
    return c10::alloc_cpu(static_cast<size_t>(nbytes));
  }

  void give_back(void* ptr, int64_t nbytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (idle_bytes_ + nbytes <= kMaxCachedBytes) {
        idle_[nbytes].push_back(ptr);
        idle_bytes_ += nbytes;
        return;
      }
    }
    c10::free_cpu(ptr);
  }

  int64_t release() {
    std::unordered_map<int64_t, std::vector<void*>> idle;
    int64_t freed = 0;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      idle.swap(idle_);
      freed = idle_bytes_;
      idle_bytes_ = 0;
    }
    for (auto& [nbytes, blocks] : idle) {
      for (void* ptr : blocks) c10::free_cpu(ptr);
    }
    return freed;
  }

  int64_t idle_bytes() {
    std::lock_guard<std::mutex> lock(mutex_);
    return idle_bytes_;
  }

 private:
  std::mutex mutex_;
  std::unordered_map<int64_t, std::vector<void*>> idle_;
  int64_t idle_bytes_ = 0;
};

// Never destroyed: tensors freed during interpreter shutdown still find it.
BlockCache& block_cache() {
  static BlockCache* cache = new BlockCache();
  return *cache;
}

// Memory the op hands out from its own caches is in use as any tensor's is: the profiler's
// memory events (torch.profiler(profile_memory=True), the benchmarks' CPU peak) see it
// taken and given back, as they see the CPU allocator's. The caches' idle memory is not
// counted, as a caching allocator's reserve is not.
void report_in_use(void* ptr, int64_t nbytes) {
  c10::reportMemoryUsageToProfiler(ptr, nbytes, 0, 0, c10::Device(c10::kCPU));
}

struct CachedBlock {
  void* ptr;
  int64_t nbytes;
};

void return_block(void* ctx) {
  auto* block = static_cast<CachedBlock*>(ctx);
  report_in_use(block->ptr, -block->nbytes);
  block_cache().give_back(block->ptr, block->nbytes);
  delete block;
}

// A scratch tensor's hold on its slot's buffer; the buffer's storage stays alive with it.
struct ScratchLease {
  c10::Storage buffer;
  void* ptr;
  int64_t nbytes;
};

void end_lease(void* ctx) {
  auto* lease = static_cast<ScratchLease*>(ctx);
  report_in_use(lease->ptr, -lease->nbytes);
  delete lease;
}

}  // namespace

at::Tensor cpu_cached_empty(c10::IntArrayRef sizes, const at::TensorOptions& options,
                            at::MemoryFormat format) {
  int64_t numel = 1;
  for (int64_t s : sizes) numel *= s;
  const int64_t nbytes = numel * static_cast<int64_t>(options.dtype().itemsize());
  if (numel == 0) return at::empty(sizes, options.memory_format(format));
  void* ptr = block_cache().take(nbytes);
  report_in_use(ptr, nbytes);
  auto* block = new CachedBlock{ptr, nbytes};
  c10::Storage storage(c10::Storage::use_byte_size_t(), static_cast<size_t>(nbytes),
                       c10::DataPtr(ptr, block, &return_block, c10::Device(c10::kCPU)),
                       /*allocator=*/nullptr, /*resizable=*/false);
  at::Tensor out = at::empty({0}, options);
  out.set_(storage, /*storage_offset=*/0, sizes, strides_for(sizes, format));
  return out;
}

int64_t release_cached_blocks() { return block_cache().release(); }

int64_t cached_block_bytes() { return block_cache().idle_bytes(); }

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
  void* ptr = holder.storage().mutable_data();
  report_in_use(ptr, nbytes);
  c10::Storage storage(c10::Storage::use_byte_size_t(), static_cast<size_t>(nbytes),
                       c10::DataPtr(ptr, new ScratchLease{holder.storage(), ptr, nbytes}, &end_lease,
                                    c10::Device(c10::kCPU)),
                       /*allocator=*/nullptr, /*resizable=*/false);
  at::Tensor view = at::empty({0}, options);
  view.set_(storage, /*storage_offset=*/0, sizes, strides_for(sizes, format));
  return view;
}

void* cpu_thread_buffer_bytes(ThreadBuffer slot, int64_t bytes) {
  ThreadBufferSlot& b = thread_buffers[static_cast<int>(slot)];
  if (bytes > b.bytes) {
    const int64_t rounded = (std::max<int64_t>(bytes, 1) + 63) / 64 * 64;
    b.data.reset(std::aligned_alloc(64, static_cast<size_t>(rounded)));
    TORCH_CHECK(b.data != nullptr, "partial_conv2d: out of memory for a ", rounded,
                "-byte work buffer");
    b.bytes = rounded;
  }
  return b.data.get();
}

}  // namespace pconv
