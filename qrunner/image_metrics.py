"""How close a quantized denoiser's images are to the original's: PSNR and SSIM of decoded images, MSE of latents.

- PSNR: ``10 log10(L^2 / MSE)`` over every pixel and channel of one image, L the data range (1 for images in
  [0, 1]); identical images give infinity.
- SSIM (Wang, Bovik, Sheikh and Simoncelli, 2004): local means, variances and covariance under an 11 x 11
  Gaussian window (sigma 1.5, truncated at 3.5 sigma), constants ``(0.01 L)^2`` and ``(0.03 L)^2``, computed per
  channel at every position where the window fits inside the image and averaged. This is scikit-image's
  ``structural_similarity(..., gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=L)``,
  which filters the padded image and then drops the border where the window does not fit.

Images are ``[C, H, W]`` (or batches ``[N, C, H, W]``: one figure per image) float tensors.
"""
from __future__ import annotations

import math
from typing import List

import torch
import torch.nn.functional as F

SIGMA = 1.5
RADIUS = int(3.5 * SIGMA + 0.5)  # scipy's gaussian_filter truncation (truncate=3.5): an 11-wide window
K1, K2 = 0.01, 0.03


def _as_batch(x: torch.Tensor) -> torch.Tensor:
    if x.dim() == 3:
        return x.unsqueeze(0)
    if x.dim() != 4:
        raise ValueError(f"images must be [C, H, W] or [N, C, H, W], got shape {tuple(x.shape)}")
    return x


def _check(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(f"images differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> List[float]:
    """PSNR in dB of each image of `a` against the same image of `b`."""
    a, b = _as_batch(a).double(), _as_batch(b).double()
    _check(a, b)
    mse = ((a - b) ** 2).flatten(1).mean(1)
    return [math.inf if m == 0 else 10.0 * math.log10(data_range ** 2 / float(m)) for m in mse]


def _gaussian_window() -> torch.Tensor:
    x = torch.arange(-RADIUS, RADIUS + 1, dtype=torch.float64)
    w = torch.exp(-(x ** 2) / (2 * SIGMA ** 2))
    return w / w.sum()


def _local_mean(x: torch.Tensor) -> torch.Tensor:
    """Gaussian-weighted mean over the window at every position where it fits ('valid'), per channel."""
    w = _gaussian_window().to(x.dtype)
    channels = x.shape[1]
    x = F.conv2d(x, w.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)
    return F.conv2d(x, w.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> List[float]:
    """Mean SSIM of each image of `a` against the same image of `b` (channels averaged)."""
    a, b = _as_batch(a).double(), _as_batch(b).double()
    _check(a, b)
    side = 2 * RADIUS + 1
    if min(a.shape[-2:]) < side:
        raise ValueError(f"SSIM needs images of at least {side} x {side} pixels, got {tuple(a.shape[-2:])}")
    c1, c2 = (K1 * data_range) ** 2, (K2 * data_range) ** 2
    mu_a, mu_b = _local_mean(a), _local_mean(b)
    var_a = _local_mean(a * a) - mu_a ** 2
    var_b = _local_mean(b * b) - mu_b ** 2
    cov = _local_mean(a * b) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return [float(v) for v in s.flatten(1).mean(1)]


def latent_mse(a: torch.Tensor, b: torch.Tensor) -> List[float]:
    """Mean squared difference of each sample's final latents."""
    _check(a, b)
    return [float(v) for v in ((a.double() - b.double()) ** 2).flatten(1).mean(1)]
