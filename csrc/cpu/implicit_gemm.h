// The forward of layers with few input channels (the UNets' first layers) as an implicit
// GEMM: masking on the way into the GEMM and the epilogue on its output, a tile at a time.
#pragma once

#include "../pconv.h"

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

namespace pconv {

// True when implicit_gemm_forward takes this layer: float32 or float64, groups 1, stride 1,
// at most 4 input channels, an NCHW-contiguous input and mask, a non-empty batch, and a
// BLAS in the process (the one ATen was built with).
bool implicit_gemm_applies(const at::Tensor& input, const c10::optional<at::Tensor>& mask,
                           const ConvGeometry& g);

// y = (conv(x * m, W) * r + b) * u, [N, C_out, H', W'] NCHW-contiguous, for an input
// [N, C_in, H, W] and a mask [N or 1, 1 or C_in, H, W] (1 = known, 0 = hole; absent: no
// masking, as for an x * m formed already). r and u come from the mask pass. For each
// tile of output rows, the window columns of x * m are formed in a buffer that stays in
// cache, a BLAS GEMM writes the tile of the output, and the epilogue runs on the tile
// while it is still in cache: the output is written once and never read back, and no
// full-size x * m exists.
at::Tensor implicit_gemm_forward(const at::Tensor& input, const c10::optional<at::Tensor>& mask,
                                 const MaskRatio& mr, const at::Tensor& weight,
                                 const c10::optional<at::Tensor>& bias, const ConvGeometry& g);

}  // namespace pconv
