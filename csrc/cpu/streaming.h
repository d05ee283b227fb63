// x * m for float32 written with streaming (non-temporal) stores.
//
// The masking passes write x * m, a tensor as big as the input, and nothing reads it
// until the convolution runs. A normal store first reads every cache line it fills
// (64 bytes in for every 64 bytes out) and leaves the line in the caches for a reader that
// does not come before it is evicted; a streaming store writes the line to memory
// directly. Measured in the fused forward on 64 x 256 x 256 with a multi-channel mask,
// two threads of an Intel Xeon: the pass that forms x * m and the mask's channel sum took
// 3.7-4.0 ms with normal stores, 1.6-1.8 ms streaming with AVX-512 and 2.2-2.5 ms with
// SSE2, and the convolution that reads the result did not slow down.
//
// Only large outputs stream (worth_streaming): a small x * m would still be in the caches
// when the convolution reads it. Results equal at::mul's bit for bit (one float product).
#pragma once

#include <cstdint>

namespace pconv {
namespace streaming {

// What product() does with `sum` besides writing out = x * m.
enum class Sum { kNone, kStart, kAdd };  // untouched, sum = m, sum += m

// True when streaming an output of `bytes` pays (see above), on a CPU that has the stores.
bool worth_streaming(int64_t bytes);

// out[i] = x[i] * m[i] for i < len, by streaming stores where out is aligned, and by
// `mode`, sum[i] = m[i] or sum[i] += m[i] (normal stores: the sums are reused). out must not
// overlap x, m or sum. The caller ends the writes with end_of_writes() before any other
// thread reads out.
void product(const float* x, const float* m, float* out, float* sum, int64_t len, Sum mode);

// Orders this thread's streaming stores before its later stores, and so before the end
// of the parallel region the other threads wait on.
void end_of_writes();

}  // namespace streaming
}  // namespace pconv
