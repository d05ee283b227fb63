"""pconv_cuda: fused partial convolution for PyTorch (Liu et al. 2018).

Mask convention everywhere: 1 = known pixel, 0 = hole, values in [0, 1].

* :func:`partial_conv2d` -- functional API over ``torch.ops.pconv.partial_conv2d``.
* :class:`PartialConv2d` -- drop-in for ``nn.Conv2d`` and NVIDIA's ``PartialConv2d``.
* :mod:`pconv_cuda.reference` -- the same operation in plain PyTorch (the oracle).
"""
import torch  # noqa: F401  (loads libtorch, which the compiled library links against)

try:
    from . import _C  # noqa: F401  (registers torch.ops.pconv.*)
except ImportError as exc:  # pragma: no cover - exercised only on a broken install
    raise ImportError(
        "pconv_cuda: the compiled library pconv_cuda._C could not be loaded "
        f"({exc}). Build it with `pip install --no-build-isolation .` (or `-e .`) against "
        "the torch you run with."
    ) from exc

from . import ops as _ops  # noqa: E402,F401  (fake kernels)
from . import reference  # noqa: E402
from .functional import partial_conv2d  # noqa: E402
from .modules import LeanPartialConv2d, PartialConv2d, ReferencePartialConv2d  # noqa: E402

__all__ = [
    "partial_conv2d",
    "PartialConv2d",
    "ReferencePartialConv2d",
    "LeanPartialConv2d",
    "reference",
    "has_cuda_kernels",
    "release_cpu_cache",
]
__version__ = "0.1.0"


def has_cuda_kernels() -> bool:
    """True when the library was built with its CUDA kernels."""
    return torch._C._dispatch_has_kernel_for_dispatch_key("pconv::partial_conv2d", "CUDA")


def release_cpu_cache() -> int:
    """Free the idle CPU memory blocks kept for reuse, and return how many bytes that was.

    In training, the fused layer keeps ``x * m`` for its backward in blocks that go back
    to a cache, not to the system, when the backward is done, so the next step reuses
    them instead of page-faulting fresh memory. The cache holds at most the blocks of one
    step (and never more than 2 GiB); call this when training is over to return them."""
    return _C.release_cpu_cache()
