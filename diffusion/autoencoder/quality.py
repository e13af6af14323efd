"""How close reconstructions are to their inputs: PSNR and SSIM, per image, in torch.

Both take float NCHW batches in [0, 1] (data range 1). SSIM is Wang et al. (2004): local
means, variances and covariance under an 11x11 Gaussian window (sigma 1.5), the constants
C1 = (0.01 L)^2 and C2 = (0.03 L)^2, averaged over the positions where the window fits
(`valid`; the same figure as scikit-image's `structural_similarity(gaussian_weights=True,
use_sample_covariance=False, data_range=1)`) and over channels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_C1 = 0.01**2
SSIM_C2 = 0.03**2


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB of each image pair: 10 log10(1 / MSE); inf if equal."""
    mse = (x.double() - y.double()).square().flatten(1).mean(1)
    return 10 * torch.log10(1 / mse)


def gaussian_window(size: int, sigma: float) -> torch.Tensor:
    """A normalized (size, size) Gaussian, float64."""
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    line = torch.exp(-(coords**2) / (2 * sigma**2))
    line /= line.sum()
    return line[:, None] * line[None, :]


def ssim(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Structural similarity of each image pair (1: identical). Images smaller than the window
    use the largest odd window that fits (same sigma)."""
    channels, height, width = x.shape[1:]
    size = min(SSIM_WINDOW, height - (height + 1) % 2, width - (width + 1) % 2)
    window = gaussian_window(size, SSIM_SIGMA).to(x.device)
    window = window.expand(channels, 1, size, size)

    def local_mean(z: torch.Tensor) -> torch.Tensor:
        return F.conv2d(z, window, groups=channels)  # valid: only where the window fits

    x, y = x.double(), y.double()
    mu_x, mu_y = local_mean(x), local_mean(y)
    var_x = local_mean(x * x) - mu_x**2
    var_y = local_mean(y * y) - mu_y**2
    cov = local_mean(x * y) - mu_x * mu_y
    luminance = (2 * mu_x * mu_y + SSIM_C1) / (mu_x**2 + mu_y**2 + SSIM_C1)
    structure = (2 * cov + SSIM_C2) / (var_x + var_y + SSIM_C2)
    return (luminance * structure).flatten(1).mean(1)
