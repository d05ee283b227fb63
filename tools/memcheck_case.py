"""A small forward + backward of every kernel path on CUDA, for compute-sanitizer.

Covers NCHW and channels_last, single- and multi-channel masks, a batch-broadcast mask, no
mask, bias and no bias, float32 and float16, and an empty window, at sizes small enough to
run under memcheck in seconds.
"""
import torch

import pconv_cuda


def run(dtype, layout, mask_channels, mask_batch, bias):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, 13, 11, generator=g).to("cuda", dtype).contiguous(memory_format=layout)
    w = torch.randn(8, 6, 3, 3, generator=g).to("cuda", dtype)
    b = torch.randn(8, generator=g).to("cuda", dtype) if bias else None
    m = None
    if mask_channels:
        m = (torch.rand(mask_batch, mask_channels, 13, 11, generator=g) > 0.4).to("cuda", dtype)
        m[..., 2:9, 2:9] = 0  # windows with no known pixel
    x.requires_grad_(True)
    w.requires_grad_(True)
    out, update = pconv_cuda.partial_conv2d(x, m, w, b, stride=(2, 1), padding=1)
    out.float().sum().backward()
    torch.cuda.synchronize()
    assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()


def main():
    for dtype in (torch.float32, torch.float16):
        for layout in (torch.contiguous_format, torch.channels_last):
            for mask_channels, mask_batch in ((1, 2), (6, 2), (1, 1), (0, 1)):
                for bias in (True, False):
                    run(dtype, layout, mask_channels, mask_batch, bias)
    print("memcheck case: all paths ran")


if __name__ == "__main__":
    main()
