#include "layout.h"
#include "pixel_blocks.h"
#include "streaming.h"
#include "tiles.h"
#include "vector_loops.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/record_function.h>

#include <algorithm>
#include <type_traits>

namespace pconv {
namespace {

// True when x * m of `numel` values goes to `out` by streaming stores (streaming.h):
// float32, large, and not in place (an in-place pass reads every line it writes anyway).
template <typename scalar_t>
bool streams_into(const scalar_t* x, const scalar_t* out, int64_t numel) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return out != x && streaming::worth_streaming(numel * int64_t(sizeof(float)));
  } else {
    return false;
  }
}

// A profiler range, "pconv::streaming_stores", inside a pass that streams its output, so
// a profile (and the tests) show which passes do.
class StreamingRange {
 public:
  explicit StreamingRange(bool streams) : guard_(at::RecordScope::FUNCTION) {
    if (streams && guard_.isActive()) guard_.before("pconv::streaming_stores");
  }

 private:
  at::RecordFunction guard_;
};

// out = x * m by streaming stores; only where streams_into holds.
template <typename scalar_t>
void stream_product(const scalar_t* x, const scalar_t* m, scalar_t* out, int64_t len) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    streaming::product(x, m, out, nullptr, len, streaming::Sum::kNone);
  } else {
    TORCH_INTERNAL_ASSERT(false, "streaming stores are float32 only");
  }
}

// out = x * m (rounded once, as at::mul), or a copy of x without a mask.
template <typename scalar_t, bool kMasked>
void scale_run(const scalar_t* x, const scalar_t* m, scalar_t* out, int64_t len) {
  if constexpr (kMasked) {
    loops::multiply(x, m, out, len);
  } else {
    std::copy(x, x + len, out);
  }
}

// x * m on one run of a channel, and the run's mask values added to `sum` when there is
// one (first: channel 0, which starts the sums).
template <typename scalar_t, bool kMasked, typename acc_t>
void scale_run(const scalar_t* x, const scalar_t* m, scalar_t* out, acc_t* sum, int64_t len,
               bool first) {
  if (sum != nullptr) {
    loops::multiply_accumulate(x, m, out, sum, 1, 0, len, first);
  } else {
    scale_run<scalar_t, kMasked>(x, m, out, len);
  }
}

// x * m (x alone without a mask) between NCHW and channels_last, a tile at a time (see
// tiles.h): the multiply runs on rows of one channel in the NCHW side's order, where x and
// a multi-channel mask are both contiguous. msum (when not null) receives the channel sum
// of a per-sample multi-channel mask, adding the channels in order.
template <typename scalar_t, bool kToChannelsLast, bool kMasked,
          typename acc_t = at::opmath_type<scalar_t>>
void relayout_kernel(const scalar_t* src, const scalar_t* mask, scalar_t* dst, int64_t batch,
                     int64_t channels, int64_t plane, int64_t mask_batch_stride,
                     int64_t mask_channel_stride, acc_t* msum) {
  auto mask_row = [&](int64_t n, int64_t c, int64_t p0) -> const scalar_t* {
    return kMasked ? mask + n * mask_batch_stride + c * mask_channel_stride + p0 : nullptr;
  };
  auto sum_row = [&](int64_t n, int64_t p0) -> acc_t* {
    return msum != nullptr ? msum + n * plane + p0 : nullptr;
  };
  // The NCHW rows come a tile's piece at a time, so each asks for its next piece
  // (tiles::prefetch_next_piece). Measured on 64 x 256 x 256 into channels_last, two
  // threads: bfloat16 with a multi-channel mask 3.0 -> 1.7 ms. A single-channel mask's
  // row is the same for every channel and stays in the caches.
  auto prefetch_mask = [&](int64_t n, int64_t c, int64_t p0, int64_t len) {
    if (kMasked && mask_channel_stride != 0) {
      tiles::prefetch_next_piece(mask_row(n, c, p0), p0, len, plane);
    }
  };
  if constexpr (kToChannelsLast) {
    tiles::write_channels_last(dst, batch, channels, plane, [&](int64_t, int64_t n, int64_t c,
                                                                int64_t p0, int64_t len,
                                                                scalar_t* row) {
      const scalar_t* x = src + (n * channels + c) * plane + p0;
      tiles::prefetch_next_piece(x, p0, len, plane);
      prefetch_mask(n, c, p0, len);
      scale_run<scalar_t, kMasked>(x, mask_row(n, c, p0), row, sum_row(n, p0), len, c == 0);
    });
  } else {
    tiles::read_channels_last(src, batch, channels, plane, [&](int64_t, int64_t n, int64_t c,
                                                               int64_t p0, int64_t len,
                                                               const scalar_t* row) {
      prefetch_mask(n, c, p0, len);
      scale_run<scalar_t, kMasked>(row, mask_row(n, c, p0), dst + (n * channels + c) * plane + p0,
                                   sum_row(n, p0), len, c == 0);
    });
  }
}

// x * m and the mask's channel sum for NCHW x, m and out, from one read of the mask. A task
// takes a block of pixels through every channel in turn, so each pixel's sum adds the
// channels in order 0, 1, ... as the mask pass's channel sum does (the same float result).
template <typename scalar_t, typename acc_t>
void masked_planes_with_sum(const scalar_t* x, const scalar_t* m, scalar_t* out, acc_t* msum,
                            int64_t batch, int64_t channels, int64_t plane) {
  // Runs of up to 4096 pixels: the sums (16 KiB) stay in L1 and the three streams are long
  // enough for the prefetcher; small planes are cut finer so every thread has blocks.
  const int64_t per_task = (batch * plane + 4 * at::get_num_threads() - 1) /
                           (4 * at::get_num_threads());
  const int64_t block = std::min<int64_t>(
      {plane, 4096, std::max<int64_t>(256, (per_task + 63) / 64 * 64)});
  // Below 32K values a parallel region costs more than it saves.
  const int64_t grain = std::max<int64_t>(1, 32768 / (block * channels));
  const bool stream = streams_into(x, out, batch * channels * plane);
  const StreamingRange range(stream);
  for_each_pixel_block(batch, plane, block, grain, [&](int64_t, int64_t n, int64_t p0,
                                                       int64_t p1) {
    const int64_t offset = n * channels * plane + p0;
    if constexpr (std::is_same_v<scalar_t, float>) {
      if (stream) {
        for (int64_t c = 0; c < channels; ++c) {
          const int64_t at = offset + c * plane;
          streaming::product(x + at, m + at, out + at, msum + n * plane + p0, p1 - p0,
                             c == 0 ? streaming::Sum::kStart : streaming::Sum::kAdd);
        }
        streaming::end_of_writes();
        return;
      }
    }
    loops::multiply_accumulate(x + offset, m + offset, out + offset, msum + n * plane + p0,
                               channels, plane, p1 - p0, /*first=*/true);
  });
}

}  // namespace

void mask_planes(const at::Tensor& src, const at::Tensor& mask, at::Tensor& dst) {
  RECORD_FUNCTION("pconv::mask_planes", c10::ArrayRef<c10::IValue>{});
  TORCH_INTERNAL_ASSERT(src.is_contiguous() && dst.is_contiguous() && mask.is_contiguous() &&
                        mask.size(1) == 1 && dst.sizes() == src.sizes());
  const int64_t batch = src.size(0), channels = src.size(1);
  const int64_t plane = src.size(2) * src.size(3);
  const int64_t mask_batch_stride = mask.size(0) == 1 ? 0 : plane;
  if (src.numel() == 0) return;
  // Tasks of whole planes, at least 32K values each: smaller work runs inline, where a
  // parallel region would cost more than it saves.
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(plane, 1));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, src.scalar_type(),
                                  "pconv_mask_planes", [&] {
    const scalar_t* x = src.const_data_ptr<scalar_t>();
    const scalar_t* m = mask.const_data_ptr<scalar_t>();
    scalar_t* out = dst.data_ptr<scalar_t>();
    const bool stream = streams_into(x, out, src.numel());
    const StreamingRange range(stream);
    at::parallel_for(0, batch * channels, grain, [&](int64_t begin, int64_t end) {
      if (stream) {
        for (int64_t t = begin; t < end; ++t) {
          stream_product(x + t * plane, m + t / channels * mask_batch_stride, out + t * plane,
                         plane);
        }
        streaming::end_of_writes();
        return;
      }
      // Runs of planes within one sample share its mask plane.
      for (int64_t t = begin; t < end;) {
        const int64_t n = t / channels, stop = std::min(end, (n + 1) * channels);
        loops::multiply_planes(x + t * plane, m + n * mask_batch_stride, out + t * plane,
                               stop - t, plane);
        t = stop;
      }
    });
  });
}

void mask_elements(const at::Tensor& src, const at::Tensor& mask, at::Tensor& dst) {
  RECORD_FUNCTION("pconv::mask_elements", c10::ArrayRef<c10::IValue>{});
  TORCH_INTERNAL_ASSERT(src.is_non_overlapping_and_dense() && mask.sizes() == src.sizes() &&
                        dst.sizes() == src.sizes() && mask.strides() == src.strides() &&
                        dst.strides() == src.strides());
  const int64_t numel = src.numel();
  // Runs of 4096 values: a soft mask value sends back only its own run to the arithmetic
  // loop. Below 32K values no parallel region.
  constexpr int64_t kRun = 4096;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, src.scalar_type(),
                                  "pconv_mask_elements", [&] {
    const scalar_t* x = src.const_data_ptr<scalar_t>();
    const scalar_t* m = mask.const_data_ptr<scalar_t>();
    scalar_t* out = dst.data_ptr<scalar_t>();
    const bool stream = streams_into(x, out, numel);
    const StreamingRange range(stream);
    at::parallel_for(0, numel, 32768, [&](int64_t begin, int64_t end) {
      if (stream) {
        stream_product(x + begin, m + begin, out + begin, end - begin);
        streaming::end_of_writes();
        return;
      }
      for (int64_t i = begin; i < end; i += kRun) {
        loops::multiply(x + i, m + i, out + i, std::min(kRun, end - i));
      }
    });
  });
}

void masked_input_with_channel_sum(const at::Tensor& src, const at::Tensor& mask,
                                   at::Tensor& dst, at::Tensor& msum) {
  RECORD_FUNCTION("pconv::masked_input_with_channel_sum", c10::ArrayRef<c10::IValue>{});
  const bool src_nchw = src.is_contiguous(), dst_nchw = dst.is_contiguous();
  TORCH_INTERNAL_ASSERT(mask.is_contiguous() && mask.sizes() == src.sizes() &&
                        (src_nchw || dst_nchw) &&
                        (src_nchw || src.is_contiguous(at::MemoryFormat::ChannelsLast)) &&
                        (dst_nchw || dst.is_contiguous(at::MemoryFormat::ChannelsLast)));
  const int64_t batch = src.size(0), channels = src.size(1);
  const int64_t plane = src.size(2) * src.size(3);
  TORCH_INTERNAL_ASSERT(msum.is_contiguous() && msum.numel() == batch * plane);
  if (src.numel() == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, src.scalar_type(),
                                  "pconv_masked_input_with_channel_sum", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* mp = mask.const_data_ptr<scalar_t>();
    const scalar_t* sp = src.const_data_ptr<scalar_t>();
    scalar_t* dp = dst.mutable_data_ptr<scalar_t>();
    acc_t* sum = msum.mutable_data_ptr<acc_t>();
    if (src_nchw && dst_nchw) {
      masked_planes_with_sum(sp, mp, dp, sum, batch, channels, plane);
    } else if (src_nchw) {
      relayout_kernel<scalar_t, true, true>(sp, mp, dp, batch, channels, plane,
                                            channels * plane, plane, sum);
    } else {
      relayout_kernel<scalar_t, false, true>(sp, mp, dp, batch, channels, plane,
                                             channels * plane, plane, sum);
    }
  });
}

void masked_relayout(const at::Tensor& src, const c10::optional<at::Tensor>& mask,
                     at::Tensor& dst) {
  RECORD_FUNCTION("pconv::masked_relayout", c10::ArrayRef<c10::IValue>{});
  const bool to_cl = src.is_contiguous() && dst.is_contiguous(at::MemoryFormat::ChannelsLast);
  TORCH_INTERNAL_ASSERT(to_cl || (src.is_contiguous(at::MemoryFormat::ChannelsLast) &&
                                  dst.is_contiguous()));
  const int64_t batch = src.size(0), channels = src.size(1);
  const int64_t plane = src.size(2) * src.size(3);
  at::Tensor m;
  int64_t mask_batch_stride = 0, mask_channel_stride = 0;
  if (mask.has_value() && mask->defined()) {
    m = mask->contiguous();
    mask_batch_stride = m.size(0) == 1 ? 0 : m.size(1) * plane;
    mask_channel_stride = m.size(1) == 1 ? 0 : plane;
  }
  if (src.numel() == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, src.scalar_type(),
                                  "pconv_masked_relayout", [&] {
    const scalar_t* mp = m.defined() ? m.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* sp = src.const_data_ptr<scalar_t>();
    scalar_t* dp = dst.mutable_data_ptr<scalar_t>();
    auto run = [&](auto to_cl_tag, auto masked_tag) {
      relayout_kernel<scalar_t, decltype(to_cl_tag)::value, decltype(masked_tag)::value>(
          sp, mp, dp, batch, channels, plane, mask_batch_stride, mask_channel_stride,
          static_cast<at::opmath_type<scalar_t>*>(nullptr));
    };
    if (to_cl) {
      mp ? run(std::true_type{}, std::true_type{}) : run(std::true_type{}, std::false_type{});
    } else {
      mp ? run(std::false_type{}, std::true_type{}) : run(std::false_type{}, std::false_type{});
    }
  });
}

}  // namespace pconv
