#include "mask_ratio.h"
#include "pixel_blocks.h"
#include "vector_loops.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/record_function.h>

#include <algorithm>
#include <vector>

namespace pconv {
namespace {

// Range [lo, hi) of kernel taps t whose input index o * stride - pad + t * dil lies in
// [0, size); the taps of one window form one run because the index grows with t.
struct TapRange {
  int64_t lo, hi;
};

TapRange tap_range(int64_t start, int64_t size, int64_t kernel, int64_t dil) {
  int64_t lo = 0, hi = kernel;
  while (lo < kernel && start + lo * dil < 0) ++lo;
  while (hi > lo && start + (hi - 1) * dil >= size) --hi;
  return {lo, hi};
}

std::vector<TapRange> tap_ranges(int64_t out, int64_t size, int64_t kernel, int64_t stride,
                                 int64_t pad, int64_t dil) {
  std::vector<TapRange> ranges(out);
  for (int64_t o = 0; o < out; ++o) ranges[o] = tap_range(o * stride - pad, size, kernel, dil);
  return ranges;
}

// s[ow] = the window sums of one output row over the mask's channel sum, whose input rows
// from first_row on are at rows (in_w values each), separably: first the sum over the
// window's in-bounds rows for every input column (contiguous, vectorised), then, tap by tap
// along the row, the sum of those column sums (vectorised along ow). A 7x7 window costs
// 7 + 7 adds per output instead of 49.
template <typename acc_t>
void row_window_sums(const acc_t* rows, int64_t first_row, TapRange rr, int64_t ih0,
                     const ConvGeometry& g, acc_t* col, acc_t* s) {
  std::fill(col, col + g.in_w, acc_t(0));
  for (int64_t i = rr.lo; i < rr.hi; ++i) {
    const acc_t* line = rows + (ih0 + i * g.dil_h - first_row) * g.in_w;
    for (int64_t iw = 0; iw < g.in_w; ++iw) col[iw] += line[iw];
  }
  std::fill(s, s + g.out_w, acc_t(0));
  for (int64_t j = 0; j < g.kernel_w; ++j) {
    // Input column ow * stride + off must lie in [0, in_w).
    const int64_t off = j * g.dil_w - g.pad_w;
    if (g.in_w - 1 - off < 0) continue;
    const int64_t lo = off >= 0 ? 0 : (-off + g.stride_w - 1) / g.stride_w;
    const int64_t hi = std::min(g.out_w, (g.in_w - 1 - off) / g.stride_w + 1);
    const acc_t* base = col + off;
    if (g.stride_w == 1) {
      for (int64_t ow = lo; ow < hi; ++ow) s[ow] += base[ow];
    } else {
      for (int64_t ow = lo; ow < hi; ++ow) s[ow] += base[ow * g.stride_w];
    }
  }
}

// u = clamp(S, 0, 1) and r = k_h k_w C_in / (S + eps) * u for one row of window sums.
template <typename acc_t>
void ratio_row(const acc_t* s, const ConvGeometry& g, acc_t* r_row, acc_t* u_row) {
  const acc_t win = static_cast<acc_t>(g.window_size());
  const acc_t eps = static_cast<acc_t>(1e-8);
  for (int64_t ow = 0; ow < g.out_w; ++ow) {
    const acc_t u = std::min(std::max(s[ow], acc_t(0)), acc_t(1));
    u_row[ow] = u;
    r_row[ow] = win / (s[ow] + eps) * u;
  }
}

template <typename acc_t>
void ratio_kernel(const acc_t* msum, acc_t* ratio, acc_t* update, int64_t planes,
                  const ConvGeometry& g) {
  const auto rows = tap_ranges(g.out_h, g.in_h, g.kernel_h, g.stride_h, g.pad_h, g.dil_h);
  const auto cols = tap_ranges(g.out_w, g.in_w, g.kernel_w, g.stride_w, g.pad_w, g.dil_w);
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(g.out_w, 1));
  at::parallel_for(0, planes * g.out_h, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> sums(g.out_w), columns(g.in_w);
    acc_t* s = sums.data();
    for (int64_t row = begin; row < end; ++row) {
      const int64_t n = row / g.out_h, oh = row % g.out_h;
      const TapRange rr = rows[oh];
      if (msum) {
        row_window_sums(msum + n * g.in_h * g.in_w, 0, rr, oh * g.stride_h - g.pad_h, g,
                        columns.data(), s);
      } else {
        // No mask: S counts the window's in-bounds taps.
        for (int64_t ow = 0; ow < g.out_w; ++ow) {
          s[ow] = static_cast<acc_t>((rr.hi - rr.lo) * (cols[ow].hi - cols[ow].lo));
        }
      }
      ratio_row(s, g, ratio + row * g.out_w, update + row * g.out_w);
    }
  });
}

// out[n, p] = sum over c of mask[n, c, p], for a mask that is NCHW- or
// channels_last-contiguous. Each output pixel sums its channels in a fixed order, so the
// result does not depend on the thread count.
template <typename scalar_t, typename acc_t>
void channel_sum_kernel(const at::Tensor& mask, acc_t* out) {
  const int64_t batch = mask.size(0), channels = mask.size(1);
  const int64_t plane = mask.size(2) * mask.size(3);
  const scalar_t* src = mask.const_data_ptr<scalar_t>();
  const bool channels_last = !mask.is_contiguous();
  constexpr int64_t kBlock = 1024;  // pixels per task: a few KiB of sums, kept in L1
  const int64_t grain = std::max<int64_t>(1, 65536 / (kBlock * channels));
  for_each_pixel_block(batch, plane, kBlock, grain, [&](int64_t, int64_t n, int64_t p0,
                                                        int64_t p1) {
    const int64_t len = p1 - p0;
    const scalar_t* s = src + n * channels * plane;
    acc_t* o = out + n * plane + p0;
    if (channels_last) {
      for (int64_t i = 0; i < len; ++i) {
        const scalar_t* px = s + (p0 + i) * channels;
        acc_t sum = 0;
        for (int64_t c = 0; c < channels; ++c) sum += static_cast<acc_t>(px[c]);
        o[i] = sum;
      }
    } else {
      // Channel by channel over the block: every inner loop is a contiguous,
      // vectorisable walk of one channel's pixels.
      for (int64_t c = 0; c < channels; ++c) {
        loops::accumulate(s + c * plane + p0, o, len, /*first=*/c == 0);
      }
    }
  });
}

// The mask summed over its channels, [N_m, H, W] in `acc`, from one read of the mask (a
// view of it when it already is a single contiguous plane of `acc`).
at::Tensor mask_channel_sum(const at::Tensor& mask, at::ScalarType acc) {
  if (mask.size(1) == 1 && mask.scalar_type() == acc) {
    return mask.select(1, 0).contiguous();
  }
  at::Tensor m = mask.is_contiguous() || mask.is_contiguous(at::MemoryFormat::ChannelsLast)
                     ? mask
                     : mask.contiguous();
  at::Tensor out = at::empty({m.size(0), m.size(2), m.size(3)}, m.options().dtype(acc));
  if (m.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, m.scalar_type(), "pconv_mask_sum",
                                  [&] {
    if (acc == at::kDouble) {
      channel_sum_kernel<scalar_t, double>(m, out.mutable_data_ptr<double>());
    } else {
      channel_sum_kernel<scalar_t, float>(m, out.mutable_data_ptr<float>());
    }
  });
  return out;
}

// r and u from the channel sum msum [N_m, H, W] of the mask, or from the window's in-bounds
// tap count when msum is undefined (no mask); acc is the dtype of r and u.
MaskRatio ratio_from_sum(const at::Tensor& msum, at::ScalarType acc, const ConvGeometry& g) {
  RECORD_FUNCTION("pconv::mask_ratio", c10::ArrayRef<c10::IValue>{});
  const int64_t planes = msum.defined() ? msum.size(0) : 1;
  MaskRatio mr = empty_mask_ratio(planes, acc, g);
  if (acc == at::kDouble) {
    ratio_kernel<double>(msum.defined() ? msum.const_data_ptr<double>() : nullptr,
                         mr.ratio.mutable_data_ptr<double>(), mr.update.mutable_data_ptr<double>(),
                         planes, g);
  } else {
    ratio_kernel<float>(msum.defined() ? msum.const_data_ptr<float>() : nullptr,
                        mr.ratio.mutable_data_ptr<float>(), mr.update.mutable_data_ptr<float>(),
                        planes, g);
  }
  return mr;
}

}  // namespace

MaskRatio mask_ratio_cpu(const c10::optional<at::Tensor>& mask, const ConvGeometry& g,
                         at::ScalarType input_dtype) {
  const at::ScalarType acc = mask_ratio_dtype(input_dtype);
  // The window sum over every mask channel equals the window sum of the channel sum.
  return ratio_from_sum(g.has_mask ? mask_channel_sum(*mask, acc) : at::Tensor(), acc, g);
}

template <typename acc_t>
void mask_ratio_rows(const acc_t* rows, int64_t first_row, int64_t oh0, int64_t oh1,
                     const ConvGeometry& g, acc_t* scratch, acc_t* ratio, acc_t* update) {
  acc_t* col = scratch;
  acc_t* s = scratch + g.in_w;
  for (int64_t oh = oh0; oh < oh1; ++oh) {
    const int64_t ih0 = oh * g.stride_h - g.pad_h;
    row_window_sums(rows, first_row, tap_range(ih0, g.in_h, g.kernel_h, g.dil_h), ih0, g, col,
                    s);
    ratio_row(s, g, ratio + (oh - oh0) * g.out_w, update + (oh - oh0) * g.out_w);
  }
}

template void mask_ratio_rows<float>(const float*, int64_t, int64_t, int64_t,
                                     const ConvGeometry&, float*, float*, float*);
template void mask_ratio_rows<double>(const double*, int64_t, int64_t, int64_t,
                                      const ConvGeometry&, double*, double*, double*);

MaskRatio mask_ratio_from_channel_sum(const at::Tensor& msum, const ConvGeometry& g) {
  TORCH_INTERNAL_ASSERT(msum.dim() == 3 && msum.is_contiguous() &&
                        (msum.scalar_type() == at::kFloat || msum.scalar_type() == at::kDouble));
  return ratio_from_sum(msum, msum.scalar_type(), g);
}

}  // namespace pconv
