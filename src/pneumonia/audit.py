"""Audit a labelled data set before training on it: ``pneumonia data audit DATA``.

What is in it (counts, unreadable files), who is in it (patients per split, patients in more
than one split, the trainer's validation split), what is in it twice (exact and near
duplicates), what the images are (size, aspect, mode, format, bit depth), and which nuisance
statistics predict the label on their own (shortcuts: in the Kermany set the films'
shape does).

numpy and Pillow only (no torch, no matplotlib): the HTML report draws its own small SVGs.

Near duplicates use perceptual hashes computed here rather than the ``imagehash`` package:
pHash (DCT of a 32x32 LANCZOS thumbnail, the 8x8 low frequencies against their median) and
dHash (sign of horizontal differences of a 9x8 thumbnail), both as defined by ``imagehash``
(tests check bit-for-bit agreement where it is installed). Each is a dozen lines of numpy;
``imagehash`` would add scipy and PyWavelets to the install for them.
"""

from __future__ import annotations

import hashlib
import html
import logging
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pneumonia.data import (
    DEFAULT_SPLIT_SEED,
    DEFAULT_VAL_FRACTION,
    NPZ_SPLITS,
    PATIENT_FROM_MANIFEST,
    SPLIT_MEDMNIST_VAL,
    DatasetLayoutError,
    ManifestRow,
    NpzReader,
    Sample,
    is_npz,
    list_npz_split,
    patient_id_rule,
    read_folder,
    read_manifest,
    train_val_split,
)
from pneumonia.evaluate import roc_auc
from pneumonia.labels import LABELS
from pneumonia.preprocess import ImageError, decode_gray, sniff_format
from pneumonia.progress import progress_bar

log = logging.getLogger(__name__)

#: A shortcut statistic whose folded AUC exceeds this is flagged.
SHORTCUT_WARN_AUC = 0.7
#: Near-duplicate candidates: pHash or dHash Hamming distance at most this (of 64 bits).
#: At most 7 keeps the banded search exact (8 bands of 8 bits).
NEAR_DUPLICATE_DISTANCE = 7
#: A candidate is a near duplicate when the Pearson correlation of the two 32x32 thumbnails
#: is at least this. Chest films all look alike to a 64-bit hash: on ../shared's 5,309 films,
#: 1,556 distinct-file pairs lie within 6 pHash bits, and the most correlated of them (0.966)
#: are different children, while re-encoded, resized or brightened copies correlate above 0.99.
NEAR_DUPLICATE_CORRELATION = 0.98
#: Statistics are computed on the decoded image, which the decoder may reduce (JPEG draft,
#: whole-pixel box averaging) to no less than this a side: cheap on multi-megapixel films.
STAT_SIZE = 256
#: Share of each side counted as the border in ``border_brightness``.
BORDER = 0.05
KAGGLE_SPLITS = ("train", "val", "test")

#: The nuisance statistics, in report order, with what each measures.
STATISTICS = {
    "stretch_ratio": "mean |horizontal difference| / mean |vertical difference| of pixel values "
    "(how much the film was squeezed or stretched to its stored shape)",
    "width": "stored width in pixels",
    "height": "stored height in pixels",
    "aspect": "width / height",
    "file_bytes": "file size in bytes",
    "bytes_per_pixel": "file size / (width x height): compression",
    "border_brightness": f"mean value of the outer {BORDER:.0%} of each side",
    "mean_intensity": "mean pixel value (0-1)",
    "std_intensity": "standard deviation of pixel values (contrast)",
}


@dataclass(frozen=True)
class AuditItem:
    """One labelled image of one split."""

    split: str
    sample: Sample
    key: str  # path relative to the data root, or SPLIT/NNNNN in an .npz
    #: The manifest's row for the image (metadata columns); None: an .npz or a bare path.
    row: ManifestRow | None = field(default=None, compare=False)


@dataclass
class ImageFacts:
    """What the audit measured on one image (``error`` set when it could not be read)."""

    item: AuditItem
    error: str | None = None
    sha256: str | None = None
    fmt: str | None = None
    mode: str | None = None
    bit_depth: int | None = None
    stats: dict[str, float | None] = field(default_factory=dict)
    phash: int | None = None
    dhash: int | None = None
    thumb: np.ndarray | None = None  # 32x32 uint8, for verifying near-duplicate candidates


# ----------------------------------------------------------------------------- data sources


def audit_items(data: Path) -> list[AuditItem]:
    """Every labelled image of ``data``: a Kaggle root (its train/val/test splits), one
    labelled folder (``DIR/{NORMAL,PNEUMONIA}``, one split named after the folder), a CSV
    manifest, or a MedMNIST .npz (its three splits).

    Raises:
        DatasetLayoutError: ``data`` is none of these.
    """
    data = Path(data)
    if is_npz(data):
        return [
            AuditItem(split, s, f"{split}/{s.npz_index:05d}")
            for split in NPZ_SPLITS
            for s in list_npz_split(data, split)
        ]
    if data.is_file() and data.suffix.lower() == ".csv":
        return [AuditItem(r.split or "all", r.sample, r.key, r) for r in read_manifest(data).rows]
    if not data.is_dir():
        raise DatasetLayoutError(
            f"{data} is not a folder, a .csv manifest or an .npz file; expected a Kaggle root "
            "ROOT/{train,test}/{NORMAL,PNEUMONIA}/, a folder DIR/{NORMAL,PNEUMONIA}/, a manifest "
            "or a MedMNIST .npz"
        )
    splits = [s for s in KAGGLE_SPLITS if (data / s).is_dir()]
    folders = [(s, data / s) for s in splits] if splits else [(data.name or "all", data)]
    items = []
    for split, folder in folders:
        items += [
            AuditItem(split, r.sample, r.path.relative_to(data).as_posix(), r)
            for r in read_folder(folder).rows
        ]
    return items


# ----------------------------------------------------------------------------- hashes


def _bits_to_int(bits: np.ndarray) -> int:
    return int.from_bytes(np.packbits(bits.reshape(-1).astype(np.uint8)).tobytes(), "big")


def _dct_matrix(n: int) -> np.ndarray:
    """Unnormalised DCT-II, as ``scipy.fftpack.dct``: y[k] = 2 sum x[i] cos(pi k (2i+1) / 2n)."""
    k, i = np.mgrid[0:n, 0:n]
    out: np.ndarray = 2.0 * np.cos(np.pi * k * (2 * i + 1) / (2 * n))
    return out


_DCT32 = _dct_matrix(32)
_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def phash(img: Image.Image) -> int:
    """64-bit perceptual hash, as ``imagehash.phash`` (hash_size 8, highfreq_factor 4)."""
    small = np.asarray(
        img.convert("L").resize((32, 32), Image.Resampling.LANCZOS), dtype=np.float64
    )
    low = (_DCT32 @ small @ _DCT32.T)[:8, :8]
    return _bits_to_int(low > np.median(low))


def dhash(img: Image.Image) -> int:
    """64-bit difference hash, as ``imagehash.dhash`` (hash_size 8)."""
    small = np.asarray(img.convert("L").resize((9, 8), Image.Resampling.LANCZOS), dtype=np.int16)
    return _bits_to_int(small[:, 1:] > small[:, :-1])


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Bitwise Hamming distances between uint64 arrays (broadcast)."""
    x = np.bitwise_xor(a, b)
    out: np.ndarray = _POPCOUNT[np.ascontiguousarray(x).view(np.uint8)].reshape(*x.shape, 8).sum(-1)
    return out


def near_pair_arrays(
    hashes: Sequence[int | None], max_distance: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(i, j, distance) arrays, i < j, sorted, of every pair of hashes within ``max_distance`` bits.

    Banded search: the 64 bits in 8 bands of 8; two hashes within 7 bits agree on a whole
    band, so comparing only hashes that share a band value finds every pair (exact for
    ``max_distance`` <= 7) without comparing all n^2 pairs.
    """
    if not 0 <= max_distance <= 7:
        raise ValueError(f"max_distance must be in 0..7 for the banded search, got {max_distance}")
    empty = np.zeros(0, dtype=np.int64)
    idx = np.array([i for i, h in enumerate(hashes) if h is not None], dtype=np.int64)
    if len(idx) < 2:
        return empty, empty, empty
    h = np.array([hashes[i] for i in idx], dtype=np.uint64)
    n = len(idx)
    keys = []
    for band in range(8):
        values = (h >> np.uint64(8 * band)) & np.uint64(0xFF)
        order = np.argsort(values, kind="stable")
        sv = values[order]
        starts = np.flatnonzero(np.r_[True, sv[1:] != sv[:-1]])
        ends = np.r_[starts[1:], len(sv)]
        for s, e in zip(starts, ends, strict=True):
            if e - s < 2:
                continue
            members = np.sort(order[s:e])
            for lo in range(0, len(members), 512):  # bounded memory for big buckets
                rows = members[lo : lo + 512]
                d = hamming(h[rows][:, None], h[members][None, :])
                a, b = np.nonzero((d <= max_distance) & (rows[:, None] < members[None, :]))
                keys.append(rows[a] * n + members[b])
    if not keys:
        return empty, empty, empty
    k = np.unique(np.concatenate(keys))
    a, b = k // n, k % n
    return idx[a], idx[b], hamming(h[a], h[b]).astype(np.int64)


def near_pairs(hashes: Sequence[int | None], max_distance: int) -> list[tuple[int, int, int]]:
    """(i, j, distance) with i < j for every pair of hashes within ``max_distance`` bits."""
    i, j, d = near_pair_arrays(hashes, max_distance)
    return list(zip(i.tolist(), j.tolist(), d.tolist(), strict=True))


# ----------------------------------------------------------------------------- one image


_BIT_DEPTH = {
    "1": 1,
    "L": 8,
    "P": 8,
    "LA": 8,
    "RGB": 8,
    "RGBA": 8,
    "CMYK": 8,
    "YCbCr": 8,
    "I;16": 16,
    "I;16B": 16,
    "I;16L": 16,
    "I": 32,
    "F": 32,
}


def _image_stats(
    gray: np.ndarray, width: int, height: int, n_bytes: int | None
) -> dict[str, float | None]:
    g = gray.astype(np.float64)
    dx = float(np.abs(np.diff(g, axis=1)).mean()) if g.shape[1] > 1 else 0.0
    dy = float(np.abs(np.diff(g, axis=0)).mean()) if g.shape[0] > 1 else 0.0
    by, bx = max(1, round(BORDER * g.shape[0])), max(1, round(BORDER * g.shape[1]))
    frame = np.ones(g.shape, dtype=bool)
    frame[by:-by, bx:-bx] = False
    return {
        "stretch_ratio": dx / dy if dy > 0 else None,
        "width": float(width),
        "height": float(height),
        "aspect": width / height,
        "file_bytes": None if n_bytes is None else float(n_bytes),
        "bytes_per_pixel": None if n_bytes is None else n_bytes / (width * height),
        "border_brightness": float(g[frame].mean()),
        "mean_intensity": float(g.mean()),
        "std_intensity": float(g.std()),
    }


def _gray_image(gray: np.ndarray) -> Image.Image:
    return Image.fromarray(np.round(np.clip(gray, 0, 1) * 255).astype(np.uint8), mode="L")


def analyse(item: AuditItem, reader: NpzReader) -> ImageFacts:
    """Measure one image; an unreadable one comes back with ``error`` set."""
    facts = ImageFacts(item)
    s = item.sample
    try:
        if s.npz_index is not None:
            pixels = reader.image(s)
            facts.sha256 = hashlib.sha256(pixels.tobytes()).hexdigest()
            facts.fmt, facts.mode, facts.bit_depth = "npz", "L", 8
            gray = pixels.astype(np.float32) / 255.0
            facts.stats = _image_stats(gray, pixels.shape[1], pixels.shape[0], None)
        else:
            data = s.path.read_bytes()
            facts.sha256 = hashlib.sha256(data).hexdigest()
            fmt = sniff_format(data)
            if fmt == "dicom":
                facts.fmt, facts.mode = "DICOM", "gray"
                full = decode_gray(data)
                height, width = full.shape
                gray = (
                    decode_gray(data, draft_size=STAT_SIZE)
                    if max(full.shape) > 4 * STAT_SIZE
                    else full
                )
            else:
                with Image.open(BytesIO(data)) as header:
                    facts.fmt, facts.mode = header.format, header.mode
                    width, height = header.size
                gray = decode_gray(data, draft_size=STAT_SIZE)
            facts.bit_depth = _BIT_DEPTH.get(facts.mode or "")
            facts.stats = _image_stats(gray, width, height, len(data))
        img = _gray_image(gray)
        facts.phash, facts.dhash = phash(img), dhash(img)
        facts.thumb = np.asarray(img.resize((32, 32), Image.Resampling.BOX), dtype=np.uint8)
    except ImageError as exc:
        facts.error = f"{exc.code}: {exc.message}"
    except OSError as exc:
        facts.error = f"unreadable_file: {exc.strerror or type(exc).__name__}"
    except Exception as exc:  # one broken film must not stop the audit
        facts.error = f"unexpected_error: {type(exc).__name__}: {exc}"
    return facts


def _progress(total: int, enabled: bool, desc: str) -> Callable[[], None]:
    """A tick function over :func:`pneumonia.progress.progress_bar`."""
    bar = progress_bar(enabled=enabled, total=total, desc=desc, unit="img", dynamic_ncols=True)
    return lambda: bar.update(1)


def measure(
    items: Sequence[AuditItem], *, workers: int = 2, progress: bool = False
) -> list[ImageFacts]:
    """:func:`analyse` every item (threads: decoding and hashing release the GIL), in order."""
    reader = NpzReader()
    tick = _progress(len(items), progress, "auditing")
    out = []
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for facts in pool.map(lambda it: analyse(it, reader), items):
            out.append(facts)
            tick()
    return out


# ----------------------------------------------------------------------------- report parts


def _summary(values: Iterable[float | None]) -> dict[str, float] | None:
    v = np.array([x for x in values if x is not None], dtype=np.float64)
    if not len(v):
        return None
    q = np.quantile(v, [0.0, 0.05, 0.5, 0.95, 1.0])
    return {
        k: round(float(x), 4)
        for k, x in zip(("min", "p05", "median", "p95", "max"), q, strict=True)
    }


def _splits(facts: Sequence[ImageFacts]) -> list[str]:
    return list(dict.fromkeys(f.item.split for f in facts))


def counts_section(facts: Sequence[ImageFacts]) -> dict[str, Any]:
    per: dict[str, dict[str, int]] = {}
    for split in _splits(facts):
        fs = [f for f in facts if f.item.split == split]
        per[split] = {
            name: sum(f.item.sample.label == i for f in fs) for i, name in enumerate(LABELS)
        }
        per[split]["total"] = len(fs)
        per[split]["unreadable"] = sum(f.error is not None for f in fs)
    return {
        "images": per,
        "unreadable": [
            {"split": f.item.split, "path": f.item.key, "reason": f.error} for f in facts if f.error
        ],
    }


def images_section(facts: Sequence[ImageFacts]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for split in _splits(facts):
        out[split] = {}
        for i, name in enumerate(LABELS):
            fs = [
                f
                for f in facts
                if f.item.split == split and f.item.sample.label == i and not f.error
            ]
            out[split][name] = {
                "n": len(fs),
                **{
                    k: _summary(f.stats.get(k) for f in fs)
                    for k in ("width", "height", "aspect", "file_bytes")
                },
                "mode": dict(Counter(str(f.mode) for f in fs)),
                "format": dict(Counter(str(f.fmt) for f in fs)),
                "bit_depth": {str(k): v for k, v in Counter(f.bit_depth for f in fs).items()},
            }
    return out


def shortcuts_section(facts: Sequence[ImageFacts]) -> list[dict[str, Any]]:
    """How well each statistic alone predicts the label, per split: folded ROC-AUC."""
    rows = []
    for split in _splits(facts):
        fs = [f for f in facts if f.item.split == split and not f.error]
        for stat in STATISTICS:
            pairs = [(f.item.sample.label, f.stats.get(stat)) for f in fs]
            pairs = [(y, v) for y, v in pairs if v is not None and np.isfinite(v)]
            y = np.array([p[0] for p in pairs])
            v = np.array([p[1] for p in pairs], dtype=np.float64)
            auc = roc_auc(y, v) if len(pairs) else float("nan")
            folded = None if np.isnan(auc) else max(auc, 1.0 - auc)
            rows.append(
                {
                    "statistic": stat,
                    "split": split,
                    "auc": None if folded is None else round(folded, 4),
                    "warning": folded is not None and folded > SHORTCUT_WARN_AUC,
                    "direction": None
                    if folded is None or auc == 0.5
                    else ("higher" if auc > 0.5 else "lower") + " in PNEUMONIA",
                    "median": {
                        name: (float(np.median(v[y == i])) if (y == i).any() else None)
                        for i, name in enumerate(LABELS)
                    },
                    "n": len(pairs),
                }
            )
    return rows


#: Patient-grouped folds of the categorical metadata screen.
METADATA_FOLDS = 5
METADATA_NUMERIC = "numeric: the value itself as the score"
METADATA_CATEGORICAL = (
    f"categorical: each category's PNEUMONIA rate learnt on the other folds ({METADATA_FOLDS} "
    "folds of whole patients; an unseen category gets the overall rate, an empty value is a "
    "category) scores the held-out fold; the AUC is the mean over the folds"
)


@dataclass(frozen=True)
class MetadataShortcut:
    """How well one manifest column alone predicts the label."""

    column: str
    kind: str  # "numeric" or "categorical"
    auc: float | None  # ROC-AUC folded to >= 0.5; None: one class, or no values
    warning: bool  # auc above SHORTCUT_WARN_AUC
    n: int  # rows with a value (numeric) or all labelled rows (categorical)
    categories: int | None  # distinct values of a categorical column
    direction: str | None  # numeric: "higher in PNEUMONIA"; categorical: the riskiest category

    def to_dict(self) -> dict[str, Any]:
        return {
            "column": self.column,
            "kind": self.kind,
            "auc": self.auc,
            "warning": self.warning,
            "n": self.n,
            "categories": self.categories,
            "direction": self.direction,
        }


def _as_float(value: str) -> float | None:
    try:
        x = float(value)
    except ValueError:
        return None
    return x if np.isfinite(x) else None


def _patient_folds(patients: Sequence[str], k: int, seed: int) -> np.ndarray:
    """A fold number per row; every row of a patient in the same fold."""
    unique = sorted(set(patients))
    order = np.random.default_rng(seed).permutation(len(unique))
    fold_of = {unique[j]: i % k for i, j in enumerate(order)}
    return np.array([fold_of[p] for p in patients])


def metadata_shortcuts(
    rows: Sequence[ManifestRow], *, folds: int = METADATA_FOLDS, seed: int = DEFAULT_SPLIT_SEED
) -> list[MetadataShortcut]:
    """How well each metadata column of labelled manifest rows alone predicts the label.

    A column whose every non-empty value is a number is scored directly (rows without a
    value left out); any other column is categorical: each row's score is its category's
    PNEUMONIA rate learnt on the other folds of patients, so that a column unique to each
    patient (an id, a checksum) scores 0.5 rather than 1.0. AUCs are folded to >= 0.5 and a
    column above :data:`SHORTCUT_WARN_AUC` (the nuisance statistics' threshold) is flagged.

    Args:
        rows: labelled rows (:func:`pneumonia.data.read_labelled`); unlabelled ones are skipped.
        folds: patient folds of the categorical screen.
        seed: the folds' seed.
    """
    rows = [r for r in rows if r.label is not None]
    columns = list(dict.fromkeys(c for r in rows for c in r.metadata))
    y_all = np.array([r.label for r in rows], dtype=np.int64)
    fold = _patient_folds([r.patient for r in rows], folds, seed) if rows else np.zeros(0, int)
    out = []
    for col in columns:
        values = [(r.metadata.get(col) or "").strip() for r in rows]
        present = [v for v in values if v]
        numbers = [_as_float(v) for v in present]
        if present and all(x is not None for x in numbers):
            keep = [i for i, v in enumerate(values) if v]
            y = y_all[keep]
            score = np.array([float(values[i]) for i in keep])
            kind, categories = "numeric", None
        else:
            # An unseen category scores the overall rate: one constant for every fold, so that
            # a column unique to each patient ranks nothing (a per-fold rate would rank folds).
            y, score = y_all, np.zeros(len(rows))
            prior = float(y.mean())
            for f in range(folds):
                train, test = fold != f, fold == f
                pos: Counter[str] = Counter()
                tot: Counter[str] = Counter()
                for i in np.flatnonzero(train):
                    tot[values[i]] += 1
                    pos[values[i]] += int(y[i])
                for i in np.flatnonzero(test):
                    v = values[i]
                    score[i] = pos[v] / tot[v] if tot[v] else prior
            kind, categories = "categorical", len(set(values))
        if kind == "categorical":
            # The mean of the per-fold AUCs: each fold's rates are learnt on different rows, and
            # pooling the folds would rank one fold's rates against another's (a fold with many
            # PNEUMONIA films held out learns lower rates), which pulls the AUC towards 0.5.
            per_fold = [
                roc_auc(y[fold == f], score[fold == f])
                for f in range(folds)
                if len(set(y[fold == f].tolist())) == 2
            ]
            auc = float(np.mean(per_fold)) if per_fold else float("nan")
        else:
            auc = roc_auc(y, score) if len(set(y.tolist())) == 2 else float("nan")
        folded = None if np.isnan(auc) else round(max(auc, 1.0 - auc), 4)
        direction = None
        if folded is not None and auc != 0.5:
            if kind == "numeric":
                direction = ("higher" if auc > 0.5 else "lower") + " in PNEUMONIA"
            else:
                count = Counter(values)
                positives = Counter(v for v, t in zip(values, y.tolist(), strict=True) if t)
                top = max(sorted(count), key=lambda v: (positives[v] / count[v], count[v]))
                direction = (
                    f"{top or '(empty)'}: {positives[top] / count[top]:.0%} PNEUMONIA "
                    f"of {count[top]}"
                )
        out.append(
            MetadataShortcut(
                col,
                kind,
                folded,
                folded is not None and folded > SHORTCUT_WARN_AUC,
                len(y),
                categories,
                direction,
            )
        )
    return out


def metadata_section(items: Sequence[AuditItem]) -> list[dict[str, Any]]:
    """The metadata shortcut screen of the manifest rows among ``items`` (all splits together)."""
    return [m.to_dict() for m in metadata_shortcuts([i.row for i in items if i.row is not None])]


@dataclass(frozen=True)
class Duplicates:
    """Exact groups (indices into the facts) and verified near pairs (i, j, pHash distance,
    thumbnail correlation)."""

    exact: list[list[int]]
    near: list[tuple[int, int, int, float]]
    candidates: int = 0  # hash-close pairs checked on the thumbnails

    def linked(self) -> set[tuple[int, int]]:
        """Every (i, j), i < j, that is an exact or near duplicate."""
        pairs = {(i, j) for i, j, _, _ in self.near}
        return pairs | {(i, j) for ix in self.exact for a, i in enumerate(ix) for j in ix[a + 1 :]}


def find_duplicates(
    facts: Sequence[ImageFacts], max_distance: int, min_correlation: float
) -> Duplicates:
    """Exact duplicates by sha256; near ones: pHash candidates verified on thumbnails."""
    by_sha: dict[str, list[int]] = defaultdict(list)
    for i, f in enumerate(facts):
        if f.sha256 and not f.error:
            by_sha[f.sha256].append(i)
    exact = [ix for ix in by_sha.values() if len(ix) > 1]
    # Candidates: close in either hash (pHash resists re-encoding and small crops, dHash
    # brightness and contrast changes), then verified on the thumbnails, all vectorised:
    # chest films are so alike that dHash alone proposes a pair in every few hundred.
    n = len(facts)
    ok = [not f.error and f.thumb is not None and f.phash is not None for f in facts]
    pi, pj, _ = near_pair_arrays(
        [f.phash if k else None for f, k in zip(facts, ok, strict=True)], max_distance
    )
    di, dj, _ = near_pair_arrays(
        [f.dhash if k else None for f, k in zip(facts, ok, strict=True)], max_distance
    )
    keys = np.unique(np.r_[pi * n + pj, di * n + dj])
    ci, cj = keys // n, keys % n
    thumbs = np.zeros((n, 1024), dtype=np.float32)
    for k, f in enumerate(facts):
        if ok[k] and f.thumb is not None:
            t = f.thumb.astype(np.float32).ravel()
            t -= t.mean()
            norm = float(np.linalg.norm(t))
            thumbs[k] = t / norm if norm > 0 else 0.0
    corr = (
        np.concatenate(
            [
                np.einsum("ij,ij->i", thumbs[ci[s : s + 65536]], thumbs[cj[s : s + 65536]])
                for s in range(0, len(ci), 65536)
            ]
        )
        if len(ci)
        else np.zeros(0)
    )
    near = []
    keep = np.flatnonzero(corr >= min_correlation)
    for i, j, r in zip(ci[keep].tolist(), cj[keep].tolist(), corr[keep].tolist(), strict=True):
        a, b = facts[i], facts[j]
        if a.sha256 != b.sha256 and a.phash is not None and b.phash is not None:
            near.append((i, j, bin(a.phash ^ b.phash).count("1"), round(r, 4)))
    candidates = len(ci)
    return Duplicates(exact, near, candidates)


def duplicates_section(
    facts: Sequence[ImageFacts], dups: Duplicates, max_distance: int, min_correlation: float
) -> dict[str, Any]:
    groups = dups.exact

    def where(ix: Sequence[int]) -> str:
        splits = sorted({facts[i].item.split for i in ix})
        return splits[0] if len(splits) == 1 else "across:" + "+".join(splits)

    def pair(i: int, j: int, d: int, r: float) -> dict[str, Any]:
        a, b = facts[i], facts[j]
        return {
            "a": a.item.key,
            "b": b.item.key,
            "splits": [a.item.split, b.item.split],
            "labels": [LABELS[a.item.sample.label], LABELS[b.item.sample.label]],
            "phash_distance": d,
            "dhash_distance": None
            if a.dhash is None or b.dhash is None
            else bin(a.dhash ^ b.dhash).count("1"),
            "correlation": r,
        }

    def tally(kinds: Iterable[str]) -> dict[str, int]:
        return dict(sorted(Counter(kinds).items()))

    near = dups.near
    return {
        "rule": f"exact: identical sha256 of the file (npz: of the pixels); near: two different "
        f"files whose pHash or dHash differ in at most {max_distance} of 64 bits and whose "
        f"32x32 thumbnails correlate at least {min_correlation} (Pearson)",
        "exact": {
            "groups": len(groups),
            "images_in_groups": sum(len(ix) for ix in groups),
            "by_split": tally(where(ix) for ix in groups),
            "label_conflicts": sum(
                len({facts[i].item.sample.label for i in ix}) > 1 for ix in groups
            ),
            "list": [
                {
                    "sha256": facts[ix[0]].sha256,
                    "files": [facts[i].item.key for i in ix],
                    "where": where(ix),
                    "labels": sorted({LABELS[facts[i].item.sample.label] for i in ix}),
                }
                for ix in groups
            ],
        },
        "near": {
            "max_hash_distance": max_distance,
            "min_correlation": min_correlation,
            "candidates_checked": dups.candidates,
            "pairs": len(near),
            "by_split": tally(where((i, j)) for i, j, _, _ in near),
            "label_conflicts": sum(
                facts[i].item.sample.label != facts[j].item.sample.label for i, j, _, _ in near
            ),
            "list": [pair(*x) for x in near],
        },
    }


def patients_section(
    facts: Sequence[ImageFacts], data: Path, dups: Duplicates, val_fraction: float, split_seed: int
) -> dict[str, Any]:
    ids: list[str] = []
    rules: Counter[str] = Counter()
    parsed = 0
    for f in facts:
        if f.item.sample.npz_index is not None:
            ids.append(f.item.sample.patient)
            rules["none (MedMNIST has no patient ids)"] += 1
            continue
        rule: str | None
        if f.item.sample.manifest_patient is not None:
            pid, rule = f.item.sample.manifest_patient, f"{PATIENT_FROM_MANIFEST} patient_id column"
        else:
            pid, rule = patient_id_rule(f.item.sample.path.name)
        ids.append(pid)
        rules[rule or "none (the file is its own patient)"] += 1
        parsed += rule is not None
    splits = _splits(facts)
    per_split = {
        split: {
            name: len(
                {
                    ids[k]
                    for k, f in enumerate(facts)
                    if f.item.split == split and f.item.sample.label == i
                }
            )
            for i, name in enumerate(LABELS)
        }
        | {"total": len({ids[k] for k, f in enumerate(facts) if f.item.split == split})}
        for split in splits
    }
    linked = dups.linked()
    cross = []
    for a_i, a in enumerate(splits):
        for b in splits[a_i + 1 :]:
            in_a = defaultdict(list)
            in_b = defaultdict(list)
            for k, f in enumerate(facts):
                if f.item.split == a:
                    in_a[ids[k]].append(k)
                elif f.item.split == b:
                    in_b[ids[k]].append(k)
            shared = sorted(set(in_a) & set(in_b))
            if parsed == 0:
                shared = []  # unparsed ids are file names: a shared one is a shared file name
            overlap: list[dict[str, Any]] = []
            collisions: list[str] = []
            for pid in shared:
                matches = [
                    [facts[i].item.key, facts[j].item.key]
                    for i in in_a[pid]
                    for j in in_b[pid]
                    if (min(i, j), max(i, j)) in linked
                ]
                if matches:
                    overlap.append({"patient": pid, "matching_images": matches})
                else:
                    collisions.append(pid)
            cross.append(
                {
                    "splits": [a, b],
                    "shared_ids": len(shared),
                    "true_overlap": overlap,
                    "id_collisions": collisions,
                }
            )
    return {
        "rules": dict(rules),
        "ids_parsed": parsed,
        "per_split": per_split,
        "across_splits": cross,
        "overlap_rule": "a patient id found in two splits is true overlap when at least one of its "
        "images in one split is an exact or near duplicate of one in the other; otherwise an id "
        "collision (in the Kermany set train and test number their children separately, so the "
        "same personN names different children; a follow-up film of the same child would also "
        "land here, so collisions are listed for review)",
        "trainer_split": trainer_split_section(facts, data, val_fraction, split_seed, linked),
    }


def trainer_split_section(
    facts: Sequence[ImageFacts],
    data: Path,
    val_fraction: float,
    split_seed: int,
    linked: set[tuple[int, int]],
) -> dict[str, Any] | None:
    """The validation split ``pneumonia train`` would draw from this data, and what it shares."""
    try:
        plan = train_val_split(data, val_fraction, split_seed)
    except (DatasetLayoutError, ValueError) as exc:
        return {"error": str(exc)}
    index = {f.item.sample: k for k, f in enumerate(facts)}
    side = {index[s]: "train" for s in plan.train if s in index} | {
        index[s]: "val" for s in plan.val if s in index
    }
    crossing = [(i, j) for i, j in linked if i in side and j in side and side[i] != side[j]]
    shared = {s.patient for s in plan.train} & {s.patient for s in plan.val}
    return {
        "method": plan.method,
        "description": plan.description,
        "val_fraction": val_fraction if plan.method != SPLIT_MEDMNIST_VAL else None,
        "split_seed": split_seed if plan.method != SPLIT_MEDMNIST_VAL else None,
        "train_images": len(plan.train),
        "val_images": len(plan.val),
        "train_patients": len({s.patient for s in plan.train}),
        "val_patients": len({s.patient for s in plan.val}),
        "shared_patients": None if plan.method == SPLIT_MEDMNIST_VAL else len(shared),
        "duplicate_pairs_across": len(crossing),
        "duplicates_across": [[facts[i].item.key, facts[j].item.key] for i, j in sorted(crossing)],
    }


# ----------------------------------------------------------------------------- entry points


def audit(
    data: Path,
    *,
    max_distance: int = NEAR_DUPLICATE_DISTANCE,
    min_correlation: float = NEAR_DUPLICATE_CORRELATION,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    split_seed: int = DEFAULT_SPLIT_SEED,
    workers: int = 2,
    progress: bool = False,
) -> dict[str, Any]:
    """The full audit report of ``data`` (see the module docstring); strict JSON.

    Keys: ``data``, ``seconds``, ``counts``, ``patients``, ``duplicates``, ``images``,
    ``shortcuts``, ``metadata_shortcuts`` (:func:`metadata_shortcuts`, empty without a
    manifest), ``metadata_methods``, ``warnings`` and ``histograms`` (the HTML page's plots).
    """
    t0 = time.monotonic()
    items = audit_items(Path(data))
    facts = measure(items, workers=workers, progress=progress)
    dups = find_duplicates(facts, max_distance, min_correlation)
    report: dict[str, Any] = {
        "data": str(data),
        "counts": counts_section(facts),
        "patients": patients_section(facts, Path(data), dups, val_fraction, split_seed),
        "duplicates": duplicates_section(facts, dups, max_distance, min_correlation),
        "images": images_section(facts),
        "shortcuts": shortcuts_section(facts),
        "metadata_shortcuts": metadata_section(items),
        "metadata_methods": {"numeric": METADATA_NUMERIC, "categorical": METADATA_CATEGORICAL},
        "statistics": STATISTICS,
        "histograms": histograms(facts),
    }
    report["warnings"] = warnings(report)
    report["seconds"] = round(time.monotonic() - t0, 1)
    return report


def shortcut_table(
    samples_or_root: Path | str | Sequence[Sample],
    *,
    split: str = "train",
    workers: int = 2,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """The ``shortcuts`` rows of some labelled samples, or of every split of a data root.

    For the model card: ``shortcut_table(split.train + split.val)`` on the samples the
    trainer used gives rows with ``split`` set to ``split`` ("train").
    """
    if isinstance(samples_or_root, (str, Path)):
        items = audit_items(Path(samples_or_root))
    else:
        items = [AuditItem(split, s, str(s.path)) for s in samples_or_root]
    rows = shortcuts_section(measure(items, workers=workers, progress=progress))
    return [{k: r[k] for k in ("statistic", "split", "auc", "warning", "direction")} for r in rows]


def warnings(report: dict[str, Any]) -> list[str]:
    """One line per finding a person should act on."""
    out = []
    for r in report["shortcuts"]:
        if r["warning"]:
            out.append(
                f"shortcut: {r['statistic']} alone predicts the label in {r['split']} with AUC "
                f"{r['auc']:.3f} ({r['direction']}); a model can learn it instead of the lungs"
            )
    for m in report["metadata_shortcuts"]:
        if m["warning"]:
            out.append(
                f"shortcut: manifest column {m['column']} ({m['kind']}) alone predicts the label "
                f"with AUC {m['auc']:.3f} ({m['direction']}); a model can learn what goes with it"
            )
    unreadable = report["counts"]["unreadable"]
    if unreadable:
        out.append(f"{len(unreadable)} unreadable file(s); training skips them")
    for c in report["patients"]["across_splits"]:
        if c["true_overlap"]:
            out.append(
                f"{len(c['true_overlap'])} patient(s) with the same images in {c['splits'][0]} and {c['splits'][1]}"
            )
    ts = report["patients"]["trainer_split"]
    if ts and ts.get("shared_patients"):
        out.append(
            f"the trainer's split shares {ts['shared_patients']} patient(s) between train and validation"
        )
    if ts and ts.get("duplicate_pairs_across"):
        out.append(
            f"{ts['duplicate_pairs_across']} duplicate pair(s) straddle the trainer's train/validation split"
        )
    d = report["duplicates"]
    for kind in ("exact", "near"):
        across = {k: v for k, v in d[kind]["by_split"].items() if k.startswith("across:")}
        if across:
            out.append(f"{kind} duplicates across splits: {across}")
        if d[kind]["label_conflicts"]:
            out.append(
                f"{d[kind]['label_conflicts']} {kind} duplicate group(s)/pair(s) carry different labels"
            )
    return out


# ----------------------------------------------------------------------------- plots and HTML


def histograms(facts: Sequence[ImageFacts], bins: int = 24) -> dict[str, Any]:
    """Per split and statistic: shared bin edges and per-class counts (for the HTML page)."""
    out: dict[str, Any] = {}
    for split in _splits(facts):
        fs = [f for f in facts if f.item.split == split and not f.error]
        out[split] = {}
        for stat in STATISTICS:
            vals = [(f.item.sample.label, f.stats.get(stat)) for f in fs]
            vals = [(y, v) for y, v in vals if v is not None and np.isfinite(v)]
            if not vals:
                continue
            v = np.array([x for _, x in vals], dtype=np.float64)
            y = np.array([c for c, _ in vals])
            lo, hi = np.quantile(v, [0.005, 0.995])
            if hi <= lo:
                lo, hi = float(v.min()) - 0.5, float(v.max()) + 0.5
            edges = np.linspace(lo, hi, bins + 1)
            out[split][stat] = {
                "edges": [round(float(e), 5) for e in edges],
                **{
                    name: np.histogram(np.clip(v[y == i], lo, hi), edges)[0].tolist()
                    for i, name in enumerate(LABELS)
                },
            }
    return out


_COLOURS = {"NORMAL": "#3b75af", "PNEUMONIA": "#ef8636"}


def svg_histogram(h: dict[str, Any], width: int = 260, height: int = 90) -> str:
    """Two class histograms (as shares of each class) overlaid in one small inline SVG."""
    edges = h["edges"]
    n = len(edges) - 1
    shares = {}
    for name in LABELS:
        c = np.array(h[name], dtype=np.float64)
        shares[name] = c / c.sum() if c.sum() else c
    top = max(float(s.max()) for s in shares.values()) or 1.0
    bw = (width - 10) / n
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height + 16}" role="img">'
    ]
    for name in LABELS:
        for k, s in enumerate(shares[name]):
            bh = (height - 4) * s / top
            parts.append(
                f'<rect x="{5 + k * bw:.1f}" y="{height - bh:.1f}" width="{bw:.1f}" height="{bh:.1f}" '
                f'fill="{_COLOURS[name]}" fill-opacity="0.5"/>'
            )
    parts.append(f'<line x1="5" y1="{height}" x2="{width - 5}" y2="{height}" stroke="#444"/>')
    parts.append(f'<text x="5" y="{height + 13}" font-size="10">{_num(edges[0])}</text>')
    parts.append(
        f'<text x="{width - 5}" y="{height + 13}" font-size="10" text-anchor="end">{_num(edges[-1])}</text>'
    )
    parts.append("</svg>")
    return "".join(parts)


def _num(x: Any) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float):
        return f"{x:,.0f}" if abs(x) >= 1000 else f"{x:.3g}"
    return f"{x:,}" if isinstance(x, int) else str(x)


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    e = html.escape
    head = "".join(f"<th>{e(str(h))}</th>" for h in header)
    body = "".join(
        "<tr>"
        + "".join(f"<td>{c if isinstance(c, _Raw) else e(_num(c))}</td>" for c in r)
        + "</tr>"
        for r in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


class _Raw(str):
    """Already-escaped HTML for a table cell."""


def render_html(report: dict[str, Any], max_list: int = 50) -> str:
    """A self-contained HTML page (inline CSS and SVG, no scripts) with the report's content."""
    e = html.escape
    s = []
    s.append(f"<h1>Data audit: {e(report['data'])}</h1>")
    s.append(
        f"<p>{report['seconds']} s. Legend: <span style='color:{_COLOURS['NORMAL']}'>&#9632; NORMAL</span> "
        f"<span style='color:{_COLOURS['PNEUMONIA']}'>&#9632; PNEUMONIA</span></p>"
    )
    s.append("<h2>Warnings</h2>")
    s.append(
        "<ul>" + "".join(f"<li class='warn'>{e(w)}</li>" for w in report["warnings"]) + "</ul>"
        if report["warnings"]
        else "<p>None.</p>"
    )

    c = report["counts"]
    s.append("<h2>Counts</h2>")
    s.append(
        _table(
            ["split", *LABELS, "total", "unreadable"],
            [
                [k, *(v[n] for n in LABELS), v["total"], v["unreadable"]]
                for k, v in c["images"].items()
            ],
        )
    )
    if c["unreadable"]:
        s.append(
            _table(
                ["split", "file", "reason"],
                [[u["split"], u["path"], u["reason"]] for u in c["unreadable"][:max_list]],
            )
        )

    s.append(
        "<h2>Shortcuts</h2><p>How well each statistic alone predicts the label (ROC-AUC folded to &ge; 0.5; "
        f"warning above {SHORTCUT_WARN_AUC}). Histograms show each class's share per bin.</p>"
    )
    hist = report["histograms"]
    rows = []
    for r in report["shortcuts"]:
        h = hist.get(r["split"], {}).get(r["statistic"])
        med = r["median"]
        rows.append(
            [
                r["split"],
                r["statistic"],
                r["auc"],
                _Raw("<b class='warn'>yes</b>" if r["warning"] else "no"),
                r["direction"],
                med["NORMAL"],
                med["PNEUMONIA"],
                _Raw(svg_histogram(h) if h else ""),
            ]
        )
    s.append(
        _table(
            [
                "split",
                "statistic",
                "AUC",
                "warning",
                "direction",
                "median NORMAL",
                "median PNEUMONIA",
                "distribution",
            ],
            rows,
        )
    )
    s.append(
        "<details><summary>What each statistic measures</summary><ul>"
        + "".join(f"<li><b>{e(k)}</b>: {e(v)}</li>" for k, v in report["statistics"].items())
        + "</ul></details>"
    )
    if report["metadata_shortcuts"]:
        s.append(
            "<h2>Manifest columns</h2><p>How well each manifest column alone predicts the label "
            f"(ROC-AUC folded to &ge; 0.5; warning above {SHORTCUT_WARN_AUC}). "
            f"{e(report['metadata_methods']['numeric'])}; "
            f"{e(report['metadata_methods']['categorical'])}.</p>"
        )
        s.append(
            _table(
                ["column", "kind", "AUC", "warning", "direction", "n", "categories"],
                [
                    [
                        m["column"],
                        m["kind"],
                        m["auc"],
                        _Raw("<b class='warn'>yes</b>" if m["warning"] else "no"),
                        m["direction"],
                        m["n"],
                        m["categories"],
                    ]
                    for m in report["metadata_shortcuts"]
                ],
            )
        )

    p = report["patients"]
    s.append("<h2>Patients</h2>")
    s.append(f"<p>Id rules: {e(', '.join(f'{k}: {v}' for k, v in p['rules'].items()))}.</p>")
    s.append(
        _table(
            ["split", *LABELS, "total"],
            [[k, *(v[n] for n in LABELS), v["total"]] for k, v in p["per_split"].items()],
        )
    )
    s.append(f"<p>{e(p['overlap_rule'])}</p>")
    s.append(
        _table(
            ["splits", "shared ids", "true overlap", "id collisions"],
            [
                [
                    " / ".join(x["splits"]),
                    x["shared_ids"],
                    len(x["true_overlap"]),
                    len(x["id_collisions"]),
                ]
                for x in p["across_splits"]
            ],
        )
    )
    for x in p["across_splits"]:
        if x["true_overlap"]:
            s.append(
                _table(
                    ["patient", "matching images"],
                    [
                        [o["patient"], "; ".join(" = ".join(m) for m in o["matching_images"])]
                        for o in x["true_overlap"][:max_list]
                    ],
                )
            )
    ts = p["trainer_split"]
    if ts:
        s.append("<h3>The trainer's validation split</h3>")
        s.append(
            _table(["key", "value"], [[k, v] for k, v in ts.items() if k != "duplicates_across"])
        )

    d = report["duplicates"]
    s.append(f"<h2>Duplicates</h2><p>{e(d['rule'])}</p>")
    s.append(
        _table(
            ["kind", "groups / pairs", "where", "label conflicts"],
            [
                [
                    "exact",
                    d["exact"]["groups"],
                    ", ".join(f"{k}: {v}" for k, v in d["exact"]["by_split"].items()),
                    d["exact"]["label_conflicts"],
                ],
                [
                    "near",
                    d["near"]["pairs"],
                    ", ".join(f"{k}: {v}" for k, v in d["near"]["by_split"].items()),
                    d["near"]["label_conflicts"],
                ],
            ],
        )
    )
    if d["exact"]["list"]:
        s.append(
            _table(
                ["exact group", "where", "labels"],
                [
                    ["; ".join(g["files"]), g["where"], ", ".join(g["labels"])]
                    for g in d["exact"]["list"][:max_list]
                ],
            )
        )
    if d["near"]["list"]:
        s.append(
            _table(
                ["a", "b", "labels", "pHash", "dHash", "correlation"],
                [
                    [
                        x["a"],
                        x["b"],
                        " / ".join(x["labels"]),
                        x["phash_distance"],
                        x["dhash_distance"],
                        x["correlation"],
                    ]
                    for x in d["near"]["list"][:max_list]
                ],
            )
        )
    s.append(f"<p>Lists show at most {max_list} rows; the JSON report has all.</p>")

    s.append("<h2>Images</h2>")
    rows = []
    for split, per in report["images"].items():
        for name, v in per.items():
            rows.append(
                [
                    split,
                    name,
                    v["n"],
                    *(_fmt_summary(v[k]) for k in ("width", "height", "aspect", "file_bytes")),
                    _counter(v["format"]),
                    _counter(v["mode"]),
                    _counter(v["bit_depth"]),
                ]
            )
    s.append(
        _table(
            [
                "split",
                "class",
                "n",
                "width",
                "height",
                "aspect",
                "file bytes",
                "format",
                "mode",
                "bit depth",
            ],
            rows,
        )
    )
    s.append("<p>Ranges: min / median / max.</p>")
    css = (
        "body{font:14px sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse;margin:.5em 0}"
        "td,th{border:1px solid #ccc;padding:2px 6px;text-align:left;vertical-align:middle}"
        "th{background:#f3f3f3}.warn{color:#b00}"
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>Data audit</title><style>{css}</style>"
        f"</head><body>{''.join(s)}</body></html>\n"
    )


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|")


def render_markdown(report: dict[str, Any]) -> str:
    """The report's warnings and shortcut tables (statistics and manifest columns) as Markdown."""
    out = [f"# Data audit: {report['data']}", "", "## Warnings", ""]
    out += [f"- {w}" for w in report["warnings"]] or ["None."]
    out += [
        "",
        "## Shortcuts: nuisance statistics",
        "",
        f"ROC-AUC of each statistic alone, folded to >= 0.5; warning above {SHORTCUT_WARN_AUC}.",
        "",
        "| split | statistic | AUC | warning | direction |",
        "|---|---|---|---|---|",
    ]
    out += [
        f"| {r['split']} | {r['statistic']} | {_num(r['auc'])} | "
        f"{'**yes**' if r['warning'] else 'no'} | {r['direction'] or ''} |"
        for r in report["shortcuts"]
    ]
    if report["metadata_shortcuts"]:
        methods = report["metadata_methods"]
        out += [
            "",
            "## Shortcuts: manifest columns",
            "",
            f"ROC-AUC of each column alone, folded to >= 0.5; warning above {SHORTCUT_WARN_AUC}. "
            f"{methods['numeric'][0].upper()}{methods['numeric'][1:]}. "
            f"{methods['categorical'][0].upper()}{methods['categorical'][1:]}.",
            "",
            "| column | kind | AUC | warning | direction | n | categories |",
            "|---|---|---|---|---|---|---|",
        ]
        out += [
            f"| {m['column']} | {m['kind']} | {_num(m['auc'])} | "
            f"{'**yes**' if m['warning'] else 'no'} | {_md_cell(m['direction'] or '')} | {m['n']} | "
            f"{'' if m['categories'] is None else m['categories']} |"
            for m in report["metadata_shortcuts"]
        ]
    return "\n".join(out) + "\n"


def _fmt_summary(x: dict[str, float] | None) -> str:
    return "n/a" if x is None else f"{_num(x['min'])} / {_num(x['median'])} / {_num(x['max'])}"


def _counter(c: dict[str, int]) -> str:
    return ", ".join(f"{k}: {v}" for k, v in c.items())
