#include "layout.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/record_function.h>

#include <algorithm>
#include <type_traits>

namespace pconv {
namespace {

// Tiles of kTileP pixels x kTileC channels: read in one layout and written in the other
// while they sit in L1, the inner loop always walking the destination in memory order.
constexpr int64_t kTileP = 64;
constexpr int64_t kTileC = 8;

template <typename scalar_t, bool kToChannelsLast, bool kMasked>
void relayout_kernel(const scalar_t* src, const scalar_t* mask, scalar_t* dst, int64_t batch,
                     int64_t channels, int64_t plane, int64_t mask_batch_stride,
                     int64_t mask_channel_stride) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t tiles = (plane + kTileP - 1) / kTileP;
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(kTileP * channels, 1));
  auto scaled = [](scalar_t v, const scalar_t* m, int64_t i) {
    if constexpr (kMasked) {
      return static_cast<scalar_t>(static_cast<acc_t>(v) * static_cast<acc_t>(m[i]));
    } else {
      return v;
    }
  };
  at::parallel_for(0, batch * tiles, grain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t / tiles;
      const int64_t p0 = (t % tiles) * kTileP, p1 = std::min(plane, p0 + kTileP);
      const scalar_t* s = src + n * channels * plane;
      scalar_t* d = dst + n * channels * plane;
      const scalar_t* m_n = mask != nullptr ? mask + n * mask_batch_stride : nullptr;
      for (int64_t c0 = 0; c0 < channels; c0 += kTileC) {
        const int64_t c1 = std::min(channels, c0 + kTileC);
        if (kToChannelsLast) {
          for (int64_t p = p0; p < p1; ++p) {
            scalar_t* row = d + p * channels;
            for (int64_t c = c0; c < c1; ++c) {
              row[c] = scaled(s[c * plane + p], m_n, c * mask_channel_stride + p);
            }
          }
        } else {
          for (int64_t c = c0; c < c1; ++c) {
            scalar_t* row = d + c * plane;
            for (int64_t p = p0; p < p1; ++p) {
              row[p] = scaled(s[p * channels + c], m_n, c * mask_channel_stride + p);
            }
          }
        }
      }
    }
  });
}

}  // namespace

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
          sp, mp, dp, batch, channels, plane, mask_batch_stride, mask_channel_stride);
    };
    if (to_cl) {
      mp ? run(std::true_type{}, std::true_type{}) : run(std::true_type{}, std::false_type{});
    } else {
      mp ? run(std::false_type{}, std::true_type{}) : run(std::false_type{}, std::false_type{});
    }
  });
}

}  // namespace pconv
