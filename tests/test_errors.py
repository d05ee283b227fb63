"""Bad input gets a clear error naming the argument and the shapes, from the op itself
(C++) and through the module."""
import pytest
import torch

import pconv_cuda

X = torch.randn(2, 4, 8, 8)
W = torch.randn(6, 4, 3, 3)
M = torch.ones(2, 1, 8, 8)


def call(input=X, mask=M, weight=W, bias=None, stride=(1, 1), padding=(1, 1), dilation=(1, 1),
         groups=1):
    return torch.ops.pconv.partial_conv2d(input, mask, weight, bias, stride, padding, dilation,
                                          groups)


@pytest.mark.parametrize("kwargs, pattern", [
    (dict(input=torch.randn(4, 8, 8)),
     r"input must be a 4-D tensor \[N, C_in, H, W\], got shape \[4, 8, 8\]"),
    (dict(input=torch.ones(2, 4, 8, 8, dtype=torch.long), mask=None, weight=W.long()),
     r"input must have a floating-point dtype, got Long"),
    (dict(weight=torch.randn(6, 4, 3)), r"weight must be a 4-D tensor .* got shape \[6, 4, 3\]"),
    (dict(mask=torch.ones(2, 8, 8)), r"mask must be a 4-D tensor .* got shape \[2, 8, 8\]"),
    (dict(mask=torch.ones(2, 1, 8, 7)),
     r"mask spatial size \[8, 7\] does not match input spatial size \[8, 8\] "
     r"\(mask shape \[2, 1, 8, 7\], input shape \[2, 4, 8, 8\]\)"),
    (dict(mask=torch.ones(2, 3, 8, 8)),
     r"mask must have 1 channel or C_in=4 channels, got mask shape \[2, 3, 8, 8\] for input "
     r"shape \[2, 4, 8, 8\]"),
    (dict(mask=torch.ones(3, 1, 8, 8)),
     r"mask batch size must be 2 or 1, got mask shape \[3, 1, 8, 8\]"),
    (dict(mask=M.double()), r"mask has dtype Double but input has dtype Float"),
    (dict(weight=W.double()), r"weight has dtype Double but input has dtype Float"),
    (dict(bias=torch.randn(6).double()), r"bias has dtype Double but input has dtype Float"),
    (dict(bias=torch.randn(5)), r"bias must have shape \[6\] \(C_out\), got \[5\]"),
    (dict(stride=(0, 1)), r"stride must be positive, got \[0, 1\]"),
    (dict(stride=(1, -2)), r"stride must be positive, got \[1, -2\]"),
    (dict(dilation=(0, 1)), r"dilation must be positive, got \[0, 1\]"),
    (dict(padding=(-1, 0)), r"padding must be non-negative, got \[-1, 0\]"),
    (dict(groups=0), r"groups must be positive, got 0"),
    (dict(weight=torch.randn(6, 3, 3, 3)),
     r"weight of shape \[6, 3, 3, 3\] with groups=1 expects input with 3 channels, but input "
     r"has shape \[2, 4, 8, 8\]"),
    (dict(weight=torch.randn(6, 4, 3, 3), groups=2),
     r"weight of shape \[6, 4, 3, 3\] with groups=2 expects input with 8 channels"),
    (dict(weight=torch.randn(5, 2, 3, 3), groups=2),
     r"weight of shape \[5, 2, 3, 3\] has C_out=5, which is not divisible by groups=2"),
    (dict(weight=torch.randn(6, 4, 11, 11), padding=(0, 0)),
     r"input of shape \[2, 4, 8, 8\] with padding \[0, 0\] is smaller than the dilated kernel "
     r"\[11, 11\]"),
])
def test_op_errors(kwargs, pattern):
    with pytest.raises(RuntimeError, match=r"partial_conv2d: " + pattern):
        call(**kwargs)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_device_mismatch():
    with pytest.raises(RuntimeError, match=r"mask is on cuda:0 but input is on cpu"):
        call(mask=M.cuda())


def test_device_mismatch_meta():
    """Device checks without a GPU: a meta-device mask against a CPU input."""
    with pytest.raises(RuntimeError, match=r"mask is on meta but input is on cpu"):
        call(mask=torch.ones(2, 1, 8, 8, device="meta"))


def test_backward_op_checks_grad_shape():
    with pytest.raises(RuntimeError, match=r"grad_output must have shape \[2, 6, 8, 8\], got "
                                           r"\[2, 6, 8, 7\]"):
        torch.ops.pconv.partial_conv2d_backward(torch.randn(2, 6, 8, 7), X, M, W, False, [1, 1],
                                                [1, 1], [1, 1], 1, [True, True, True])


def test_module_mask_channels_follow_the_mode():
    single = pconv_cuda.PartialConv2d(4, 6, 3, padding=1)
    with pytest.raises(ValueError, match=r"multi_channel=False\): mask must have 1 channel"):
        single(X, torch.ones(2, 4, 8, 8))
    multi = pconv_cuda.PartialConv2d(4, 6, 3, padding=1, multi_channel=True)
    with pytest.raises(ValueError, match=r"multi_channel=True\): mask must have 4 channel"):
        multi(X, M)


def test_module_padding_mode():
    with pytest.raises(ValueError, match=r"padding_mode='reflect' is not supported"):
        pconv_cuda.PartialConv2d(4, 6, 3, padding=1, padding_mode="reflect")


def test_input_without_channels():
    """nn.Conv2d returns a malformed output for C_in = 0; the op refuses it."""
    with pytest.raises(RuntimeError, match=r"input of shape \[1, 0, 5, 6\] has no channels"):
        call(input=torch.randn(1, 0, 5, 6), mask=None, weight=torch.randn(4, 0, 1, 1),
             padding=(0, 0))
    with pytest.raises(RuntimeError, match=r"has no channels"):
        pconv_cuda.PartialConv2d(0, 4, 3)(torch.randn(1, 0, 5, 5))


def test_integer_mask_names_the_convention():
    mask = (torch.rand(2, 1, 8, 8) > 0.5).to(torch.uint8) * 255
    with pytest.raises(TypeError, match=r"mask has dtype torch.uint8; .* divide it by 255"):
        pconv_cuda.partial_conv2d(X, mask, W, None, 1, 1)


def test_module_mask_and_mask_in_both_given():
    layer = pconv_cuda.PartialConv2d(4, 6, 3, padding=1)
    with pytest.raises(TypeError, match="mask or as mask_in, not both"):
        layer(X, M, mask_in=M)


def test_train_backward_op_checks_saved_ratio():
    _, _, xm, ratio, update = torch.ops.pconv.partial_conv2d_train(X, M, W, None, [1, 1], [1, 1],
                                                                   [1, 1], 1)
    gy = torch.randn(2, 6, 8, 8)

    def back(r, u):
        return torch.ops.pconv.partial_conv2d_train_backward(
            gy, xm, M, r, u, W, False, [1, 1], [1, 1], [1, 1], 1, [True, True, False])

    back(ratio, update)
    with pytest.raises(RuntimeError, match=r"ratio must be a contiguous tensor of shape "
                                           r"\[2, 1, 8, 8\], got shape \[1, 1, 8, 8\]"):
        back(ratio[:1], update)
    with pytest.raises(RuntimeError, match=r"update must have dtype Float, got Double"):
        back(ratio, update.double())
