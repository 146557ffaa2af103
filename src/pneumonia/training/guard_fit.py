"""Fit the input check of a training run: feature statistics of its training-split films,
thresholds from its validation-split films (see pneumonia.guard). Writes RUN/guard.json, which
``pneumonia export`` puts into the model file and its card."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pneumonia.data import Sample, load_images, train_val_split
from pneumonia.guard import (
    DEFAULT_COMPONENTS,
    FLAG_QUANTILE,
    REFUSE_FACTOR,
    FeatureGuard,
    fit_feature_guard,
)
from pneumonia.predictor import sha256_file
from pneumonia.preprocess import PreprocessSpec
from pneumonia.training.config import TrainConfig
from pneumonia.training.export import GUARD_FILE

log = logging.getLogger(__name__)

#: Films read and embedded at a time (bounds memory: 256 x 192 x 192 float32 is 38 MB).
CHUNK = 256


def run_split(
    run_dir: Path, data_root: Path | None = None
) -> tuple[list[Sample], list[Sample], Path, str]:
    """The run's training and validation films, as its training drew them.

    Raises:
        ValueError: the validation patients differ from those the run recorded (other data).
    """
    cfg = TrainConfig.load(run_dir / "config.json")
    data = json.loads((run_dir / "data.json").read_text())
    root = Path(data_root or data["data_root"])
    split = train_val_split(root, cfg.val_fraction, cfg.split_seed, cfg.max_images)
    train, val = list(split.train), list(split.val)
    recorded = data.get("validation_patients")
    # The run records the patients of the films it could read; every one must be drawn again.
    if recorded is not None and not set(recorded) <= {s.patient for s in val}:
        raise ValueError(
            f"the validation split drawn from {root} is not the one "
            f"{run_dir} recorded; pass the run's training data with --data"
        )
    return train, val, root, split.description


def embed_samples(
    net: Any, samples: Sequence[Sample], spec: PreprocessSpec, progress: bool = False
) -> np.ndarray:
    """Pooled features (N, D) of the readable films among ``samples``, through the shared preprocessing."""
    import torch

    out = []
    chunks = range(0, len(samples), CHUNK)
    if progress:
        from tqdm import tqdm

        chunks = tqdm(chunks, desc="embedding films", unit="chunk")
    for i in chunks:
        x = load_images(samples[i : i + CHUNK], spec).x
        if len(x):
            with torch.no_grad():
                out.append(net.embed(torch.from_numpy(x)).numpy())
    return np.concatenate(out).astype(np.float32)


def fit_run_guard(
    run_dir: Path,
    data_root: Path | None = None,
    components: int = DEFAULT_COMPONENTS,
    flag_quantile: float = FLAG_QUANTILE,
    refuse_factor: float = REFUSE_FACTOR,
    progress: bool = False,
) -> FeatureGuard:
    """Fit the run's input check and write ``RUN/guard.json``."""
    import torch

    from pneumonia.training.model import EnsembleForExport
    from pneumonia.training.train import load_member, member_dirs

    run_dir = Path(run_dir)
    cfg = TrainConfig.load(run_dir / "config.json")
    train, val, root, how = run_split(run_dir, data_root)
    dirs = member_dirs(run_dir)
    net = EnsembleForExport([load_member(d / "best.pt") for d in dirs]).eval()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    train_f = embed_samples(net, train, cfg.preprocess, progress)
    val_f = embed_samples(net, val, cfg.preprocess, progress)
    guard = fit_feature_guard(
        train_f,
        val_f,
        components=components,
        flag_quantile=flag_quantile,
        refuse_factor=refuse_factor,
        fitted={
            "fitted_on": f"training split of {root} ({how}); thresholds from its validation split",
            "members_sha256": [sha256_file(d / "best.pt") for d in dirs],
        },
    )
    (run_dir / GUARD_FILE).write_text(json.dumps(guard.to_dict()) + "\n")
    log.info(
        "input check fitted on %d training films, thresholds from %d validation films: flag at %.3f, refuse at %.3f",
        len(train_f),
        len(val_f),
        guard.flag_distance,
        guard.refuse_distance,
    )
    return guard
