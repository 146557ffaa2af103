"""Networks: shapes, exact CAMs, configs, and rebuilding from a checkpoint alone."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import synthetic_xray
from pneumonia.data import LoadedImages
from pneumonia.preprocess import PreprocessSpec
from pneumonia.training.config import TrainConfig
from pneumonia.training.model import (
    EnsembleForExport,
    LogisticBaseline,
    ModelConfig,
    PneumoniaCNN,
    build_model,
)
from pneumonia.training.train import CHECKPOINT, load_member, predict_logits, train_member

CONFIGS = {
    "cnn": ModelConfig(arch="cnn", channels=(4, 8, 16), dropout=0.3),
    "logreg": ModelConfig(arch="logreg", logreg_grid=8),
}


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread() -> Iterator[None]:
    """Tiny tensors: one thread is faster and does not fight a training run for the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def images(n: int = 4, size: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 1, size, size, generator=torch.Generator().manual_seed(seed))


def trained_a_little(cfg: ModelConfig) -> PneumoniaCNN | LogisticBaseline:
    """A model whose BatchNorm statistics and weights have moved away from their init."""
    torch.manual_seed(0)
    model = build_model(cfg)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = images(8, seed=1), torch.tensor([0.0, 1.0] * 4)
    for _ in range(3):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.mark.parametrize("arch", sorted(CONFIGS))
@pytest.mark.parametrize("size", [64, 96])
def test_forward_gives_one_logit_per_image(arch: str, size: int) -> None:
    model = build_model(CONFIGS[arch]).eval()
    with torch.no_grad():
        out = model(images(3, size))
    assert out.shape == (3,) and out.dtype == torch.float32


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_cam_mean_is_the_logit(arch: str) -> None:
    model = trained_a_little(CONFIGS[arch])
    x = images(5, seed=2)
    with torch.no_grad():
        logit = model(x)
        cam_logit, cam = model.cam(x)
    assert cam.ndim == 3 and cam.shape[0] == 5
    torch.testing.assert_close(cam_logit, logit, atol=1e-5, rtol=0)
    torch.testing.assert_close(cam.mean(dim=(1, 2)), logit, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_exposure_and_contrast_do_not_change_the_logit(arch: str) -> None:
    # Per-image standardisation is the first layer: a * x + b gives the same input to the net.
    model = trained_a_little(CONFIGS[arch])
    x = torch.from_numpy(np.stack([synthetic_xray(i % 2, i, 64) for i in range(4)])[:, None] / 255)
    x = x.float()
    with torch.no_grad():
        torch.testing.assert_close(model(0.7 * x + 0.1), model(x), atol=1e-3, rtol=1e-3)


def test_ensemble_averages_its_members() -> None:
    a = trained_a_little(CONFIGS["cnn"])
    b = trained_a_little(replace(CONFIGS["cnn"], dropout=0.0))
    torch.nn.init.normal_(b.head.weight)  # a second, different member
    x = images(3, seed=4)
    with torch.no_grad():
        logit, cam, _ = EnsembleForExport([a, b]).eval()(x)
        (la, ca), (lb, cb) = a.cam(x), b.cam(x)
    torch.testing.assert_close(logit, (la + lb) / 2)
    torch.testing.assert_close(cam, (ca + cb) / 2)


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_model_config_round_trips_through_json(arch: str) -> None:
    cfg = CONFIGS[arch]
    again = ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
    assert isinstance(again.channels, tuple)


def test_model_config_refuses_unknown_arch() -> None:
    with pytest.raises(ValueError, match="arch"):
        ModelConfig(arch="resnet")


def tiny_data(n: int, size: int, seed: int) -> LoadedImages:
    y = np.array([i % 2 for i in range(n)], dtype=np.int64)
    x = np.stack([synthetic_xray(int(label), seed + i, size) for i, label in enumerate(y)])
    return LoadedImages(x=(x[:, None] / 255).astype(np.float32), y=y, samples=[], skipped=[])


def tiny_config(arch: str, **kw: object) -> TrainConfig:
    base = TrainConfig(
        preprocess=PreprocessSpec(size=32),
        model=replace(CONFIGS[arch], dropout=0.0) if arch == "cnn" else CONFIGS[arch],
        epochs=2,
        batch_size=8,
        lr=1e-2,
        threads=1,
    )
    return replace(base, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_checkpoint_alone_rebuilds_the_network(arch: str, tmp_path: Path) -> None:
    cfg = tiny_config(arch)
    train, val = tiny_data(16, 32, 0), tiny_data(8, 32, 100)
    result = train_member(cfg, 0, train, val, tmp_path, progress=False)
    rebuilt = load_member(tmp_path / CHECKPOINT)
    assert not rebuilt.training
    # the logits saved at the best epoch come back bit for bit from the file alone
    np.testing.assert_array_equal(predict_logits(rebuilt, val.x), result.val_logits)
    ckpt = torch.load(tmp_path / CHECKPOINT, weights_only=True)
    assert ModelConfig.from_dict(ckpt["model_config"]) == cfg.model
    assert PreprocessSpec.from_dict(ckpt["preprocess"]) == cfg.preprocess


def test_early_stopping_finishes_the_member(tmp_path: Path) -> None:
    """Regression: the early-stop log line read ``best.epoch`` (the field is ``best_epoch``),
    so every member that stopped early crashed with AttributeError."""
    # lr = 0: nothing changes, so epoch 2 is no better than epoch 1 and patience 1 stops it.
    cfg = tiny_config("logreg", lr=0.0, epochs=5, patience=1)
    result = train_member(cfg, 0, tiny_data(16, 32, 0), tiny_data(8, 32, 100), tmp_path, False)
    history = json.loads((tmp_path / "history.json").read_text())
    assert [row["epoch"] for row in history] == [1, 2]
    assert result.best_epoch == 1


def test_device_auto_picks_the_cpu_without_a_gpu() -> None:
    from pneumonia.training.train import resolve_device

    if torch.cuda.is_available():
        assert resolve_device("auto").type == "cuda"
    else:
        assert resolve_device("auto") == torch.device("cpu")
        with pytest.raises(ValueError, match="no CUDA"):
            resolve_device("cuda")
