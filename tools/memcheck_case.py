"""A small forward + backward of every kernel path on CUDA, for compute-sanitizer.

Covers NCHW and channels_last, single- and multi-channel masks, a batch-broadcast mask, no
mask, bias and no bias (with its gradient: the two-stage bias reduction), the training and
the recomputing backward, float32 and float16 (float64 and bfloat16 on one geometry), and
an empty window, at sizes small enough to run under memcheck in seconds. The geometries
reach the scalar and the vectorised passes (H' * W' odd, then a multiple of 8) and both
mask passes (footprint staged in shared memory, and one too big for it), and the masking
that sums a multi-channel mask's channels (NCHW and channels_last). Layers 6 -> 3 take the
direct kernels for few output channels: the forward (when no weight gradient is wanted) and
the input gradient. Last, with PCONV_CUDA_IGEMM=1, the implicit-GEMM forward (bfloat16): 6
and 16 input channels (16-byte loads of x and the mask in channels_last), 8 and 72 outputs
(a partial second tile of 64).

Run it with PYTORCH_NO_CUDA_MEMORY_CACHING=1: inside the caching allocator's blocks an
out-of-bounds access is invisible to memcheck.
"""
import os

import torch

import pconv_cuda

# (H, W, stride, padding, dilation) of a 3x3 layer 6 -> 8.
GEOMETRIES = (
    (13, 11, (2, 1), 1, 1),  # H' * W' = 77: scalar passes in NCHW
    (16, 16, 1, 1, 1),  # H' * W' = 256: vectorised passes in NCHW
    (8, 8, 1, 57, 60),  # 121 x 122 footprint: the mask pass reads global memory
)


def run(dtype, layout, mask_channels, mask_batch, bias, geometry, train=True,
        mask_layout=torch.contiguous_format, out_channels=8, in_channels=6):
    h, w_, stride, padding, dilation = geometry
    if mask_channels > 1:  # one per input channel
        mask_channels = in_channels
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, in_channels, h, w_, generator=g).to("cuda", dtype)
    x = x.contiguous(memory_format=layout)
    w = torch.randn(out_channels, in_channels, 3, 3, generator=g).to("cuda", dtype)
    b = torch.randn(out_channels, generator=g).to("cuda", dtype) if bias else None
    m = None
    if mask_channels:
        m = (torch.rand(mask_batch, mask_channels, h, w_, generator=g) > 0.4).to("cuda", dtype)
        m[..., 2:6, 2:6] = 0  # windows with no known pixel
        m = m.contiguous(memory_format=mask_layout)
    x.requires_grad_(True)
    # A weight gradient with a mask takes the training pair; without, the recomputing
    # backward (mask pass again, x * m formed only for dW).
    w.requires_grad_(train)
    if b is not None:
        b.requires_grad_(True)
    out, update = pconv_cuda.partial_conv2d(x, m, w, b, stride=stride, padding=padding,
                                            dilation=dilation)
    out.float().sum().backward()
    torch.cuda.synchronize()
    assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()
    if b is not None:
        assert torch.isfinite(b.grad).all()


MASKS = ((1, 2), (6, 2), (1, 1), (0, 1))  # (channels, batch); 0 channels: no mask
# A 6-channel mask in NCHW is in x's layout for an NCHW x (the masking sums its channels),
# not for a channels_last one (mask pass over the mask, then x * m); the channels_last one
# runs again with its mask in channels_last.


def main():
    for geometry in GEOMETRIES:
        for dtype in (torch.float32, torch.float16):
            for layout in (torch.contiguous_format, torch.channels_last):
                for mask_channels, mask_batch in MASKS:
                    for bias in (True, False):
                        run(dtype, layout, mask_channels, mask_batch, bias, geometry)
                run(dtype, layout, 6, 1, True, geometry, train=False)
            run(dtype, torch.channels_last, 6, 2, True, geometry, mask_layout=torch.channels_last)
    for dtype in (torch.float64, torch.bfloat16):
        for layout in (torch.contiguous_format, torch.channels_last):
            for mask_channels, mask_batch in MASKS:
                run(dtype, layout, mask_channels, mask_batch, True, GEOMETRIES[1])
        run(dtype, torch.channels_last, 6, 2, True, GEOMETRIES[1], mask_layout=torch.channels_last)
    # The direct kernels: one pixel per thread at stride 2 by 1; a row of pixels per thread
    # at unit stride, whose clamped window positions at the borders must stay inside x.
    for geometry in GEOMETRIES[:2]:
        for dtype in (torch.float32, torch.bfloat16):
            for layout in (torch.contiguous_format, torch.channels_last):
                for mask_channels, mask_batch in MASKS:
                    for train in (True, False):
                        run(dtype, layout, mask_channels, mask_batch, train, geometry,
                            train=train, out_channels=3)
    # One 16-bit dtype: the two differ only in the mma instruction, not in what is indexed.
    os.environ["PCONV_CUDA_IGEMM"] = "1"
    for dtype in (torch.bfloat16,):
        for layout in (torch.contiguous_format, torch.channels_last):
            for mask_channels, mask_batch in MASKS:
                for in_channels, out_channels in ((6, 8), (16, 72)):
                    for train in (True, False):
                        run(dtype, layout, mask_channels, mask_batch, True, GEOMETRIES[1],
                            train=train, out_channels=out_channels, in_channels=in_channels,
                            mask_layout=layout)
    print("memcheck case: all paths ran")


if __name__ == "__main__":
    main()
