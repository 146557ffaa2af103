"""Training arithmetic (issue 22): bfloat16 autocast and channels-last on CUDA by default,
float32 on the CPU; bf16 can be asked for on either. No GPU here: the CUDA choice is checked by
its rule, the bf16 step by a tiny CPU run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pneumonia.preprocess import PreprocessSpec
from pneumonia.training.config import TrainConfig
from pneumonia.training.model import ModelConfig
from pneumonia.training.train import autocast_dtype, train


def test_the_precision_rule() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert autocast_dtype("auto", cpu) is None and autocast_dtype("fp32", cuda) is None
    assert autocast_dtype("auto", cuda) == autocast_dtype("bf16", cpu) == torch.bfloat16
    with pytest.raises(ValueError, match="precision must be one of"):
        TrainConfig(precision="fp16")


def _cfg(precision: str) -> TrainConfig:
    return TrainConfig(
        preprocess=PreprocessSpec(size=64),
        model=ModelConfig(channels=(4, 8, 16), dropout=0.0, arch="cnn"),
        seeds=(0,),
        epochs=1,
        batch_size=16,
        lr=1e-2,
        val_fraction=0.25,
        threads=1,
        precision=precision,
    )


@pytest.mark.slow
def test_bf16_trains_and_fp32_is_the_cpu_default(synthetic_root: Path, tmp_path: Path) -> None:
    runs = {
        p: train(_cfg(p), synthetic_root, tmp_path / p, progress=False)
        for p in ("auto", "fp32", "bf16")
    }
    # auto on the CPU is float32 exactly; bf16 trains to a usable, different model.
    assert runs["auto"]["validation"] == runs["fp32"]["validation"]
    assert runs["bf16"]["validation"]["auc"] > 0.6
    a = torch.load(tmp_path / "auto" / "member-0" / "best.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "bf16" / "member-0" / "best.pt", weights_only=True)["state_dict"]
    assert any(not np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)
