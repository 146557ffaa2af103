"""Embed the development sets of the frontal-chest check with an exported model.

Writes one ``.npz`` per set into ``--out`` (``embedding`` rows, file names, group, patient,
and the existing input check's outcome), which ``benchmarks/frontal_fit.py`` reads:

- ``kermany_train`` / ``kermany_val``: ``DATA/train`` split as the trainer split it
  (patient-grouped, ``--val-fraction`` and ``--split-seed`` as the shipped run's config);
  the official test folder is never read;
- ``nih``: the adult films of ``--nih`` (patient id in the manifest);
- ``not_frontal``: ``--not-frontal`` (one folder per group);
- ``nonxray_dev``: ``benchmarks/nonradiographs.py --set dev``'s output (one folder per kind).

Usage::

    .venv/bin/python benchmarks/frontal_features.py --model artifacts/model.onnx \\
        --data ../shared/data/chest_xray --nih ../shared/data/nih_site \\
        --not-frontal ../shared/data/not_frontal_chest --nonxray runs/nonradiographs-dev \\
        --out runs/frontal-features
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

import numpy as np

from pneumonia.data import DEFAULT_SPLIT_SEED, DEFAULT_VAL_FRACTION, is_image_file, train_val_split
from pneumonia.predictor import Predictor
from pneumonia.preprocess import ImageError

BATCH = 32


def log(msg: str) -> None:
    print(f"[frontal_features] {msg}", file=sys.stderr, flush=True)


def embed(
    predictor: Predictor, files: list[Path], groups: list[str], patients: list[str], out: Path
) -> None:
    """Embed ``files`` and save them with their group and patient to ``out``."""
    feats, outcomes, kept, kept_groups, kept_patients = [], [], [], [], []
    t0 = time.perf_counter()
    for i in range(0, len(files), BATCH):
        prepared, idx = [], []
        for j in range(i, min(i + BATCH, len(files))):
            try:
                prepared.append(predictor.prepare(files[j].read_bytes()))
                idx.append(j)
            except ImageError as exc:
                log(f"skipped {files[j]}: {exc.code}")
        if not prepared:
            continue
        batch = np.stack([p.input for p in prepared])
        scored = predictor.scores(batch, [p.stats for p in prepared])
        emb, checks = scored.features, scored.checks
        assert emb is not None, "the model has no embedding output"
        feats.append(emb)
        outcomes += [c.outcome for c in checks]
        kept += [files[j].name for j in idx]
        kept_groups += [groups[j] for j in idx]
        kept_patients += [patients[j] for j in idx]
    np.savez_compressed(
        out,
        embedding=np.concatenate(feats).astype(np.float32),
        name=np.array(kept),
        group=np.array(kept_groups),
        patient=np.array(kept_patients),
        guard_outcome=np.array(outcomes),
    )
    log(f"{out.name}: {len(kept)} images in {time.perf_counter() - t0:.0f} s")


def folder_set(root: Path) -> tuple[list[Path], list[str], list[str]]:
    """Images one folder deep: the folder is the group, each file its own 'patient'."""
    files = sorted(p for p in root.glob("*/*") if is_image_file(p))
    return files, [p.parent.name for p in files], [f"{p.parent.name}/{p.stem}" for p in files]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--data", type=Path, help="Kaggle-layout chest_xray root (its train/ only)")
    ap.add_argument("--nih", type=Path)
    ap.add_argument("--not-frontal", type=Path)
    ap.add_argument("--nonxray", type=Path, help="benchmarks/nonradiographs.py --set dev output")
    ap.add_argument("--val-fraction", type=float, default=DEFAULT_VAL_FRACTION)
    ap.add_argument("--split-seed", type=int, default=DEFAULT_SPLIT_SEED)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    predictor = Predictor(a.model, refuse=False)
    if a.not_frontal:
        embed(predictor, *folder_set(a.not_frontal), a.out / "not_frontal.npz")
    if a.nonxray:
        embed(predictor, *folder_set(a.nonxray), a.out / "nonxray_dev.npz")
    if a.nih:
        with (a.nih / "manifest.csv").open() as f:
            rows = list(csv.DictReader(f))
        embed(
            predictor,
            [a.nih / r["relpath"] for r in rows],
            [f"nih_{r['view']}" for r in rows],
            [r["patient_id"] for r in rows],
            a.out / "nih.npz",
        )
    if a.data:
        split = train_val_split(a.data, a.val_fraction, a.split_seed)
        for name, samples in (("kermany_val", split.val), ("kermany_train", split.train)):
            embed(
                predictor,
                [s.path for s in samples],
                ["kermany"] * len(samples),
                [s.patient for s in samples],
                a.out / f"{name}.npz",
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
