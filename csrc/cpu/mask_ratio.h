// The mask pass of the CPU kernels: window sum, ratio and updated mask.
#pragma once

#include "../pconv.h"

namespace pconv {

// Window sum S of the mask (summed over its channels), ratio r and updated mask u, from one
// read of the mask. With no mask, S is the number of in-bounds taps of each window, so no
// all-ones tensor is ever built. Shapes and dtypes as in MaskRatio.
MaskRatio mask_ratio_cpu(const c10::optional<at::Tensor>& mask, const ConvGeometry& g,
                         at::ScalarType input_dtype);

// As mask_ratio_cpu, from the mask's channel sum msum [N_m, H_in, W_in] (float32, or
// float64 for float64 inputs, contiguous) when a pass over the mask has already formed it.
MaskRatio mask_ratio_from_channel_sum(const at::Tensor& msum, const ConvGeometry& g);

// Uninitialised r and u on the CPU, [planes, 1, H', W'] each, in `acc` (mask_ratio_dtype).
inline MaskRatio empty_mask_ratio(int64_t planes, at::ScalarType acc, const ConvGeometry& g) {
  return empty_mask_ratio(planes, at::TensorOptions().dtype(acc).device(at::kCPU), g);
}

// Rows [oh0, oh1) of r and u (out_w values a row, at ratio and update), from the mask's
// channel sum over the input rows those windows read: input row ih at
// rows + (ih - first_row) * in_w. The same arithmetic as mask_ratio_cpu, so the same bits;
// for a kernel that forms the channel sum of a band of rows itself. scratch holds
// in_w + out_w values.
template <typename acc_t>
void mask_ratio_rows(const acc_t* rows, int64_t first_row, int64_t oh0, int64_t oh1,
                     const ConvGeometry& g, acc_t* scratch, acc_t* ratio, acc_t* update);

}  // namespace pconv
