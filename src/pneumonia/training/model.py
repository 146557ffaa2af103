"""Network definitions: a compact CNN and a logistic-regression baseline.

Both end in a linear map whose spatial average is the logit, so a class activation map
(CAM, Zhou et al. 2016, https://arxiv.org/abs/1512.04150) comes out of the forward pass
without gradients: ``logit == cam.mean((1, 2))``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, cast

import torch
from torch import nn


@dataclass(frozen=True)
class ModelConfig:
    """Architecture hyper-parameters; stored in every checkpoint so the file rebuilds the net.

    Attributes:
        arch: "cnn" (the product model) or "logreg" (the classical baseline).
        channels: Stem width, then one width per stage (each stage: two 3x3 conv-BN-ReLU).
        dropout: Dropout before the linear head (CNN only).
        logreg_grid: The baseline averages the image down to this many pixels a side.
    """

    arch: str = "cnn"
    channels: tuple[int, ...] = (16, 24, 48, 96, 192)
    dropout: float = 0.2
    logreg_grid: int = 32

    def __post_init__(self) -> None:
        if self.arch not in ("cnn", "logreg"):
            raise ValueError(f"arch must be 'cnn' or 'logreg', got {self.arch!r}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["channels"] = list(self.channels)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        kw = dict(d)
        if "channels" in kw:
            kw["channels"] = tuple(kw["channels"])
        return cls(**kw)


class PerImageStandardize(nn.Module):
    """Zero mean, unit variance per image: removes global exposure and contrast."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        std = (x - mean).pow(2).mean(dim=(1, 2, 3), keepdim=True).add(1e-6).sqrt()
        return (x - mean) / std


def _conv_bn_relu(cin: int, cout: int, k: int = 3, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class PneumoniaCNN(nn.Module):
    """Stride-2 stem, stages of two 3x3 convs with max-pooling between, GAP, linear head."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        ch = cfg.channels
        layers: list[nn.Module] = [PerImageStandardize(), _conv_bn_relu(1, ch[0], k=5, stride=2)]
        prev = ch[0]
        for i, c in enumerate(ch[1:]):
            layers += [_conv_bn_relu(prev, c), _conv_bn_relu(c, c)]
            if i < len(ch) - 2:
                layers.append(nn.MaxPool2d(2))
            prev = c
        self.features = nn.Sequential(*layers)
        self.dropout = nn.Dropout(cfg.dropout)
        self.head = nn.Linear(prev, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of shape (N,)."""
        f = self.features(x).mean(dim=(2, 3))
        return self.head(self.dropout(f)).squeeze(1)

    def cam(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits (N,), class activation maps (N, h, w)) with ``logit == cam.mean``."""
        f = self.features(x)
        cam = torch.einsum("nchw,c->nhw", f, self.head.weight[0]) + self.head.bias[0]
        return cam.mean(dim=(1, 2)), cam

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled penultimate features (N, C) the head reads."""
        return self.features(x).mean(dim=(2, 3))


class LogisticBaseline(nn.Module):
    """Logistic regression on a small, standardised thumbnail (the classical baseline)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.grid = cfg.logreg_grid
        self.norm = PerImageStandardize()
        self.pool = nn.AdaptiveAvgPool2d(self.grid)
        self.head = nn.Linear(self.grid * self.grid, 1)

    def _thumb(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.pool(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self._thumb(x).flatten(1)).squeeze(1)

    def cam(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = self._thumb(x)[:, 0]
        w = self.head.weight[0].view(self.grid, self.grid)
        cam = t * w * (self.grid * self.grid) + self.head.bias[0]
        return cam.mean(dim=(1, 2)), cam

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The standardised thumbnail (N, grid * grid) the head reads."""
        return self._thumb(x).flatten(1)


def build_model(cfg: ModelConfig) -> PneumoniaCNN | LogisticBaseline:
    return PneumoniaCNN(cfg) if cfg.arch == "cnn" else LogisticBaseline(cfg)


class EnsembleForExport(nn.Module):
    """Average of members' logits and CAMs; the graph that is exported to ONNX."""

    def __init__(self, members: list[nn.Module]) -> None:
        super().__init__()
        self.nets = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Members are networks from build_model; ModuleList only knows them as Module.
        members = cast(list[PneumoniaCNN | LogisticBaseline], list(self.nets))
        logits, cams = zip(*(m.cam(x) for m in members), strict=True)
        return torch.stack(logits).mean(0), torch.stack(cams).mean(0)
