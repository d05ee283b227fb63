// Layout changes between NCHW and channels_last that mask in the same pass.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

namespace pconv {

// dst = src * mask, where src is NCHW-contiguous and dst channels_last-contiguous, or the
// other way round; both [N, C, H, W]. The mask is [N or 1, 1 or C, H, W] (any strides),
// or absent (a plain layout change). Values equal at::mul's bit for bit.
void masked_relayout(const at::Tensor& src, const c10::optional<at::Tensor>& mask,
                     at::Tensor& dst);

}  // namespace pconv
