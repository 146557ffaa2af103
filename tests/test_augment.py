"""Training-only augmentation: contract kept, reproducible, switchable, never mirrored."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace

import pytest
import torch

from pneumonia.training.augment import AugmentConfig, augment_batch

ALWAYS = AugmentConfig(blur_prob=1.0, noise_prob=1.0, lowres_prob=1.0)


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread() -> Iterator[None]:
    """Tiny tensors: one thread is faster and does not fight a training run for the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def batch(n: int = 8, size: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 1, size, size, generator=torch.Generator().manual_seed(seed))


def half_bright(n: int, size: int = 64, side: str = "left") -> torch.Tensor:
    x = torch.full((n, 1, size, size), 0.2)
    if side == "left":
        x[..., : size // 2] = 0.8
    else:
        x[..., : size // 2, :] = 0.8  # top
    return x


@pytest.mark.parametrize("cfg", [AugmentConfig(), ALWAYS], ids=["default", "every-transform"])
def test_shape_dtype_and_range_are_kept(cfg: AugmentConfig) -> None:
    x = batch()
    out = augment_batch(x.clone(), cfg, torch.Generator().manual_seed(1))
    assert out.shape == x.shape and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert not torch.equal(out, x)


def test_the_callers_batch_is_not_modified() -> None:
    x = batch()
    before = x.clone()
    augment_batch(x, ALWAYS, torch.Generator().manual_seed(1))
    assert torch.equal(x, before)


def test_deterministic_for_a_generator_seed() -> None:
    x = batch()
    a = augment_batch(x.clone(), ALWAYS, torch.Generator().manual_seed(5))
    b = augment_batch(x.clone(), ALWAYS, torch.Generator().manual_seed(5))
    c = augment_batch(x.clone(), ALWAYS, torch.Generator().manual_seed(6))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_disabled_is_the_identity() -> None:
    x = batch()
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    out = augment_batch(x, replace(ALWAYS, enabled=False), g)
    assert torch.equal(out, x)
    assert torch.equal(g.get_state(), state)  # draws nothing, so training stays reproducible


@pytest.mark.parametrize("side", ["left", "top"])
def test_never_mirrored(side: str) -> None:
    """No horizontal (or vertical) flip: the heart must stay on its side. The bright half
    stays brighter in every one of many augmented copies."""
    x = half_bright(256, side=side)
    out = augment_batch(x, ALWAYS, torch.Generator().manual_seed(0))
    half = out.shape[-1] // 2
    if side == "left":
        first, second = out[..., :half].mean((1, 2, 3)), out[..., half:].mean((1, 2, 3))
    else:
        first, second = out[..., :half, :].mean((1, 2, 3)), out[..., half:, :].mean((1, 2, 3))
    assert (first > second).all()


def test_geometry_stays_small() -> None:
    # Only the geometry: a centred square moves by a few pixels at most.
    geometry_only = AugmentConfig(
        scale=(0.9, 1.15),
        translate=0.06,
        crop_area=(1.0, 1.0),
        aspect=(1.0, 1.0),
        jpeg_prob=0.0,
        border_prob=0.0,
        gamma=(1.0, 1.0),
        contrast=(1.0, 1.0),
        brightness=0.0,
        blur_prob=0.0,
        noise_prob=0.0,
        lowres_prob=0.0,
    )
    x = torch.zeros(64, 1, 64, 64)
    x[..., 24:40, 24:40] = 1.0
    out = augment_batch(x, geometry_only, torch.Generator().manual_seed(0))
    ys, xs = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    mass = out[:, 0].sum((1, 2))
    cy = (out[:, 0] * ys).sum((1, 2)) / mass
    cx = (out[:, 0] * xs).sum((1, 2)) / mass
    # shift <= translate x width x max scale (0.06 x 64 x 1.15 = 4.4 px) + resampling slack
    limit = 0.06 * 64 * 1.15 + 0.5
    assert ((cx - 31.5).abs() < limit).all() and ((cy - 31.5).abs() < limit).all()
    assert (cx - 31.5).abs().max() > 2  # and it does move things


def test_config_round_trips_through_json() -> None:
    cfg = replace(AugmentConfig(), rotate_deg=5.0, gamma=(0.8, 1.2), enabled=False)
    assert AugmentConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_crops_change_the_aspect_and_only_within_the_range() -> None:
    """The crop's width / height ratio, read off a stretched grid, stays inside ``aspect`` and
    covers much of it: the shape shortcut varies in both directions."""
    cfg = AugmentConfig(
        rotate_deg=0.0,
        translate=0.0,
        crop_area=(0.7, 1.0),
        aspect=(0.75, 1.35),
        gamma=(1.0, 1.0),
        contrast=(1.0, 1.0),
        brightness=0.0,
        blur_prob=0.0,
        noise_prob=0.0,
        lowres_prob=0.0,
        jpeg_prob=0.0,
        border_prob=0.0,
    )
    size = 128
    from pneumonia.training.augment import crop_extent

    g = torch.Generator().manual_seed(0)
    # Same draws as augment_batch: reproduce the crop extents the generator gives.
    n = 512
    x = torch.zeros(n, 1, size, size)
    x[..., 32:96, 32:96] = 1.0  # a centred square
    out = augment_batch(x, cfg, g)
    widths = (out[:, 0] > 0.5).float().sum(2).amax(1)  # widest row of the square
    heights = (out[:, 0] > 0.5).float().sum(1).amax(1)  # tallest column
    shown = heights / widths  # a crop of aspect a stretches the square to height/width = a
    assert float(shown.min()) > 0.75 * 0.93 and float(shown.max()) < 1.35 * 1.07
    assert float(shown.min()) < 0.85 and float(shown.max()) > 1.2
    cw, ch = crop_extent(torch.tensor([1.0, 0.7]), torch.tensor([1.35, 0.75]))
    assert float(cw.max()) <= 1.0 and float(ch.max()) <= 1.0


def test_the_aspect_range_is_validated() -> None:
    with pytest.raises(ValueError, match="aspect"):
        AugmentConfig(aspect=(1.2, 0.8))
