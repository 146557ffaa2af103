"""Fit the input check of a training run: feature statistics of its training-split films,
thresholds from its validation-split films, as they are and under simulated shifts of site
(see pneumonia.guard). Writes RUN/guard.json, which ``pneumonia export`` puts into the model
file and its card."""

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
    DEFAULT_MID_COMPONENTS,
    FLAG_QUANTILE,
    FeatureGuard,
    fit_feature_guard,
)
from pneumonia.predictor import sha256_file
from pneumonia.preprocess import PreprocessSpec
from pneumonia.progress import progress_bar
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


def embed_inputs(net: Any, x: np.ndarray) -> np.ndarray:
    """``embedding`` rows (N, D + M) of preprocessed inputs, as the exported graph gives them."""
    import torch

    with torch.no_grad():
        parts = [
            net.guard_features(torch.from_numpy(x[i : i + CHUNK])).numpy()
            for i in range(0, len(x), CHUNK)
        ]
    return np.concatenate(parts).astype(np.float32)


def embed_samples(
    net: Any, samples: Sequence[Sample], spec: PreprocessSpec, progress: bool = False
) -> np.ndarray:
    """``embedding`` rows of the readable films among ``samples``, read a chunk at a time
    through the shared preprocessing."""
    chunks = progress_bar(
        range(0, len(samples), CHUNK), enabled=progress, desc="embedding films", unit="chunk"
    )
    return np.concatenate(
        [embed_inputs(net, load_images(samples[i : i + CHUNK], spec).x) for i in chunks]
    )


def shifted_features(
    net: Any, x: np.ndarray, seed: int, progress: bool = False
) -> dict[str, np.ndarray]:
    """``embedding`` rows of the validation inputs ``x`` under each of ``SITE_SHIFTS``."""
    from pneumonia.training.stress import SITE_SHIFTS, perturbed_batches

    names = progress_bar(
        list(SITE_SHIFTS), enabled=progress, desc="shifted validation films", unit="shift"
    )
    out = {}
    for name in names:
        batches = perturbed_batches(x, name, seed, CHUNK, table=SITE_SHIFTS)
        out[name] = np.concatenate([embed_inputs(net, b.numpy()) for b in batches])
    return out


def fit_run_guard(
    run_dir: Path,
    data_root: Path | None = None,
    components: int = DEFAULT_COMPONENTS,
    flag_quantile: float = FLAG_QUANTILE,
    progress: bool = False,
    mid_components: int = DEFAULT_MID_COMPONENTS,
) -> FeatureGuard:
    """Fit the run's input check and write ``RUN/guard.json``.

    Penultimate and mid-level statistics from the training-split films; flag thresholds from
    the validation films; the refusal threshold from the validation films as they are and
    under every simulated shift of site (``pneumonia.shifts.SITE_SHIFTS``).
    """
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
    with torch.no_grad():
        probe = torch.zeros(1, *cfg.preprocess.input_shape)
        head_dim = int(net.embed(probe).shape[1])
    train_f = embed_samples(net, train, cfg.preprocess, progress)
    val_x = load_images(val, cfg.preprocess).x
    val_f = embed_inputs(net, val_x)
    shifted = shifted_features(net, val_x, cfg.split_seed, progress)
    guard = fit_feature_guard(
        train_f,
        val_f,
        components=components,
        flag_quantile=flag_quantile,
        fitted={
            "fitted_on": f"training split of {root} ({how}); thresholds from its validation split",
            "members_sha256": [sha256_file(d / "best.pt") for d in dirs],
        },
        head_dim=head_dim,
        shifted=shifted,
        mid_components=mid_components,
    )
    (run_dir / GUARD_FILE).write_text(json.dumps(guard.to_dict()) + "\n")
    log.info(
        "input check fitted on %d training films, thresholds from %d validation films "
        "(and %d shifted copies): flag at %.3f, refuse at mid-level distance %.3f",
        len(train_f),
        len(val_f),
        sum(len(v) for v in shifted.values()),
        guard.flag_distance,
        guard.refuse_distance,
    )
    return guard
