"""Image-quality metrics: the one place they are computed (training validation, pconv-eval,
the ablation table).

Conventions (stated again in every evaluation report):

* Images are float tensors ``[N, C, H, W]`` with values in ``[0, 1]``; ``data_range = 1``.
* Every function returns one value **per image**, a float tensor ``[N]``; averaging over a
  data set is the caller's job (we average per-image values, as scikit-image would when
  called image by image).
* ``l1``: mean absolute error over pixels and channels; ``mse``: mean squared error;
  ``psnr = 10 * log10(data_range**2 / mse)``, capped at ``PSNR_MAX_DB`` = 100 dB so that
  one exactly reproduced image (possible for flat, 8-bit content) cannot make a bucket's
  mean infinite (pass ``max_db=None`` for the uncapped value).
* ``ssim``: Wang et al. 2004 with an 11×11 Gaussian window, σ = 1.5, ``K1 = 0.01``,
  ``K2 = 0.03``, population (not sample) covariances, computed per channel over the
  *valid* region (window fully inside the image, no padding: the map is
  ``[N, C, H - 10, W - 10]``) and averaged over channels and positions. This equals
  ``skimage.metrics.structural_similarity(a, b, gaussian_weights=True, sigma=1.5,
  use_sample_covariance=False, data_range=1, channel_axis=...)``, which filters with
  reflect padding but then crops the 5-pixel border the padding touched.
* Region weights (``weight``, ``[N or 1, 1 or C, H, W]``, non-negative) restrict a metric
  to a region, e.g. the hole: ``weight = 1 - mask`` with the mask convention 1 = known,
  0 = hole. ``l1``/``mse`` become weighted means over pixels and channels
  (``sum(w * err) / sum(w)`` with a one-channel ``w`` counted once per channel),
  ``psnr`` is computed from the weighted ``mse``, and ``ssim`` averages its map over the
  window *centres* weighted by ``w`` (the centre of map entry ``(i, j)`` is image pixel
  ``(i + 5, j + 5)``), so hole pixels within 5 pixels of the image border do not count.
  A region with zero total weight gives NaN (the metric is undefined there).

Everything is batched torch code and runs on the device of its inputs. By default the
arithmetic is float64 (``dtype`` argument): SSIM subtracts nearly equal local moments, and
float32 costs it ~1e-4 of agreement with scikit-image for no gain worth having at
evaluation sizes.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["DATA_RANGE", "PSNR_MAX_DB", "SSIM_WINDOW", "SSIM_SIGMA", "SSIM_K1", "SSIM_K2",
           "gaussian_window", "l1", "mse", "psnr", "ssim", "ssim_map",
           "inpainting_metrics", "METRIC_NAMES", "REGIONS", "CONVENTIONS"]

DATA_RANGE = 1.0
PSNR_MAX_DB = 100.0
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03

METRIC_NAMES = ("l1", "mse", "psnr", "ssim")
REGIONS = ("whole", "hole")

CONVENTIONS = (
    "Metrics compare the composite (known pixels from the ground truth, holes from the "
    "method; values clamped to [0, 1]) with the ground truth; images in [0, 1], data "
    "range 1; one value per image, averaged over the images of a bucket. "
    "L1 = mean absolute error, MSE = mean squared error (over pixels and RGB channels); "
    "PSNR = 10 log10(1 / MSE) per image, capped at 100 dB. SSIM: Gaussian window 11x11, "
    "sigma 1.5, K1 0.01, K2 0.03, population covariances, per channel over the valid "
    "region (no padding, the 5-pixel border excluded), averaged over channels (= skimage structural_similarity with "
    "gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1). "
    "Whole = over the whole image. Hole = over hole pixels only: L1/MSE averaged over hole "
    "pixels and channels, PSNR from that MSE, SSIM map averaged over the window centres "
    "that are hole pixels (at least 5 pixels from the border).")


def _check_pair(pred: Tensor, target: Tensor, name: str) -> None:
    if pred.dim() != 4 or pred.shape != target.shape:
        raise ValueError(f"{name}: pred and target must both be [N, C, H, W] of one shape, got "
                         f"{list(pred.shape)} and {list(target.shape)}")


def _check_weight(weight: Tensor, pred: Tensor, name: str) -> Tensor:
    n, c, h, w = pred.shape
    if weight.dim() != 4 or weight.shape[0] not in (1, n) or weight.shape[1] not in (1, c) \
            or tuple(weight.shape[2:]) != (h, w):
        raise ValueError(f"{name}: weight must be [{n} or 1, 1 or {c}, {h}, {w}] for images "
                         f"{list(pred.shape)}, got {list(weight.shape)}")
    return weight


def _weighted_mean(values: Tensor, weight: Tensor | None) -> Tensor:
    """Per-image mean of ``values`` ``[N, C, H, W]``, weighted by ``weight`` (broadcast to
    ``values``); ``[N]``. Zero total weight gives NaN (0 / 0)."""
    if weight is None:
        return values.flatten(1).mean(1)
    full = weight.to(values.dtype).expand_as(values)
    return (values * full).flatten(1).sum(1) / full.flatten(1).sum(1)


def l1(pred: Tensor, target: Tensor, weight: Tensor | None = None, *,
       dtype: torch.dtype = torch.float64) -> Tensor:
    """Mean absolute error per image: ``pred``, ``target`` ``[N, C, H, W]`` -> ``[N]``.

    ``weight`` ``[N or 1, 1 or C, H, W]`` restricts it to a region (e.g. ``1 - mask`` for
    the hole, mask 1 = known, 0 = hole); see the module docstring.
    """
    _check_pair(pred, target, "l1")
    if weight is not None:
        _check_weight(weight, pred, "l1")
    return _weighted_mean((pred.to(dtype) - target.to(dtype)).abs(), weight)


def mse(pred: Tensor, target: Tensor, weight: Tensor | None = None, *,
        dtype: torch.dtype = torch.float64) -> Tensor:
    """Mean squared error per image: ``[N, C, H, W]`` pairs -> ``[N]``; ``weight`` as
    :func:`l1`."""
    _check_pair(pred, target, "mse")
    if weight is not None:
        _check_weight(weight, pred, "mse")
    return _weighted_mean((pred.to(dtype) - target.to(dtype)).square(), weight)


def psnr(pred: Tensor, target: Tensor, weight: Tensor | None = None, *,
         data_range: float = DATA_RANGE, max_db: float | None = PSNR_MAX_DB,
         dtype: torch.dtype = torch.float64) -> Tensor:
    """Peak signal-to-noise ratio in dB per image: ``[N, C, H, W]`` pairs -> ``[N]``.

    ``10 * log10(data_range**2 / mse)``, at most ``max_db`` (``None``: identical images
    give ``inf``). ``weight`` as :func:`l1` (the PSNR of the region's MSE).
    """
    return _psnr_from_mse(mse(pred, target, weight, dtype=dtype), data_range, max_db)


def _psnr_from_mse(err: Tensor, data_range: float, max_db: float | None) -> Tensor:
    db = 10.0 * torch.log10(data_range ** 2 / err)
    # clamp_max keeps NaN (an empty region) as NaN.
    return db if max_db is None else db.clamp_max(max_db)


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA, *,
                    dtype: torch.dtype = torch.float64, device=None) -> Tensor:
    """The normalised 1-D Gaussian ``[size]`` (odd size) whose outer product is the SSIM
    window; the same taps as ``scipy.ndimage.gaussian_filter(sigma=1.5, truncate=3.5)``."""
    if size < 1 or size % 2 == 0:
        raise ValueError(f"gaussian_window: size must be odd and positive, got {size}")
    x = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2
    g = torch.exp(-0.5 * (x / sigma) ** 2)
    return g / g.sum()


def _filter(x: Tensor, window: Tensor) -> Tensor:
    """Separable valid-region filtering of every plane of ``x`` ``[..., H, W]`` with the
    1-D ``window``: ``[..., H - k + 1, W - k + 1]``.

    Written as ``k`` shifted in-place multiply-adds per axis rather than a convolution: a
    one-channel float64 convolution has no fast CPU kernel and was ~4x slower here.
    """
    k = window.numel()
    h, w = x.shape[-2:]
    taps = window.tolist()
    rows = x[..., :, 0:w - k + 1] * taps[0]
    for i in range(1, k):
        rows.add_(x[..., :, i:i + w - k + 1], alpha=taps[i])
    out = rows[..., 0:h - k + 1, :] * taps[0]
    for i in range(1, k):
        out.add_(rows[..., i:i + h - k + 1, :], alpha=taps[i])
    return out


def ssim_map(pred: Tensor, target: Tensor, *, data_range: float = DATA_RANGE,
             window_size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA,
             k1: float = SSIM_K1, k2: float = SSIM_K2,
             dtype: torch.dtype = torch.float64) -> Tensor:
    """The SSIM map ``[N, C, H - window_size + 1, W - window_size + 1]`` of ``[N, C, H, W]``
    pairs (valid region; entry ``(i, j)`` is the window centred on pixel
    ``(i + window_size // 2, j + window_size // 2)``)."""
    _check_pair(pred, target, "ssim")
    h, w = pred.shape[-2:]
    if h < window_size or w < window_size:
        raise ValueError(f"ssim: images of {h}x{w} are smaller than the {window_size}x"
                         f"{window_size} window")
    x, y = pred.to(dtype), target.to(dtype)
    window = gaussian_window(window_size, sigma, dtype=dtype, device=x.device)
    n = x.shape[0]
    # One filtering pass over the five moment images instead of five calls.
    moments = _filter(torch.cat([x, y, x * x, y * y, x * y]), window)
    ux, uy, uxx, uyy, uxy = moments.split(n)
    vx, vy, vxy = uxx - ux * ux, uyy - uy * uy, uxy - ux * uy
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    return ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))


def ssim(pred: Tensor, target: Tensor, weight: Tensor | None = None, *,
         data_range: float = DATA_RANGE, window_size: int = SSIM_WINDOW,
         sigma: float = SSIM_SIGMA, k1: float = SSIM_K1, k2: float = SSIM_K2,
         dtype: torch.dtype = torch.float64) -> Tensor:
    """Structural similarity per image: ``[N, C, H, W]`` pairs -> ``[N]`` (see the module
    docstring for the settings). ``weight`` ``[N or 1, 1 or C, H, W]`` (e.g. ``1 - mask``
    for the hole, mask 1 = known) weights the map by the weight at each window centre."""
    if weight is not None:
        _check_weight(weight, pred, "ssim")
    s = ssim_map(pred, target, data_range=data_range, window_size=window_size, sigma=sigma,
                 k1=k1, k2=k2, dtype=dtype)
    if weight is None:
        return s.flatten(1).mean(1)
    r = window_size // 2
    centres = weight[..., r:weight.shape[-2] - r, r:weight.shape[-1] - r]
    return _weighted_mean(s, centres)


def inpainting_metrics(result: Tensor, target: Tensor, mask: Tensor, *,
                       data_range: float = DATA_RANGE,
                       dtype: torch.dtype = torch.float64) -> dict[str, Tensor]:
    """Every metric of the evaluation table for one batch.

    Args:
        result: the composite to score, ``[N, 3, H, W]`` in [0, 1] (clamp first).
        target: the ground truth ``[N, 3, H, W]``.
        mask: ``[N or 1, 1, H, W]``, 1 = known, 0 = hole (soft masks weight fractionally).

    Returns:
        ``{f"{region}_{metric}": Tensor [N]}`` for region in ``REGIONS`` ("whole", "hole")
        and metric in ``METRIC_NAMES`` ("l1", "mse", "psnr", "ssim").
    """
    hole = 1.0 - mask.to(dtype)
    # One SSIM map serves both regions.
    s = ssim_map(result, target, data_range=data_range, dtype=dtype)
    r = SSIM_WINDOW // 2
    out = {}
    for region, weight in (("whole", None), ("hole", hole)):
        err = mse(result, target, weight, dtype=dtype)
        out[f"{region}_l1"] = l1(result, target, weight, dtype=dtype)
        out[f"{region}_mse"] = err
        out[f"{region}_psnr"] = _psnr_from_mse(err, data_range, PSNR_MAX_DB)
        centres = None if weight is None else weight[..., r:-r, r:-r]
        out[f"{region}_ssim"] = _weighted_mean(s, centres)
    return out
