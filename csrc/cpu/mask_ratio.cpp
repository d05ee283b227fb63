#include "mask_ratio.h"

#include <ATen/ATen.h>
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

std::vector<TapRange> tap_ranges(int64_t out, int64_t size, int64_t kernel, int64_t stride,
                                 int64_t pad, int64_t dil) {
  std::vector<TapRange> ranges(out);
  for (int64_t o = 0; o < out; ++o) {
    const int64_t start = o * stride - pad;
    int64_t lo = 0, hi = kernel;
    while (lo < kernel && start + lo * dil < 0) ++lo;
    while (hi > lo && start + (hi - 1) * dil >= size) --hi;
    ranges[o] = {lo, hi};
  }
  return ranges;
}

template <typename acc_t>
void ratio_kernel(const acc_t* msum, acc_t* ratio, acc_t* update, int64_t planes,
                  const ConvGeometry& g) {
  const auto rows = tap_ranges(g.out_h, g.in_h, g.kernel_h, g.stride_h, g.pad_h, g.dil_h);
  const auto cols = tap_ranges(g.out_w, g.in_w, g.kernel_w, g.stride_w, g.pad_w, g.dil_w);
  const acc_t win = static_cast<acc_t>(g.window_size());
  const acc_t eps = static_cast<acc_t>(1e-8);
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(g.out_w, 1));
  at::parallel_for(0, planes * g.out_h, grain, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t n = row / g.out_h, oh = row % g.out_h;
      const TapRange rr = rows[oh];
      const int64_t ih0 = oh * g.stride_h - g.pad_h;
      const acc_t* plane = msum ? msum + n * g.in_h * g.in_w : nullptr;
      for (int64_t ow = 0; ow < g.out_w; ++ow) {
        const TapRange cr = cols[ow];
        const int64_t iw0 = ow * g.stride_w - g.pad_w;
        acc_t s = 0;
        if (plane) {
          for (int64_t i = rr.lo; i < rr.hi; ++i) {
            const acc_t* line = plane + (ih0 + i * g.dil_h) * g.in_w + iw0;
            for (int64_t j = cr.lo; j < cr.hi; ++j) s += line[j * g.dil_w];
          }
        } else {
          s = static_cast<acc_t>((rr.hi - rr.lo) * (cr.hi - cr.lo));
        }
        const acc_t u = std::min(std::max(s, acc_t(0)), acc_t(1));
        const int64_t idx = row * g.out_w + ow;
        update[idx] = u;
        ratio[idx] = win / (s + eps) * u;
      }
    }
  });
}

}  // namespace

MaskRatio mask_ratio_cpu(const c10::optional<at::Tensor>& mask, const ConvGeometry& g,
                         at::ScalarType input_dtype) {
  RECORD_FUNCTION("pconv::mask_ratio", c10::ArrayRef<c10::IValue>{});
  const at::ScalarType acc = input_dtype == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t planes = g.has_mask ? g.mask_batch : 1;
  const auto options = at::TensorOptions().dtype(acc).device(at::kCPU);
  MaskRatio mr{at::empty({planes, 1, g.out_h, g.out_w}, options),
               at::empty({planes, 1, g.out_h, g.out_w}, options), planes};
  at::Tensor msum;
  if (g.has_mask) {
    // The window sum over every mask channel equals the window sum of the channel sum.
    msum = g.mask_channels == 1 ? mask->select(1, 0).to(acc).contiguous()
                                : mask->sum(1, /*keepdim=*/false, acc).contiguous();
  }
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

}  // namespace pconv
