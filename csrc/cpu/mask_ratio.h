// The single-channel mask pass of the CPU kernels.
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

}  // namespace pconv
