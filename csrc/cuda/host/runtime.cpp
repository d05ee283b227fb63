// The host runtime of host/runtime.h: blocks one after another, the threads of a block as
// fibers (ucontext) on the calling thread, switched at barriers and shuffles.
#include "runtime.h"

#include <cxxabi.h>
#include <dlfcn.h>
#include <ucontext.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <sstream>
#include <stdexcept>

thread_local uint3 threadIdx;
thread_local uint3 blockIdx;
thread_local dim3 blockDim;
thread_local dim3 gridDim;

namespace pconv {
namespace cuda {

int multiprocessor_count();
int compute_capability();

namespace host {
namespace {

constexpr unsigned kMaxThreads = 1024;
constexpr unsigned kMaxBlockZ = 64;
constexpr unsigned kMaxGridYZ = 65535;
constexpr size_t kMaxSmem = 48 * 1024;  // dynamic shared memory without opt-in
// The kernels keep a few dozen scalars each; the stack also takes the c10 conversions.
constexpr size_t kStackBytes = 64 * 1024;
constexpr size_t kShuffleBytes = 16;

enum class State { kReady, kBarrier, kShuffle, kDone };

struct Fiber {
  ucontext_t context;
  std::unique_ptr<char[]> stack;
  State state = State::kReady;
  uint3 index{0, 0, 0};
  // The pending shuffle.
  unsigned mask = 0;
  int src_lane = 0;
  size_t size = 0;
  unsigned char offered[kShuffleBytes];
  unsigned char received[kShuffleBytes];
};

struct Block {
  ucontext_t scheduler;
  std::vector<Fiber> fibers;  // stacks kept across blocks and launches
  int current = -1;
  void (*body)(void*) = nullptr;
  void* context = nullptr;
  std::unique_ptr<unsigned char[]> smem_storage;
  unsigned char* smem = nullptr;
};

// Process-wide, like a device's properties: tests set them from any thread.
struct Settings {
  std::atomic<int> multiprocessors{2};
  std::atomic<int> capability{90};
  std::atomic<bool> reverse{false};
  std::mutex log_mutex;
  std::vector<LaunchRecord> log;
};

Settings& settings() {
  static Settings s;
  return s;
}

thread_local Block* running = nullptr;  // the block whose fibers run on this thread

[[noreturn]] void fail(const std::string& kernel, const std::string& what) {
  throw std::runtime_error("pconv host runtime: " + kernel + ": " + what);
}

std::string kernel_name(const void* kernel) {
  Dl_info info;
  if (dladdr(kernel, &info) != 0 && info.dli_sname != nullptr) {
    int status = 0;
    char* demangled = abi::__cxa_demangle(info.dli_sname, nullptr, nullptr, &status);
    if (status == 0 && demangled != nullptr) {
      std::string name(demangled);
      std::free(demangled);
      return name;
    }
    return info.dli_sname;
  }
  return "<unnamed kernel>";
}

Fiber& current_fiber() {
  if (running == nullptr || running->current < 0) {
    throw std::runtime_error("pconv host runtime: a device built-in called outside a kernel");
  }
  return running->fibers[running->current];
}

void yield(Fiber& fiber) { swapcontext(&fiber.context, &running->scheduler); }

void fiber_main() {
  Block* block = running;
  block->body(block->context);
  block->fibers[block->current].state = State::kDone;
  // Returning resumes uc_link: the scheduler.
}

int linear(const uint3& i, const dim3& b) {
  return static_cast<int>(i.x + b.x * (i.y + b.y * i.z));
}

// Releases every warp whose lanes all wait at a shuffle; false when there is none.
bool release_shuffles(Block& block, int threads, const std::string& name) {
  bool released = false;
  for (int w0 = 0; w0 < threads; w0 += 32) {
    const int lanes = std::min(32, threads - w0);
    bool all_waiting = true;
    for (int l = 0; l < lanes; ++l) all_waiting &= block.fibers[w0 + l].state == State::kShuffle;
    if (!all_waiting) continue;
    const Fiber& first = block.fibers[w0];
    for (int l = 0; l < lanes; ++l) {
      const Fiber& f = block.fibers[w0 + l];
      if (f.mask != first.mask || f.size != first.size) {
        fail(name, "lanes of one warp shuffle with different masks or sizes");
      }
    }
    const unsigned present = lanes == 32 ? 0xffffffffu : ((1u << lanes) - 1u);
    if ((first.mask & ~present) != 0) {
      fail(name, "a shuffle's mask names lanes the warp does not have (warp of " +
                     std::to_string(lanes) + " threads)");
    }
    for (int l = 0; l < lanes; ++l) {
      Fiber& f = block.fibers[w0 + l];
      if (f.src_lane < 0 || f.src_lane >= lanes || ((first.mask >> f.src_lane) & 1u) == 0) {
        fail(name, "a shuffle reads a lane outside its mask");
      }
      std::memcpy(f.received, block.fibers[w0 + f.src_lane].offered, f.size);
      f.state = State::kReady;
    }
    released = true;
  }
  return released;
}

void run_block(Block& block, int threads, const std::string& name) {
  const bool reverse = settings().reverse;
  while (true) {
    for (int k = 0; k < threads; ++k) {
      const int i = reverse ? threads - 1 - k : k;
      Fiber& f = block.fibers[i];
      if (f.state != State::kReady) continue;
      block.current = i;
      threadIdx = f.index;
      swapcontext(&block.scheduler, &f.context);
      block.current = -1;
    }
    int done = 0, at_barrier = 0;
    for (int i = 0; i < threads; ++i) {
      done += block.fibers[i].state == State::kDone;
      at_barrier += block.fibers[i].state == State::kBarrier;
    }
    if (done == threads) return;
    if (release_shuffles(block, threads, name)) continue;
    if (at_barrier == threads) {
      for (int i = 0; i < threads; ++i) block.fibers[i].state = State::kReady;
      continue;
    }
    std::ostringstream what;
    what << "threads of block (" << blockIdx.x << ", " << blockIdx.y << ", " << blockIdx.z
         << ") never meet: " << at_barrier << " wait at __syncthreads, " << done
         << " exited, " << threads - done - at_barrier << " wait at a shuffle";
    fail(name, what.str());
  }
}

}  // namespace

void launch_body(const void* kernel, dim3 grid, dim3 block_dim, size_t smem,
                 void (*body)(void*), void* context) {
  const std::string name = kernel_name(kernel);
  const uint64_t threads = uint64_t(block_dim.x) * block_dim.y * block_dim.z;
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || threads == 0) {
    fail(name, "empty grid or block (the device refuses the launch)");
  }
  if (threads > kMaxThreads || block_dim.z > kMaxBlockZ || grid.y > kMaxGridYZ ||
      grid.z > kMaxGridYZ) {
    fail(name, "launch shape beyond the device's limits");
  }
  if (smem > kMaxSmem) {
    fail(name, std::to_string(smem) + " bytes of dynamic shared memory (48 KiB without opt-in)");
  }
  if (running != nullptr) fail(name, "a launch from inside a kernel");
  {
    std::lock_guard<std::mutex> lock(settings().log_mutex);
    settings().log.push_back(
        {name, {grid.x, grid.y, grid.z}, {block_dim.x, block_dim.y, block_dim.z}, smem});
  }

  static thread_local Block block;
  if (block.fibers.size() < threads) block.fibers.resize(threads);
  // Fresh shared memory per launch, filled with a pattern so that a read of a value no
  // thread wrote shows up in the results rather than reading as zero.
  block.smem_storage.reset(new unsigned char[smem + 16]);
  block.smem = block.smem_storage.get() +
               (16 - reinterpret_cast<uintptr_t>(block.smem_storage.get()) % 16) % 16;
  block.body = body;
  block.context = context;

  struct Running {
    explicit Running(Block* b) { running = b; }
    ~Running() { running = nullptr; }
  } guard(&block);

  gridDim = grid;
  blockDim = block_dim;
  for (unsigned bz = 0; bz < grid.z; ++bz) {
    for (unsigned by = 0; by < grid.y; ++by) {
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        blockIdx = {bx, by, bz};
        std::memset(block.smem, 0xA5, smem);
        for (unsigned t = 0; t < threads; ++t) {
          Fiber& f = block.fibers[t];
          if (!f.stack) f.stack.reset(new char[kStackBytes]);
          f.index = {t % block_dim.x, (t / block_dim.x) % block_dim.y,
                     t / (block_dim.x * block_dim.y)};
          f.state = State::kReady;
          getcontext(&f.context);
          f.context.uc_stack.ss_sp = f.stack.get();
          f.context.uc_stack.ss_size = kStackBytes;
          f.context.uc_link = &block.scheduler;
          makecontext(&f.context, fiber_main, 0);
        }
        run_block(block, static_cast<int>(threads), name);
      }
    }
  }
}

unsigned char* dynamic_shared_memory() {
  current_fiber();  // only inside a kernel
  return running->smem;
}

int lane_id() { return linear(current_fiber().index, blockDim) % 32; }

void warp_exchange(unsigned mask, const void* value, void* result, size_t size, int src_lane) {
  Fiber& f = current_fiber();
  if (size > kShuffleBytes) throw std::runtime_error("pconv host runtime: shuffle too wide");
  f.mask = mask;
  f.src_lane = src_lane;
  f.size = size;
  std::memcpy(f.offered, value, size);
  f.state = State::kShuffle;
  yield(f);
  std::memcpy(result, f.received, size);
}

void set_multiprocessor_count(int count) {
  if (count < 1) throw std::invalid_argument("multiprocessor count must be at least 1");
  settings().multiprocessors = count;
}

void set_compute_capability(int capability) {
  if (capability < 10) throw std::invalid_argument("compute capability is 10 * major + minor");
  settings().capability = capability;
}

void set_reverse_schedule(bool reverse) { settings().reverse = reverse; }

std::vector<LaunchRecord> take_launch_log() {
  std::vector<LaunchRecord> log;
  std::lock_guard<std::mutex> lock(settings().log_mutex);
  log.swap(settings().log);
  return log;
}

}  // namespace host

int multiprocessor_count() { return host::settings().multiprocessors; }

int compute_capability() { return host::settings().capability; }

}  // namespace cuda
}  // namespace pconv

void __syncthreads() {
  using namespace pconv::cuda::host;
  Fiber& f = current_fiber();
  f.state = State::kBarrier;
  yield(f);
}
