"""PSNR, SSIM and latent MSE (qrunner.image_metrics): exact on constructed cases, and SSIM equal to
scikit-image's where it is installed."""
from __future__ import annotations

import math

import pytest
import torch

from qrunner.image_metrics import latent_mse, psnr, ssim


def _images(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    smooth = torch.nn.functional.avg_pool2d(torch.rand(2, 3, 40, 36, generator=g), 3, 1, 1)  # some structure
    return smooth.clamp(0, 1)


def test_psnr_is_exact_on_a_known_difference():
    a = _images()
    assert psnr(a, a) == [math.inf, math.inf]
    b = a + 0.1  # MSE 0.01 in every image: 20 dB
    assert psnr(a, b) == pytest.approx([20.0, 20.0], abs=1e-5)  # 0.1 is not exact in float32
    assert psnr(a[0] * 255, b[0] * 255, data_range=255.0) == pytest.approx([20.0], abs=1e-5)


def test_ssim_is_one_for_equal_images_and_falls_with_noise():
    a = _images()
    assert ssim(a, a) == pytest.approx([1.0, 1.0], abs=1e-12)
    g = torch.Generator().manual_seed(1)
    little = ssim(a, (a + 0.02 * torch.randn(a.shape, generator=g)).clamp(0, 1))
    much = ssim(a, (a + 0.2 * torch.randn(a.shape, generator=g)).clamp(0, 1))
    assert all(0.1 < m < 0.5 < 0.9 < l < 1.0 for l, m in zip(little, much))
    with pytest.raises(ValueError, match="at least 11 x 11"):
        ssim(a[:, :, :8, :8], a[:, :, :8, :8])
    with pytest.raises(ValueError, match="differ in shape"):
        ssim(a, a[:, :, :20])


def test_ssim_matches_scikit_image():
    metrics = pytest.importorskip("skimage.metrics")
    a = _images(2)
    g = torch.Generator().manual_seed(3)
    b = (a + 0.05 * torch.randn(a.shape, generator=g)).clamp(0, 1)
    ours = ssim(a, b)
    for i in range(len(a)):
        ref = metrics.structural_similarity(a[i].numpy(), b[i].numpy(), channel_axis=0, data_range=1.0,
                                            gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
        assert ours[i] == pytest.approx(float(ref), abs=1e-6)


def test_latent_mse_per_sample():
    a = torch.zeros(2, 4, 5)
    b = a.clone()
    b[1] += 0.5
    assert latent_mse(a, b) == [0.0, 0.25]
