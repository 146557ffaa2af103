"""Which features should the input check refuse by? The comparison behind docs/input_check.md.

For an EfficientNet-Lite0 run, pools every stage's output (channel means and standard
deviations; the penultimate features as the head reads them) for training-split films, the
validation films as they are and under every simulated shift of site
(``pneumonia.shifts.SITE_SHIFTS``), and the development set of non-radiographs
(``benchmarks/nonradiographs.py --set dev``, never the evaluation set). For each candidate
feature set and number of principal directions it fits the check's PPCA on the training films
and reports the refusal threshold the check's rule would set (the farthest validation film,
shifted or not, in units of the validation 99.5th percentile) and the share of development
images beyond it, among those the image rules do not already refuse.

Usage::

    .venv/bin/python benchmarks/guard_layers.py --run runs/v2-effnet --dev runs/nonradiographs-dev \\
        [--train-films 2000] [--shifted-films 300]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from pneumonia.data import load_images
from pneumonia.guard import Ppca, image_reasons
from pneumonia.preprocess import ImageError, preprocess_image
from pneumonia.shifts import zoom_out
from pneumonia.training.config import TrainConfig
from pneumonia.training.effnet import LITE0_STAGES, EfficientNetLite0, pooled_stats
from pneumonia.training.guard_fit import recorded_split
from pneumonia.training.run import RunFolder
from pneumonia.training.stress import SITE_SHIFTS, perturbed_batches
from pneumonia.training.train import load_member

CANDIDATES = {
    "penultimate (mean)": ["head"],
    "stage 3": ["s2"],
    "stage 4": ["s3"],
    "stage 5": ["s4"],
    "stage 6": ["s5"],
    "stage 7": ["s6"],
    "stages 5+6": ["s4", "s5"],
    "stages 4-7": ["s3", "s4", "s5", "s6"],
}


def log(msg: str) -> None:
    print(f"[guard_layers] {msg}", file=sys.stderr, flush=True)


def stage_stats(net: EfficientNetLite0, x: np.ndarray, chunk: int = 128) -> dict[str, np.ndarray]:
    """Pooled statistics of every stage output ("s0".."s6") and the penultimate mean ("head")."""
    acc: dict[str, list[np.ndarray]] = {}
    with torch.no_grad():
        for i in range(0, len(x), chunk):
            last, outs = net.stage_outputs(
                torch.from_numpy(x[i : i + chunk]), range(len(LITE0_STAGES))
            )
            for stage, out in enumerate(outs):
                acc.setdefault(f"s{stage}", []).append(pooled_stats(out).numpy())
            acc.setdefault("head", []).append(last.mean(dim=(2, 3)).numpy())
    return {k: np.concatenate(v) for k, v in acc.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", type=Path, required=True)
    ap.add_argument("--dev", type=Path, required=True, help="nonradiographs.py --set dev output")
    ap.add_argument("--train-films", type=int, default=2000)
    ap.add_argument("--shifted-films", type=int, default=300)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    run = RunFolder(a.run)
    cfg = TrainConfig.load(run.config)
    net = load_member(run.checkpoints()[0])
    if not isinstance(net, EfficientNetLite0):
        raise SystemExit(
            "guard_layers compares EfficientNet-Lite0 stages; this run is another arch"
        )
    spec = cfg.preprocess
    split = recorded_split(a.run)
    train, val = split.train, split.val
    rng = np.random.default_rng(0)
    pick = rng.permutation(len(train))[: a.train_films]
    log(f"embedding {len(pick)} training and {len(val)} validation films")
    feats = {"train": stage_stats(net, load_images([train[i] for i in pick], spec).x)}
    val_x = load_images(val, spec).x
    feats["val"] = stage_stats(net, val_x)
    sub = val_x[rng.permutation(len(val_x))[: a.shifted_films]]
    for name in SITE_SHIFTS:
        x = torch.cat(perturbed_batches(sub, name, cfg.split_seed, table=SITE_SHIFTS)).numpy()
        feats[f"shift:{name}"] = stage_stats(net, x)
    log(f"embedded the validation films under {len(SITE_SHIFTS)} shifts")
    # Not one of the shifts: a film shrunk to 65% of a dark frame, to show where refusal starts.
    small = zoom_out(0.65)(sub, np.random.default_rng(0))
    feats["zoom_out_0.65"] = stage_stats(net, small)
    dev_x = []
    for f in sorted(p for p in a.dev.glob("*/*") if p.is_file()):
        try:
            pre = preprocess_image(f.read_bytes(), spec)
        except ImageError:
            continue
        if not image_reasons(pre.input, pre.stats):  # only what reaches the feature distance
            dev_x.append(pre.input)
    feats["dev"] = stage_stats(net, np.stack(dev_x))
    print(f"Development images that pass the image rules: {len(dev_x)}\n")
    print("| features | dims | k | refusal threshold (x flag) | set by | dev images beyond it |")
    print("|---|---|---|---|---|---|")
    for label, keys in CANDIDATES.items():

        def rows(split: str, keys: list[str] = keys) -> np.ndarray:
            return np.concatenate([feats[split][k] for k in keys], axis=1)

        for k in (8, 32, 128):
            ppca = Ppca.fit(rows("train"), k)
            flag = float(np.quantile(ppca.distance(rows("val")), 0.995))
            far = {
                s: float(ppca.distance(rows(s)).max()) / flag
                for s in feats
                if s.startswith(("shift:", "val"))
            }
            worst = max(far, key=lambda s: far[s])
            dev = ppca.distance(rows("dev")) / flag
            dims = rows("val").shape[1]
            print(
                f"| {label} | {dims} | {k} | {far[worst]:.2f} | {worst.removeprefix('shift:')} "
                f"| {np.mean(dev > far[worst]):.1%} |"
            )
    ppca = Ppca.fit(np.concatenate([feats["train"][k] for k in ("s4", "s5")], axis=1), 32)

    def dist(split: str) -> np.ndarray:
        return ppca.distance(np.concatenate([feats[split][k] for k in ("s4", "s5")], axis=1))

    refuse = max(float(dist(s).max()) for s in feats if s.startswith(("shift:", "val")))
    z = dist("zoom_out_0.65") / refuse
    print(
        f"\nStages 5+6, k = 32: validation films zoomed out to 65% of a dark frame (not a shift "
        f"the rule uses): refusal score median {np.median(z):.2f}, max {z.max():.2f}; "
        f"{np.mean(z > 1):.1%} beyond the refusal threshold"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
