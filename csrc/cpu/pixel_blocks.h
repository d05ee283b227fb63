// The parallel walk most CPU passes share: every sample's plane cut into blocks of pixels,
// one task per (sample, block), so a task's pixels share their mask and ratio planes and
// the work splits the same way whatever the thread count.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

namespace pconv {

// How many (sample, block) tasks for_each_pixel_block runs.
inline int64_t pixel_block_count(int64_t batch, int64_t plane, int64_t block) {
  return batch * ((plane + block - 1) / block);
}

// fn(t, n, p0, p1) for every block [p0, p1) of `block` pixels (the last may be shorter)
// of every sample n, in parallel with at::parallel_for's `grain` (in tasks); t is the
// task's index in [0, pixel_block_count).
template <typename Fn>
void for_each_pixel_block(int64_t batch, int64_t plane, int64_t block, int64_t grain,
                          const Fn& fn) {
  const int64_t blocks = (plane + block - 1) / block;
  at::parallel_for(0, batch * blocks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t / blocks, p0 = (t % blocks) * block;
      fn(t, n, p0, std::min(plane, p0 + block));
    }
  });
}

}  // namespace pconv
