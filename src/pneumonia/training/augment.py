"""Random, training-only transforms on batches of [0, 1] grayscale images.

Chosen from what the training films themselves show, not from the test set:

- every film of the Kermany copies was stretched to a square, so the original aspect ratio
  survives as the ratio of horizontal to vertical pixel-to-pixel change and predicts the
  label (a shortcut; `pneumonia data audit` measures it). A crop of random area and
  *independent* width and height, stretched back to the square, varies that ratio in both
  directions, so the network cannot read a film's shape;
- loss of detail (down-and-up resampling, blur, JPEG re-compression), exposure (gamma,
  contrast, brightness), sensor noise, and bright or dark bands at the borders where
  scanners put collimation edges and labels vary between machines and sites.

Geometry is kept anatomically plausible: small rotations, and no horizontal flips (they would
move the heart to the other side). Whether it helps is judged by the stressed validation
(:mod:`pneumonia.training.stress`), never by the test set.
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
    rotate_deg: float = 7.0
    scale: tuple[float, float] = (1.0, 1.0)
    translate: float = 0.03
    #: Crop area (share of the image) and aspect (crop width / height, drawn log-uniform);
    #: the crop is stretched back to the square, so the film's shape varies independently
    #: along each axis. (1, 1) and (1, 1) turn the crop off.
    crop_area: tuple[float, float] = (0.7, 1.0)
    aspect: tuple[float, float] = (0.75, 1.35)
    #: Gamma is drawn log-uniform in this range.
    gamma: tuple[float, float] = (0.74, 1.35)
    contrast: tuple[float, float] = (0.85, 1.15)
    brightness: float = 0.05
    blur_prob: float = 0.3
    blur_sigma: tuple[float, float] = (0.3, 1.5)
    noise_prob: float = 0.2
    noise_std: tuple[float, float] = (0.005, 0.03)
    lowres_prob: float = 0.2
    lowres_factor: tuple[float, float] = (0.35, 0.75)
    jpeg_prob: float = 0.3
    jpeg_quality: tuple[int, int] = (20, 80)
    #: A band of constant brightness (dark or bright) along one random side.
    border_prob: float = 0.2
    border_frac: tuple[float, float] = (0.02, 0.1)

    def __post_init__(self) -> None:
        lo, hi = self.aspect
        if not 0 < lo <= hi or not 0 < self.crop_area[0] <= self.crop_area[1] <= 1:
            raise ValueError(
                f"aspect must be 0 < lo <= hi and crop_area within (0, 1], got {self.aspect}, {self.crop_area}"
            )

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


def crop_extent(area: torch.Tensor, aspect: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Width and height (shares of the image, at most 1) of crops of the given area and aspect."""
    return (area * aspect).sqrt().clamp(max=1.0), (area / aspect).sqrt().clamp(max=1.0)


def jpeg_recompress(x: torch.Tensor, quality: int) -> torch.Tensor:
    """One gray image (1, H, W) in [0, 1] through 8-bit JPEG at ``quality`` and back
    (:func:`pneumonia.shifts.jpeg_roundtrip`)."""
    from pneumonia.shifts import jpeg_roundtrip

    back = jpeg_roundtrip(x[0].detach().cpu().numpy(), quality)
    return torch.from_numpy(back)[None].to(x.dtype)


def augment_batch(x: torch.Tensor, cfg: AugmentConfig, g: torch.Generator) -> torch.Tensor:
    """Apply random geometry and intensity transforms to a batch (N, 1, H, W) in [0, 1]."""
    if not cfg.enabled:
        return x
    n, _, h, w = x.shape
    # Geometry in one affine resampling: a crop of random area and aspect (stretched back to
    # the square), an isotropic zoom, a small rotation and a shift.
    ang = _uniform(n, -cfg.rotate_deg, cfg.rotate_deg, g) * math.pi / 180
    s = _uniform(n, *cfg.scale, g)
    area = _uniform(n, *cfg.crop_area, g)
    aspect = torch.exp(_uniform(n, math.log(cfg.aspect[0]), math.log(cfg.aspect[1]), g))
    cw, ch = crop_extent(area, aspect)
    # The crop's centre may move as far as the crop stays inside the image, plus the shift.
    tx = (1 - cw) * _uniform(n, -1, 1, g) + _uniform(n, -cfg.translate, cfg.translate, g) * 2
    ty = (1 - ch) * _uniform(n, -1, 1, g) + _uniform(n, -cfg.translate, cfg.translate, g) * 2
    cos, sin = torch.cos(ang) / s, torch.sin(ang) / s
    theta = torch.stack(
        [torch.stack([cw * cos, -cw * sin, tx], 1), torch.stack([ch * sin, ch * cos, ty], 1)], 1
    )
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
    # JPEG re-compression at a random quality.
    jpeg = torch.rand(n, generator=g) < cfg.jpeg_prob
    quality = torch.randint(cfg.jpeg_quality[0], cfg.jpeg_quality[1] + 1, (n,), generator=g)
    for i in torch.nonzero(jpeg).flatten().tolist():
        x[i] = jpeg_recompress(x[i], int(quality[i]))
    # A dark or bright band along one side (collimation edges, burnt-in labels).
    band = torch.rand(n, generator=g) < cfg.border_prob
    side = torch.randint(0, 4, (n,), generator=g)
    frac = _uniform(n, *cfg.border_frac, g)
    level = torch.where(
        torch.rand(n, generator=g) < 0.5, _uniform(n, 0.0, 0.1, g), _uniform(n, 0.85, 1.0, g)
    )
    for i in torch.nonzero(band).flatten().tolist():
        k = max(1, round(float(frac[i]) * (h if int(side[i]) < 2 else w)))
        region = [x[i, :, :k, :], x[i, :, h - k :, :], x[i, :, :, :k], x[i, :, :, w - k :]][
            int(side[i])
        ]
        region.fill_(float(level[i]))
    # Exposure: gamma (log-uniform), then contrast and brightness around the image mean.
    gam = torch.exp(_uniform(n, math.log(cfg.gamma[0]), math.log(cfg.gamma[1]), g)).view(n, 1, 1, 1)
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
