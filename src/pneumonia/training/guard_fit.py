"""Fit the input check of a training run: feature statistics of its training-split films,
thresholds from its validation-split films, as they are and under simulated shifts of site
(see pneumonia.guard). Writes the run's guard file (``pneumonia.training.run.GUARD``), which
``pneumonia export`` puts into the model file and its card.

The films go through the traced, folded ONNX graph of the features on onnxruntime, in batches:
the graph the served model computes them with, and about 4x faster on the CPU than torch's
eager kernels (docs/benchmarks.md, "Input-check fit")."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pneumonia.data import Sample, load_images
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
from pneumonia.training.run import RecordedSplit, RunFolder, record_environment, run_split

log = logging.getLogger(__name__)

#: Films read and embedded at a time (bounds memory: 256 x 192 x 192 float32 is 38 MB).
CHUNK = 256


#: Rows of preprocessed inputs (N, C, H, W) -> their ``embedding`` rows (N, D + M).
Features = Callable[[np.ndarray], np.ndarray]


def recorded_split(run_dir: Path, data_root: Path | None = None) -> RecordedSplit:
    """The run's training and validation films, as its training drew and recorded them.

    Raises:
        SplitRecordError: the record was edited or names films not under ``data_root``.
    """
    run = RunFolder(run_dir)
    return run_split(run, TrainConfig.load(run.config), data_root)


def embed_inputs(net: Any, x: np.ndarray) -> np.ndarray:
    """``embedding`` rows (N, D + M) of preprocessed inputs through the torch network (eager)."""
    import torch

    with torch.inference_mode():
        parts = [
            net.guard_features(torch.from_numpy(x[i : i + CHUNK])).numpy()
            for i in range(0, len(x), CHUNK)
        ]
    return np.concatenate(parts).astype(np.float32)


def onnx_features(net: Any, input_shape: tuple[int, ...], threads: int) -> Features:
    """The ``embedding`` rows of ``net`` (an EnsembleForExport) through onnxruntime: its
    features traced to ONNX and folded as export does, run a chunk at a time."""
    from torch import nn

    from pneumonia.guard import EMBEDDING_OUTPUT
    from pneumonia.predictor import open_session
    from pneumonia.training.export import traced_graph

    class _Features(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def forward(self, x: Any) -> Any:
            return self.net.guard_features(x)

    proto = traced_graph(_Features().eval(), input_shape, [EMBEDDING_OUTPUT])
    return session_features(open_session(proto.SerializeToString(), threads))


def session_features(sess: Any) -> Features:
    """The ``embedding`` rows of an onnxruntime session's graph (a traced network's features,
    or an exported or quantized model file), run a chunk at a time."""
    from pneumonia.guard import EMBEDDING_OUTPUT
    from pneumonia.predictor import INPUT_NAME

    def features(x: np.ndarray) -> np.ndarray:
        parts = [
            sess.run([EMBEDDING_OUTPUT], {INPUT_NAME: np.ascontiguousarray(x[i : i + CHUNK])})[0]
            for i in range(0, len(x), CHUNK)
        ]
        return np.concatenate(parts).astype(np.float32)

    return features


def embed_samples(
    features: Features, samples: Sequence[Sample], spec: PreprocessSpec, progress: bool = False
) -> np.ndarray:
    """``embedding`` rows of the readable films among ``samples``, read a chunk at a time
    through the shared preprocessing."""
    chunks = progress_bar(
        range(0, len(samples), CHUNK), enabled=progress, desc="embedding films", unit="chunk"
    )
    return np.concatenate([features(load_images(samples[i : i + CHUNK], spec).x) for i in chunks])


def shifted_features(
    features: Features, x: np.ndarray, seed: int, progress: bool = False
) -> dict[str, np.ndarray]:
    """``embedding`` rows of the validation inputs ``x`` under each of ``SITE_SHIFTS``."""
    from pneumonia.shifts import SITE_SHIFTS, shifted_batches

    names = progress_bar(
        list(SITE_SHIFTS), enabled=progress, desc="shifted validation films", unit="shift"
    )
    out = {}
    for name in names:
        batches = shifted_batches(x, name, seed, CHUNK, table=SITE_SHIFTS)
        out[name] = np.concatenate([features(b) for b in batches])
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
    from pneumonia.training.train import load_member

    run = RunFolder(run_dir)
    cfg = TrainConfig.load(run.config)
    split = run_split(run, cfg, data_root)
    checkpoints = run.checkpoints()
    net = EnsembleForExport([load_member(p) for p in checkpoints]).eval()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    threads = torch.get_num_threads()
    record_environment(run, "guard_fit", threads)
    with torch.no_grad():
        probe = torch.zeros(1, *cfg.preprocess.input_shape)
        head_dim = int(net.embed(probe).shape[1])
    features = onnx_features(net, cfg.preprocess.input_shape, threads)
    guard = fit_split_guard(
        features,
        split,
        cfg.preprocess,
        cfg.split_seed,
        head_dim,
        {"members_sha256": [sha256_file(p) for p in checkpoints]},
        components=components,
        flag_quantile=flag_quantile,
        mid_components=mid_components,
        progress=progress,
    )
    run.guard.write_text(json.dumps(guard.to_dict()) + "\n")
    return guard


def fit_split_guard(
    features: Features,
    split: RecordedSplit,
    spec: PreprocessSpec,
    seed: int,
    head_dim: int,
    fitted: dict[str, Any],
    components: int = DEFAULT_COMPONENTS,
    flag_quantile: float = FLAG_QUANTILE,
    mid_components: int = DEFAULT_MID_COMPONENTS,
    progress: bool = False,
) -> FeatureGuard:
    """The input check of the model whose ``embedding`` rows ``features`` gives, on ``split``:
    statistics from its training films, thresholds from its validation films as they are and
    under every simulated shift of site (drawn with ``seed``). The one fit of a run's check
    (:func:`fit_run_guard`) and of a quantized file's (:mod:`pneumonia.training.quantize`).

    Args:
        head_dim: How many of the ``embedding`` values are the pooled penultimate features.
        fitted: Provenance to store besides where it was fitted (which weights).
    """
    train_f = embed_samples(features, split.train, spec, progress)
    val_x = load_images(split.val, spec).x
    val_f = features(val_x)
    shifted = shifted_features(features, val_x, seed, progress)
    guard = fit_feature_guard(
        train_f,
        val_f,
        components=components,
        flag_quantile=flag_quantile,
        fitted={
            "fitted_on": (
                f"training split of {split.root} ({split.description}); "
                "thresholds from its validation split"
            ),
            **fitted,
            "split_sha256": split.sha256,
        },
        head_dim=head_dim,
        shifted=shifted,
        mid_components=mid_components,
    )
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
