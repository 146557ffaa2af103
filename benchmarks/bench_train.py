"""Training data loading: decode every film once into memory (what ``pneumonia train`` does)
against decoding each batch's films again every epoch in torch DataLoader workers.

The default configuration's network and step (EfficientNet-Lite0, 160 px, batch 32, the
training augmentation, AdamW) runs one epoch over ``--images`` training films each way, the ways
alternating for ``--rounds`` rounds (so both see the same load on a shared machine), each after
one untimed warm-up step. Reported per way, the median over rounds: seconds to decode
(decode-once: before the first epoch), seconds for the epoch, training images per second, and
the seconds per epoch of the full training split (3,747 films, 118 batches) projected in
proportion, for 4 epochs with the decode-once cost counted once.

Usage (the figures in docs/benchmarks.md, "Training data loading")::

    .venv/bin/python benchmarks/bench_train.py --data ../shared/data/chest_xray --images 320 \\
        --threads 2 --workers 2 --json runs/bench_train.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pneumonia.data import Sample, load_images, train_val_split
from pneumonia.preprocess import PreprocessSpec, preprocess_bytes
from pneumonia.training.augment import augment_batch
from pneumonia.training.config import TrainConfig
from pneumonia.training.model import build_model

#: The shipped run's training split and epochs (docs/model.md).
FULL_TRAIN_FILMS = 3_747
EPOCHS = 4


class Films(torch.utils.data.Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Films decoded on each access (in a DataLoader worker)."""

    def __init__(self, samples: list[Sample], spec: PreprocessSpec) -> None:
        self.samples, self.spec = samples, spec

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.samples[i]
        x = preprocess_bytes(s.path.read_bytes(), self.spec)
        return torch.from_numpy(x), torch.tensor(float(s.label))


def _step(model: Any, opt: Any, cfg: TrainConfig, xb: Any, yb: Any, g: Any) -> None:
    xb = augment_batch(xb, cfg.augment, g)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(model(xb), yb)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def _model(cfg: TrainConfig) -> tuple[Any, Any]:
    torch.manual_seed(0)
    model = build_model(cfg.model, load_pretrained=True)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    # Untimed warm-up: the first step pays for allocating and choosing the kernels.
    x = torch.rand(cfg.batch_size, *cfg.preprocess.input_shape)
    y = torch.ones(cfg.batch_size)
    _step(model, opt, cfg, x, y, torch.Generator().manual_seed(1))
    return model, opt


def decode_once(samples: list[Sample], cfg: TrainConfig) -> dict[str, float]:
    t0 = time.perf_counter()
    films = load_images(samples, cfg.preprocess)
    decode = time.perf_counter() - t0
    x, y = torch.from_numpy(films.x), torch.from_numpy(films.y.astype(np.float32))
    model, opt = _model(cfg)
    g = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    perm = torch.randperm(len(x), generator=g)
    for b in range(0, len(x), cfg.batch_size):
        idx = perm[b : b + cfg.batch_size]
        _step(model, opt, cfg, x[idx].clone(), y[idx], g)
    return {"decode_seconds": decode, "epoch_seconds": time.perf_counter() - t0}


def workers(samples: list[Sample], cfg: TrainConfig, n_workers: int) -> dict[str, float]:
    g = torch.Generator().manual_seed(0)
    loader = torch.utils.data.DataLoader(
        Films(samples, cfg.preprocess),
        batch_size=cfg.batch_size,
        shuffle=True,
        generator=g,
        num_workers=n_workers,
    )
    model, opt = _model(cfg)
    t0 = time.perf_counter()
    for xb, yb in loader:
        _step(model, opt, cfg, xb, yb, g)
    return {"decode_seconds": 0.0, "epoch_seconds": time.perf_counter() - t0}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=Path("../shared/data/chest_xray"))
    ap.add_argument("--images", type=int, default=320, help="training films (a subset)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    cfg = TrainConfig(threads=a.threads)
    samples = train_val_split(a.data, cfg.val_fraction, cfg.split_seed, a.images).train
    result: dict[str, Any] = {
        "images": len(samples),
        "threads": a.threads,
        "workers": a.workers,
        "arch": cfg.model.arch,
        "size": cfg.preprocess.size,
        "batch": cfg.batch_size,
    }
    runs = {
        "decode once into memory": lambda: decode_once(samples, cfg),
        f"DataLoader, {a.workers} workers": lambda: workers(samples, cfg, a.workers),
    }
    rounds: dict[str, list[dict[str, float]]] = {name: [] for name in runs}
    for k in range(a.rounds):
        for name, fn in runs.items():
            rounds[name].append(fn())
            print(f"round {k + 1}", name, json.dumps(rounds[name][-1]), flush=True)
    scale = FULL_TRAIN_FILMS / len(samples)
    for name, rs in rounds.items():
        r = {k: float(np.median([x[k] for x in rs])) for k in rs[0]}
        r["images_per_second"] = len(samples) / r["epoch_seconds"]
        r["full_epoch_seconds"] = r["epoch_seconds"] * scale
        r["full_4_epochs_seconds"] = r["decode_seconds"] * scale + EPOCHS * r["full_epoch_seconds"]
        result[name] = {k: round(v, 1) for k, v in r.items()}
        result[name]["epoch_seconds_each_round"] = [round(x["epoch_seconds"], 1) for x in rs]
        print(name, json.dumps(result[name]), flush=True)
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
