"""Random, training-only transforms on batches of [0, 1] grayscale images.

Chosen for the shift between the training films and the official test films: exposure,
contrast, gamma, blur, noise and resolution vary between machines and years. Geometry is
kept anatomically plausible: small rotations, scales and shifts, and no horizontal flips
(they would move the heart to the other side).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AugmentConfig:
    """Ranges of the random transforms; ``enabled=False`` turns them all off."""

    enabled: bool = True
    rotate_deg: float = 10.0
    scale: tuple[float, float] = (0.9, 1.15)
    translate: float = 0.06
    gamma: tuple[float, float] = (0.6, 1.6)
    contrast: tuple[float, float] = (0.7, 1.3)
    brightness: float = 0.1
    blur_prob: float = 0.3
    blur_sigma: tuple[float, float] = (0.3, 1.5)
    noise_prob: float = 0.3
    noise_std: tuple[float, float] = (0.005, 0.04)
    lowres_prob: float = 0.2
    lowres_factor: tuple[float, float] = (0.35, 0.75)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AugmentConfig:
        kw: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        return cls(**kw)


def _uniform(n: int, lo: float, hi: float, g: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=g) * (hi - lo) + lo


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur with one sigma per image."""
    radius = max(1, math.ceil(3 * float(sigma.max())))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype)
    k = torch.exp(-(t[None, :] ** 2) / (2 * sigma[:, None] ** 2))
    k = k / k.sum(1, keepdim=True)  # (N, K)
    n, c, h, w = x.shape
    y = x.reshape(1, n * c, h, w)
    kw = k.repeat_interleave(c, 0)
    y = F.pad(y, (radius, radius, 0, 0), mode="replicate")
    y = F.conv2d(y, kw[:, None, None, :], groups=n * c)
    y = F.pad(y, (0, 0, radius, radius), mode="replicate")
    y = F.conv2d(y, kw[:, None, :, None], groups=n * c)
    return y.reshape(n, c, h, w)


def augment_batch(x: torch.Tensor, cfg: AugmentConfig, g: torch.Generator) -> torch.Tensor:
    """Apply random geometry and intensity transforms to a batch (N, 1, H, W) in [0, 1]."""
    if not cfg.enabled:
        return x
    n, _, h, w = x.shape
    # Geometry: rotation, isotropic scale, translation in one affine resampling.
    ang = _uniform(n, -cfg.rotate_deg, cfg.rotate_deg, g) * math.pi / 180
    s = _uniform(n, *cfg.scale, g)
    tx = _uniform(n, -cfg.translate, cfg.translate, g) * 2
    ty = _uniform(n, -cfg.translate, cfg.translate, g) * 2
    cos, sin = torch.cos(ang) / s, torch.sin(ang) / s
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    # Resolution loss: down and up again.
    low = torch.rand(n, generator=g) < cfg.lowres_prob
    if low.any():
        f = float(_uniform(1, *cfg.lowres_factor, g))
        small = F.interpolate(x[low], scale_factor=f, mode="bilinear", antialias=True)
        x[low] = F.interpolate(small, size=(h, w), mode="bilinear")
    # Blur.
    blur = torch.rand(n, generator=g) < cfg.blur_prob
    if blur.any():
        x[blur] = _gaussian_blur(x[blur], _uniform(int(blur.sum()), *cfg.blur_sigma, g))
    # Exposure: gamma, then contrast and brightness around the image mean.
    gam = _uniform(n, *cfg.gamma, g).view(n, 1, 1, 1)
    x = x.clamp(1e-4, 1.0).pow(gam)
    con = _uniform(n, *cfg.contrast, g).view(n, 1, 1, 1)
    bri = _uniform(n, -cfg.brightness, cfg.brightness, g).view(n, 1, 1, 1)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * con + mean + bri
    # Sensor noise.
    noisy = (torch.rand(n, generator=g) < cfg.noise_prob).view(n, 1, 1, 1).to(x.dtype)
    std = _uniform(n, *cfg.noise_std, g).view(n, 1, 1, 1)
    x = x + noisy * std * torch.randn(x.shape, generator=g)
    return x.clamp(0.0, 1.0)
