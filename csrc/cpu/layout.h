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

// dst = src * mask for NCHW-contiguous src and dst of the same shape (dst may be src) and
// a contiguous single-channel mask [N or 1, 1, H, W]. Values equal at::mul's bit for bit;
// unlike at::mul's broadcast, small tensors cost no parallel region.
void mask_planes(const at::Tensor& src, const at::Tensor& mask, at::Tensor& dst);

// dst = src * mask for src, mask and dst of one shape and the same dense strides (a
// multi-channel mask in the input's layout); dst may be src. Values equal at::mul's bit for
// bit; 0/1 masks in 16-bit types take bit operations (see vector_loops.h).
void mask_elements(const at::Tensor& src, const at::Tensor& mask, at::Tensor& dst);

// dst = src * mask and msum[n, h, w] = the sum over c of mask[n, c, h, w], from one read
// of the mask. src is [N, C, H, W], NCHW- or channels_last-contiguous; dst has src's
// shape and is NCHW-contiguous, or channels_last for an NCHW src; mask has src's shape
// (one plane per sample and channel) and is NCHW-contiguous, in src's dtype. msum is a
// contiguous [N, H, W] tensor of the opmath type (float; double for double). Each sum
// adds the channels in order, as the mask pass's channel sum does.
void masked_input_with_channel_sum(const at::Tensor& src, const at::Tensor& mask,
                                   at::Tensor& dst, at::Tensor& msum);

}  // namespace pconv
