"""PartialConv2d as a drop-in for nn.Conv2d and for NVIDIA's published PartialConv2d."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pconv_cuda


class NvidiaStyleLayer(nn.Conv2d):
    """The published layer's behaviour, restated for the comparison: a ones kernel of shape
    [C_out, C_in, kh, kw] (multi-channel) or [1, 1, kh, kw], the mask window sum in the
    input dtype, bias added, removed and re-added, and the ratio cached per input shape."""

    def __init__(self, *args, multi_channel=False, return_mask=False, **kwargs):
        super().__init__(*args, **kwargs)
        self.multi_channel, self.return_mask = multi_channel, return_mask
        if multi_channel:
            self.ones = torch.ones(self.out_channels, self.in_channels, *self.kernel_size)
        else:
            self.ones = torch.ones(1, 1, *self.kernel_size)
        self.win = self.ones.shape[1] * self.ones.shape[2] * self.ones.shape[3]
        self.last_size = None

    def forward(self, x, mask_in=None):
        if mask_in is not None or self.last_size != tuple(x.shape):
            self.last_size = tuple(x.shape)
            with torch.no_grad():
                ones = self.ones.to(x)
                if mask_in is None:
                    shape = x.shape if self.multi_channel else (1, 1, *x.shape[2:])
                    mask = torch.ones(shape).to(x)
                else:
                    mask = mask_in
                upd = F.conv2d(mask, ones, None, self.stride, self.padding, self.dilation, 1)
                self.ratio = self.win / (upd + 1e-8)
                self.upd = torch.clamp(upd, 0, 1)
                self.ratio = self.ratio * self.upd
        raw = super().forward(x * mask_in if mask_in is not None else x)
        if self.bias is not None:
            b = self.bias.view(1, self.out_channels, 1, 1)
            out = ((raw - b) * self.ratio + b) * self.upd
        else:
            out = raw * self.ratio
        return (out, self.upd) if self.return_mask else out


CONFIGS = [
    dict(in_channels=4, out_channels=6, kernel_size=3, padding=1),
    dict(in_channels=4, out_channels=6, kernel_size=5, stride=2, padding=2, bias=False),
    dict(in_channels=4, out_channels=8, kernel_size=3, padding=2, dilation=2, groups=2),
    dict(in_channels=3, out_channels=5, kernel_size=(7, 3), stride=(2, 1), padding=(3, 1)),
]


@pytest.mark.parametrize("multi", [False, True], ids=["single", "multi"])
@pytest.mark.parametrize("cfg", CONFIGS, ids=[str(i) for i in range(len(CONFIGS))])
@pytest.mark.parametrize("with_mask", [True, False], ids=["mask", "nomask"])
def test_same_outputs_and_grads_as_published_layer(cfg, multi, with_mask):
    torch.manual_seed(0)
    ours = pconv_cuda.PartialConv2d(**cfg, multi_channel=multi, return_mask=True).double()
    theirs = NvidiaStyleLayer(**cfg, multi_channel=multi, return_mask=True).double()
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, cfg["in_channels"], 13, 11, dtype=torch.float64, requires_grad=True)
    mc = cfg["in_channels"] if multi else 1
    mask = (torch.rand(2, mc, 13, 11) > 0.4).double() if with_mask else None
    out, upd = ours(x, mask)
    ref_out, ref_upd = theirs(x, mask)
    # A mask-less call is computed as single-channel whatever the mode; the published
    # multi-channel layer counts C_in ones per tap, which moves only the 1e-8 guard of the
    # ratio: win / (S + 1e-8) differs by about 1e-9 relative, sums of it by up to 1e-7 (float32 cannot see it).
    tol = 1e-7 if multi and not with_mask else 1e-10
    torch.testing.assert_close(out, ref_out, rtol=tol, atol=tol)
    torch.testing.assert_close(upd, ref_upd.expand_as(upd), rtol=0, atol=0)
    if multi:
        assert upd.shape[1] == cfg["out_channels"] and upd.stride(1) == 0  # a view, not a copy
    else:
        assert upd.shape[1] == 1
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, [x, *ours.parameters()], g)
    want = torch.autograd.grad(ref_out, [x, *theirs.parameters()], g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def test_state_dict_is_exactly_conv2d():
    ours = pconv_cuda.PartialConv2d(4, 6, 3, padding=1, multi_channel=True)
    conv = nn.Conv2d(4, 6, 3, padding=1)
    assert set(ours.state_dict()) == {"weight", "bias"} == set(conv.state_dict())
    ours.load_state_dict(conv.state_dict())
    conv.load_state_dict(ours.state_dict())
    theirs = NvidiaStyleLayer(4, 6, 3, padding=1, multi_channel=True)
    ours.load_state_dict(theirs.state_dict())
    torch.testing.assert_close(ours.weight, theirs.weight)
    assert set(pconv_cuda.PartialConv2d(4, 6, 3, bias=False).state_dict()) == {"weight"}


def test_return_mask_off_returns_only_the_output():
    layer = pconv_cuda.PartialConv2d(3, 4, 3, padding=1)
    out = layer(torch.randn(1, 3, 8, 8), torch.ones(1, 1, 8, 8))
    assert isinstance(out, torch.Tensor) and out.shape == (1, 4, 8, 8)


def test_without_mask_all_ones_is_a_renormalised_conv():
    """Interior windows equal nn.Conv2d; border windows are renormalised."""
    torch.manual_seed(1)
    layer = pconv_cuda.PartialConv2d(3, 4, 3, padding=1).double()
    conv = nn.Conv2d(3, 4, 3, padding=1).double()
    conv.load_state_dict(layer.state_dict())
    x = torch.randn(2, 3, 10, 10, dtype=torch.float64)
    torch.testing.assert_close(layer(x)[..., 1:-1, 1:-1], conv(x)[..., 1:-1, 1:-1])
    assert not torch.allclose(layer(x)[..., 0, :], conv(x)[..., 0, :])


def test_maskless_call_after_masked_call_is_not_stale():
    """The published layer reuses a ratio computed from a real mask for a later mask-less
    call of the same shape; ours never does."""
    torch.manual_seed(2)
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    mask = torch.zeros(1, 1, 8, 8, dtype=torch.float64)
    mask[..., :4] = 1
    ours = pconv_cuda.PartialConv2d(3, 4, 3, padding=1).double()
    theirs = NvidiaStyleLayer(3, 4, 3, padding=1).double()
    theirs.load_state_dict(ours.state_dict())
    fresh = NvidiaStyleLayer(3, 4, 3, padding=1).double()
    fresh.load_state_dict(ours.state_dict())
    ours(x, mask)
    theirs(x, mask)
    stale = theirs(x)
    want = fresh(x)
    got = ours(x)
    torch.testing.assert_close(got, want)
    assert not torch.allclose(stale, want)  # the bug we do not reproduce


@pytest.mark.parametrize("kernel, dilation", [(4, 1), (2, 3), (5, 2)])
@pytest.mark.parametrize("with_mask", [True, False], ids=["mask", "nomask"])
def test_same_padding_of_any_kernel_matches_published_layer(kernel, dilation, with_mask):
    """'same' with an even dilated kernel pads one more row and column at the bottom and
    right, as nn.Conv2d does; the published layer counts them as hole, and so do we."""
    torch.manual_seed(3)
    cfg = dict(in_channels=3, out_channels=4, kernel_size=kernel, padding="same",
               dilation=dilation)
    ours = pconv_cuda.PartialConv2d(**cfg, return_mask=True).double()
    theirs = NvidiaStyleLayer(**cfg, return_mask=True).double()
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, 3, 9, 8, dtype=torch.float64)
    mask = (torch.rand(2, 1, 9, 8) > 0.4).double() if with_mask else None
    out, update = ours(x, mask)
    want_out, want_update = theirs(x, mask)
    assert out.shape == nn.Conv2d(**cfg)(x.float()).shape == (2, 4, 9, 8)
    torch.testing.assert_close(out, want_out)
    torch.testing.assert_close(update, want_update.expand_as(update))


def test_padding_set_after_construction_takes_effect():
    x = torch.randn(1, 2, 7, 7)
    layer = pconv_cuda.PartialConv2d(2, 3, 3)
    assert layer(x).shape == (1, 3, 5, 5)
    layer.padding = (1, 1)
    assert layer(x).shape == (1, 3, 7, 7)
    layer.padding = "same"
    assert layer(x).shape == (1, 3, 7, 7)
    layer.padding = "valid"
    assert layer(x).shape == (1, 3, 5, 5)


@pytest.mark.parametrize("multi", [False, True], ids=["single", "multi"])
def test_unbatched_input_like_nn_conv2d(multi):
    torch.manual_seed(4)
    layer = pconv_cuda.PartialConv2d(3, 4, 3, padding=1, multi_channel=multi, return_mask=True)
    x = torch.randn(3, 6, 5)
    mask = (torch.rand(3 if multi else 1, 6, 5) > 0.4).float()
    out, update = layer(x, mask)
    batched_out, batched_update = layer(x[None], mask[None])
    assert out.shape == nn.Conv2d(3, 4, 3, padding=1)(x).shape
    torch.testing.assert_close(out, batched_out[0])
    torch.testing.assert_close(update, batched_update[0])
    assert layer(x)[0].shape == (4, 6, 5)


def test_nvidia_mask_in_keyword():
    torch.manual_seed(5)
    layer = pconv_cuda.PartialConv2d(3, 4, 3, padding=1)
    x, mask = torch.randn(2, 3, 6, 6), (torch.rand(2, 1, 6, 6) > 0.5).float()
    torch.testing.assert_close(layer(x, mask_in=mask), layer(x, mask))


def test_symbolic_trace_with_a_mask():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = pconv_cuda.PartialConv2d(3, 4, 3, padding=1, return_mask=True)
            self.b = pconv_cuda.PartialConv2d(4, 2, 3, padding="same")

        def forward(self, x, mask):
            y, mask = self.a(x, mask)
            return self.b(torch.relu(y), mask)

    torch.manual_seed(6)
    net = Net()
    traced = torch.fx.symbolic_trace(net)
    x, mask = torch.randn(2, 3, 8, 8), (torch.rand(2, 1, 8, 8) > 0.5).float()
    torch.testing.assert_close(traced(x, mask), net(x, mask))
    assert any(node.target is torch.ops.pconv.partial_conv2d.default
               for node in traced.graph.nodes)


def test_same_and_valid_padding_strings():
    x = torch.randn(1, 2, 9, 9)
    same = pconv_cuda.PartialConv2d(2, 3, 5, padding="same", dilation=2)
    assert same(x).shape == (1, 3, 9, 9)
    valid = pconv_cuda.PartialConv2d(2, 3, 5, padding="valid")
    assert valid(x).shape == (1, 3, 5, 5)


def test_module_as_conv2d_in_a_sequential_and_bool_mask():
    model = nn.Sequential(pconv_cuda.PartialConv2d(3, 4, 3, padding=1), nn.ReLU())
    x = torch.randn(2, 3, 6, 6)
    assert model(x).shape == (2, 4, 6, 6)
    layer = pconv_cuda.PartialConv2d(3, 4, 3, padding=1)
    m = torch.rand(2, 1, 6, 6) > 0.5
    torch.testing.assert_close(layer(x, m), layer(x, m.float()))
    # Like nn.Conv2d, the repr names only arguments away from their defaults.
    assert "multi_channel" not in repr(layer) and "return_mask" not in repr(layer)
    flags = pconv_cuda.PartialConv2d(3, 4, 3, multi_channel=True, return_mask=True)
    assert repr(flags).endswith("multi_channel=True, return_mask=True)")
