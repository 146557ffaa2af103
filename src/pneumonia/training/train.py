"""The training loop. Writes a run folder (its files: :mod:`pneumonia.training.run`).

Every file is written atomically (pneumonia.atomic), so a run stopped at any moment leaves a
readable folder, and ``train(..., resume=True)`` (``pneumonia train --resume RUN``) goes on
from each member's last finished epoch to the same result as a run never stopped.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import random
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from pneumonia import atomic
from pneumonia.audit import shortcut_table
from pneumonia.calibration import calibrated_probability, fit_calibration, nll
from pneumonia.card import DATASET_FILE, RULES, Dataset, ThresholdChoice, pick_threshold
from pneumonia.data import LoadedImages, Sample, class_counts, load_images, train_val_split
from pneumonia.evaluate import (
    brier,
    expected_calibration_error,
    roc_auc,
    threshold_metrics,
)
from pneumonia.progress import progress_bar
from pneumonia.training import distributed
from pneumonia.training.augment import augment_batch
from pneumonia.training.config import TrainConfig
from pneumonia.training.distributed import SINGLE, Dist
from pneumonia.training.model import ModelConfig, build_model
from pneumonia.training.run import (
    CHECKPOINT,
    HISTORY,
    LAST,
    RecordedSplit,
    RunFolder,
    load_split,
    record_environment,
    record_split,
    run_split,
    split_digest,
    split_params,
)
from pneumonia.training.stress import StressedScores, stressed_logits, stressed_report

log = logging.getLogger(__name__)


@dataclass
class MemberResult:
    seed: int
    best_epoch: int
    val_auc: float
    val_loss: float
    val_logits: np.ndarray


def _balanced_bce(
    logits: torch.Tensor, y: torch.Tensor, pos_weight: float, reduction: str = "mean"
) -> torch.Tensor:
    # Weights positives by n_neg/n_pos so both classes pull equally (3:1 imbalance in train).
    return F.binary_cross_entropy_with_logits(
        logits, y, pos_weight=torch.tensor(pos_weight, device=logits.device), reduction=reduction
    )


def resolve_device(name: str) -> torch.device:
    """``auto``: CUDA when a GPU is present, else the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            "device 'cuda' was asked for, but torch sees no CUDA GPU; use --device auto or cpu"
        )
    return torch.device(name)


def _device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@torch.no_grad()
def predict_logits(
    model: nn.Module, x: np.ndarray | torch.Tensor, batch_size: int = 128
) -> np.ndarray:
    """Raw logits for a stack of preprocessed images, in eval mode, on the model's device."""
    model.eval()
    dev = _device_of(model)
    xt = torch.as_tensor(x)
    out = [model(xt[i : i + batch_size].to(dev)).cpu() for i in range(0, len(xt), batch_size)]
    return torch.cat(out).numpy().astype(np.float64) if out else np.zeros(0)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast type of the training step (None: float32) for ``TrainConfig.precision``."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def _lr_at(step: int, total: int, warmup: int, base: float, schedule: str = "cosine") -> float:
    if schedule == "onecycle":
        # torch's OneCycleLR shape (cosine annealing, pct_start 0.3, div 25, final div 1e4).
        up = max(1, int(0.3 * total))
        lo, end = base / 25, base / 25 / 1e4
        if step < up:
            return lo + (base - lo) * 0.5 * (1 - math.cos(math.pi * step / up))
        t = (step - up) / max(1, total - up)
        return end + (base - end) * 0.5 * (1 + math.cos(math.pi * t))
    if step < warmup:
        return base * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return base * 0.5 * (1 + math.cos(math.pi * t))


def _rng_states(g: torch.Generator) -> dict[str, Any]:
    """Every random state the epoch loop draws from (``g``: shuffling and augmentation)."""
    np_state = np.random.get_state(legacy=False)
    return {
        "generator": g.get_state(),
        "torch": torch.get_rng_state(),  # dropout
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            **np_state,
            "state": {**np_state["state"], "key": np_state["state"]["key"].tolist()},
        },
        "python": random.getstate(),
    }


def _restore_rng_states(states: dict[str, Any], g: torch.Generator) -> None:
    g.set_state(states["generator"])
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    np_state = states["numpy"]
    key = np.asarray(np_state["state"]["key"], dtype=np.uint32)
    np.random.set_state({**np_state, "state": {**np_state["state"], "key": key}})
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))


def _save_torch(obj: Any, path: Path) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic.write_bytes(path, buf.getvalue())


def train_member(
    cfg: TrainConfig,
    seed: int,
    train: LoadedImages,
    val: LoadedImages,
    out: Path,
    progress: bool,
    resume: bool = False,
    dist: Dist = SINGLE,
) -> MemberResult:
    """Train one network with early stopping on validation AUC (ties: lower loss).

    After every epoch ``out/last.pt`` holds the whole loop state; with ``resume`` the loop
    starts from it (a member that had finished is not trained again).

    Under several processes (``dist``) every process draws the same shuffle and augments the
    same global batch of ``cfg.batch_size`` from the same generator, then trains on its share
    (every ``world``-th image) in DistributedDataParallel, which averages the gradients: the
    step is one process's step on the global batch. Rank 0 alone validates, decides and writes
    ``out``; the others get its decisions and, on resume, its ``last.pt``.
    """
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
    # Dropout draws on the global generator: another stream per process (rank 0's is seed's).
    torch.manual_seed(seed + dist.rank)
    g = torch.Generator().manual_seed(seed)
    device = distributed.process_device(dist, resolve_device(cfg.device))
    autocast = autocast_dtype(cfg.precision, device)
    # Channels-last feeds cuDNN's fastest convolutions; on the CPU it only adds copies.
    memory = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    model = build_model(cfg.model, load_pretrained=True).to(device)
    if memory is torch.channels_last:
        model = model.to(memory_format=memory)  # type: ignore[call-overload]
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    n_pos = int(train.y.sum())
    pos_weight = (len(train.y) - n_pos) / max(1, n_pos)
    x_train = torch.from_numpy(train.x)
    y_train = torch.from_numpy(train.y.astype(np.float32))
    steps_per_epoch = math.ceil(len(x_train) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    warmup = int(cfg.warmup_epochs * steps_per_epoch)
    history: list[dict[str, Any]] = []
    best_key: tuple[float, float] | None = None
    best: MemberResult | None = None
    stale = 0
    step = 0
    first_epoch = 1
    last = None
    if resume and dist.is_main and (out / LAST).is_file():
        last = torch.load(out / LAST, map_location="cpu", weights_only=True)
    if resume:
        last = distributed.broadcast(dist, last)
    if last is not None:
        if last["seed"] != seed:
            raise ValueError(f"{out / LAST} belongs to seed {last['seed']}, not {seed}")
        model.load_state_dict(last["model"])
        opt.load_state_dict(last["optimizer"])
        step, stale, history = last["step"], last["stale"], last["history"]
        best_key = (last["best_key"][0], last["best_key"][1])
        b = last["best"]
        best = MemberResult(seed, b["epoch"], b["val_auc"], b["val_loss"], b["val_logits"].numpy())
        _restore_rng_states(last["rng"], g)
        by_rank = last.get("torch_rng_by_rank")
        if dist.active:
            if by_rank is None or len(by_rank) != dist.world:
                raise ValueError(
                    f"{out / LAST} was written by a run of {len(by_rank or [0])} process(es), "
                    f"this one has {dist.world}; resume with as many processes as it started with"
                )
            torch.set_rng_state(by_rank[dist.rank])
        first_epoch = last["epoch"] + 1
        log.info("seed %d: resumed after epoch %d", seed, last["epoch"])
        if last["finished"]:
            return best
    net: nn.Module = model
    if dist.active:
        if device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        net = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    for epoch in range(first_epoch, cfg.epochs + 1):
        net.train()
        t0 = time.time()
        perm = torch.randperm(len(x_train), generator=g)
        batches = range(steps_per_epoch)
        bar = progress_bar(
            batches,
            enabled=progress and dist.is_main,
            desc=f"seed {seed} epoch {epoch}/{cfg.epochs}",
            unit="batch",
            leave=False,
        )
        running = 0.0
        for b in bar:
            idx = perm[b * cfg.batch_size : (b + 1) * cfg.batch_size]
            if len(idx) < 2 * dist.world:  # BatchNorm needs more than one image a process
                continue
            xb = augment_batch(x_train[idx].clone(), cfg.augment, g)
            yb = y_train[idx]
            if dist.active:
                mine = distributed.shard(dist, len(idx))
                xb, yb = xb[mine], yb[mine]
            for group in opt.param_groups:
                group["lr"] = _lr_at(step, total, warmup, cfg.lr, cfg.schedule)
            with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
                logits = net(xb.to(device, memory_format=memory)).float()
            if len(idx) % dist.world:
                # Unequal shares: each process's sum over the global count, times the world
                # (DDP divides by it), gives the global batch's mean.
                loss = (
                    _balanced_bce(logits, yb.to(device), pos_weight, "sum") * dist.world / len(idx)
                )
            else:
                loss = _balanced_bce(logits, yb.to(device), pos_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            running += float(loss.detach())
            bar.set_postfix(loss=f"{running / (b + 1):.4f}")
        bar.close()
        running = distributed.mean(dist, running)
        torch_rng_by_rank = distributed.gather(dist, torch.get_rng_state())
        if dist.is_main:
            stale, best_key, best = _end_epoch(
                cfg,
                seed,
                model,
                opt,
                val,
                out,
                pos_weight,
                epoch,
                t0,
                running / steps_per_epoch,
                history,
                (stale, best_key, best),
                step,
                g,
                torch_rng_by_rank if dist.active else None,
            )
        stale = distributed.broadcast(dist, stale)
        if stale >= cfg.patience:
            if dist.is_main and best is not None:
                log.info(
                    "seed %d: early stop after epoch %d (best %d)", seed, epoch, best.best_epoch
                )
            break
    best = distributed.broadcast(dist, best)
    assert best is not None
    return best


def _end_epoch(
    cfg: TrainConfig,
    seed: int,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    val: LoadedImages,
    out: Path,
    pos_weight: float,
    epoch: int,
    t0: float,
    train_loss: float,
    history: list[dict[str, Any]],
    state: tuple[int, tuple[float, float] | None, MemberResult | None],
    step: int,
    g: torch.Generator,
    torch_rng_by_rank: list[torch.Tensor] | None,
) -> tuple[int, tuple[float, float], MemberResult]:
    """Validate, keep the best checkpoint and write the epoch's files (rank 0 alone)."""
    stale, best_key, best = state
    val_logits = predict_logits(model, val.x)
    val_auc = roc_auc(val.y, val_logits)
    val_loss = float(
        _balanced_bce(
            torch.from_numpy(val_logits), torch.from_numpy(val.y.astype(np.float64)), pos_weight
        )
    )
    row = {
        "epoch": epoch,
        "train_loss": train_loss,
        "val_loss": val_loss,
        "val_auc": val_auc,
        "lr": opt.param_groups[0]["lr"],
        "seconds": round(time.time() - t0, 1),
    }
    history.append(row)
    log.info("seed %d epoch %d: %s", seed, epoch, json.dumps(row))
    # Validation AUC saturates near 1 on this data, so AUC is compared to 3 decimals
    # and ties go to the lower validation loss.
    key = (round(val_auc, 3), -val_loss)
    if best_key is None or key > best_key:
        best_key, stale = key, 0
        best = MemberResult(seed, epoch, val_auc, val_loss, val_logits)
        _save_torch(
            {
                "state_dict": {k: v.cpu() for k, v in model.state_dict().items()},
                "model_config": cfg.model.to_dict(),
                "preprocess": cfg.preprocess.to_dict(),
                "epoch": epoch,
                "seed": seed,
            },
            out / CHECKPOINT,
        )
    else:
        stale += 1
    atomic.write_text(out / HISTORY, json.dumps(history, indent=1) + "\n")
    assert best is not None and best_key is not None
    record = {
        "seed": seed,
        "epoch": epoch,
        "finished": stale >= cfg.patience or epoch == cfg.epochs,
        "model": {k: v.cpu() for k, v in model.state_dict().items()},
        "optimizer": opt.state_dict(),
        "step": step,
        "stale": stale,
        "history": history,
        "best_key": list(best_key),
        "best": {
            "epoch": best.best_epoch,
            "val_auc": best.val_auc,
            "val_loss": best.val_loss,
            "val_logits": torch.from_numpy(best.val_logits),
        },
        "rng": _rng_states(g),
    }
    if torch_rng_by_rank is not None:
        # Each process's dropout stream, so a resumed distributed run draws as one never stopped.
        record["torch_rng_by_rank"] = torch_rng_by_rank
    _save_torch(record, out / LAST)
    return stale, best_key, best


def load_member(path: Path) -> nn.Module:
    """Rebuild a network from a checkpoint file alone (on the CPU)."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    model = build_model(ModelConfig.from_dict(ckpt["model_config"]))
    model.load_state_dict(ckpt["state_dict"])
    model.eval()
    return model


def _inference_fn(
    model: nn.Module, input_shape: tuple[int, ...]
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Logits of a batch: through onnxruntime on the CPU (several times faster than torch's
    eager CPU kernels for EfficientNet, and the runtime that serves the model), on the GPU
    with torch."""
    model.eval()
    dev = _device_of(model)
    if dev.type != "cpu":
        return lambda b: model(b.to(dev))
    from pneumonia.predictor import open_session

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "member.onnx"
        torch.onnx.export(
            model,
            (torch.rand(2, *input_shape),),
            str(path),
            input_names=["image"],
            output_names=["logit"],
            dynamic_axes={"image": {0: "N"}, "logit": {0: "N"}},
            opset_version=17,
            dynamo=False,
        )
        sess = open_session(path, torch.get_num_threads())
    return session_logits(sess)


def session_logits(sess: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    """Logits of a batch through an onnxruntime session whose graph gives ``logit``: how the
    stressed validation scores a member on the CPU, and an exported (or quantized) file."""
    from pneumonia.predictor import INPUT_NAME

    return lambda b: torch.from_numpy(sess.run(["logit"], {INPUT_NAME: b.numpy()})[0])


def ensemble_stressed(members: list[nn.Module], val: LoadedImages, seed: int) -> StressedScores:
    """The stressed validation of the members' averaged logits."""
    shape = tuple(val.x.shape[1:])
    scores = [stressed_logits(_inference_fn(m, shape), val.x, val.y, seed) for m in members]
    return StressedScores(
        val.y, {k: np.mean([s.logits[k] for s in scores], axis=0) for k in scores[0].logits}
    )


def train(
    cfg: TrainConfig,
    data_root: Path,
    out: Path,
    *,
    progress: bool = True,
    resume: bool = False,
    dataset: Dataset | None = None,
) -> dict[str, Any]:
    """Train every member, then calibrate and choose the threshold on validation.

    Args:
        resume: Go on from each member's ``last.pt`` in ``out`` (members without one start
            from scratch); ``cfg`` must be the run's own (``out/config.json``).
        dataset: What the training films are (a dataset descriptor), recorded in the run and
            the model card; None: undeclared, and the card says so.

    Returns:
        The calibration record written to ``out/calibration.json``.
    """
    dist = distributed.from_env()
    joined = distributed.setup(dist, resolve_device(cfg.device))
    record = _train(cfg, data_root, out, progress, resume, dataset, dist)
    # Not on an error: a peer may be waiting elsewhere; the process ends and torchrun stops
    # the others.
    if joined:
        distributed.teardown()
    return record


def _train(
    cfg: TrainConfig,
    data_root: Path,
    out: Path,
    progress: bool,
    resume: bool,
    dataset: Dataset | None,
    dist: Dist,
) -> dict[str, Any]:
    run = RunFolder(out)
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        if resume:
            for leftover in atomic.remove_leftovers(out):
                log.info("removed %s, half-written when the run stopped", leftover)
    torch.set_num_threads(cfg.threads or max(1, torch.get_num_threads()))
    config_text = json.dumps(cfg.to_dict(), sort_keys=True)
    distributed.check_agree(dist, "the training configuration", distributed.digest(config_text))
    if dist.active and cfg.batch_size % dist.world:
        raise ValueError(
            f"batch_size {cfg.batch_size} is the global batch and must divide among the "
            f"{dist.world} processes; pick a multiple of {dist.world}"
        )
    if dist.is_main:
        cfg.save(run.config)
        record_environment(run, "train", torch.get_num_threads(), dist.world)
    # Drawn once: a resumed run goes on with the split it recorded, never a new draw. The other
    # processes draw it from their own data; its digest must then be rank 0's.
    if dist.is_main and resume and run.split.is_file():
        split = load_split(run, data_root, split_params(cfg))
    else:
        drawn = train_val_split(data_root, cfg.val_fraction, cfg.split_seed, cfg.max_images)
        if dist.is_main:
            digest = record_split(run, drawn, data_root, split_params(cfg))
        else:
            digest = split_digest(drawn, data_root)
        split = RecordedSplit(
            drawn.train, drawn.val, data_root, drawn.method, drawn.description, digest
        )
    distributed.check_agree(dist, "the training and validation split", split.sha256)
    train_s, val_s = split.train, split.val
    with distributed.node_cache(dist) as cache:
        train_d = distributed.shared_images(dist, train_s, cfg.preprocess, cache, progress)
        results = _train_members(
            cfg, run, train_d, val_s, split, data_root, progress, resume, dataset, dist
        )
    record = None
    if dist.is_main:
        assert results is not None
        val_d, data_summary, members = results
        device = resolve_device(cfg.device)
        nets = [load_member(run.member(m["seed"]) / CHECKPOINT).to(device) for m in members]
        stressed = ensemble_stressed(nets, val_d, cfg.stress_seed)
        summary = {k: v for k, v in data_summary.items() if k != "validation_patients"}
        record = _write_calibration(cfg, out, val_d, stressed, members, summary)
    record = distributed.broadcast(dist, record)
    assert record is not None
    return record


def _train_members(
    cfg: TrainConfig,
    run: RunFolder,
    train_d: LoadedImages,
    val_s: list[Sample],
    split: RecordedSplit,
    data_root: Path,
    progress: bool,
    resume: bool,
    dataset: Dataset | None,
    dist: Dist,
) -> tuple[LoadedImages, dict[str, Any], list[dict[str, Any]]] | None:
    """Record the data (rank 0) and train every member; rank 0 gets (validation, data record,
    members), the other processes None."""
    if len(set(train_d.y.tolist())) < 2:
        raise ValueError("both the training and validation splits need images of both classes")
    val_d = LoadedImages(
        np.zeros((0, *cfg.preprocess.input_shape), np.float32), np.zeros(0, np.int64), [], []
    )
    data_summary: dict[str, Any] = {}
    if dist.is_main:
        val_d = load_images(val_s, cfg.preprocess, progress=progress)
        if len(set(val_d.y.tolist())) < 2:
            raise ValueError("both the training and validation splits need images of both classes")
        if dataset is None:
            log.warning(
                "no dataset descriptor (%s beside the data, or --dataset FILE): the model card "
                "will say the training data's source is undeclared",
                DATASET_FILE,
            )
        data_summary = {
            "data_root": str(data_root),
            "dataset": dataset.to_dict() if dataset is not None else None,
            "split": split.method,
            "split_description": split.description,
            "split_sha256": split.sha256,
            "train": class_counts(train_d.y),
            "validation": class_counts(val_d.y),
            "train_patients": len({s.patient for s in train_d.samples}),
            "validation_patients": sorted({s.patient for s in val_d.samples}),
            "skipped": [[str(p), why] for p, why in train_d.skipped + val_d.skipped],
            # What a model could learn instead of the lungs (pneumonia data audit); in the card.
            "shortcuts": shortcut_table(split.train + val_s, progress=progress),
        }
        atomic.write_text(run.data, json.dumps(data_summary, indent=1) + "\n")
        log.info(
            "train %s, validation %s, skipped %d",
            data_summary["train"],
            data_summary["validation"],
            len(data_summary["skipped"]),
        )
    results = [
        train_member(cfg, seed, train_d, val_d, run.member(seed), progress, resume, dist)
        for seed in cfg.seeds
    ]
    if not dist.is_main:
        return None
    members = [
        {"seed": r.seed, "best_epoch": r.best_epoch, "val_auc": r.val_auc, "val_loss": r.val_loss}
        for r in results
    ]
    return val_d, data_summary, members


#: Where the training run's threshold rule is applied (its ThresholdChoice).
CLEAN_VALIDATION = "the clean validation split"
POOLED_STRESSED = "the pooled stressed validation"


def calibration_record(cfg: TrainConfig, stressed: StressedScores) -> dict[str, Any]:
    """Temperature and bias, the threshold and the validation figures, by ``cfg``'s rules
    (``calibrate_on``, ``threshold_rule``, ``min_sensitivity``) on the stressed validation
    ``stressed`` (clean included): the one place they are fitted, for a training run and for
    a quantized file refitted on its own outputs (:mod:`pneumonia.training.quantize`).

    Returns:
        The record ``calibration.json`` holds, without the run's members and data summary.
    """
    y = stressed.y
    logits = stressed.logits["clean"]
    pooled_y, pooled_logits = stressed.pooled()
    if cfg.calibrate_on == "stressed":
        temperature, bias = fit_calibration(pooled_logits, pooled_y)
    else:
        temperature, bias = fit_calibration(logits, y)
    prob = calibrated_probability(logits, temperature, bias)
    pooled_prob = calibrated_probability(pooled_logits, temperature, bias)
    # The sensitivity floor on the clean validation, Youden's J on the pooled stressed one.
    pick = pick_threshold(cfg.threshold_rule, y, prob, cfg.min_sensitivity, pooled_y, pooled_prob)
    threshold = pick.threshold
    choice = ThresholdChoice(
        cfg.threshold_rule,
        cfg.min_sensitivity if RULES[cfg.threshold_rule].uses_min_sensitivity else None,
        CLEAN_VALIDATION,
        POOLED_STRESSED if cfg.threshold_rule == "stressed_youden" else None,
        pick.bound_by,
    )
    stress = stressed_report(
        y,
        {k: calibrated_probability(z, temperature, bias) for k, z in stressed.logits.items()},
        threshold,
    )
    stress["pooled"] = {
        "nll": nll(pooled_logits, pooled_y, temperature, bias),
        "ece": expected_calibration_error(pooled_y, pooled_prob),
        **threshold_metrics(pooled_y, pooled_prob, threshold),
    }
    stress["seed"] = cfg.stress_seed
    record = {
        "temperature": temperature,
        "bias": bias,
        "threshold": threshold,
        "threshold_rule": cfg.threshold_rule,
        "min_sensitivity": cfg.min_sensitivity,
        "threshold_choice": {k: v for k, v in asdict(choice).items() if v is not None},
        "calibration_fitted_on": (
            f"{POOLED_STRESSED} (the validation split as it is and under "
            f"{len(stressed.logits) - 1} fixed perturbations)"
            if cfg.calibrate_on == "stressed"
            else CLEAN_VALIDATION
        ),
        "validation": {
            "n": len(y),
            "auc": roc_auc(y, prob),
            "nll_before_calibration": nll(logits, y),
            "nll": nll(logits, y, temperature, bias),
            "brier": brier(y, prob),
            "ece": expected_calibration_error(y, prob),
            **threshold_metrics(y, prob, threshold),
        },
        "calibrate_on": cfg.calibrate_on,
        "stressed_validation": stress,
    }
    log.info("validation: %s", json.dumps(record["validation"]))
    log.info("stressed validation worst case: %s", json.dumps(stress["worst"]))
    return record


def _write_calibration(
    cfg: TrainConfig,
    out: Path,
    val_d: LoadedImages,
    stressed: StressedScores,
    members: list[dict[str, Any]],
    data_summary: dict[str, Any],
) -> dict[str, Any]:
    """Fit temperature and bias and pick the threshold on validation; write calibration.json."""
    record = {**calibration_record(cfg, stressed), "members": members, "data": data_summary}
    logits = stressed.logits["clean"]
    prob = calibrated_probability(logits, record["temperature"], record["bias"])
    atomic.write_text(RunFolder(out).calibration, json.dumps(record, indent=2) + "\n")
    rows = io.StringIO(newline="")
    w = csv.writer(rows)
    w.writerow(["path", "label", "logit", "probability"])
    for s, lab, z, p in zip(val_d.samples, val_d.y, logits, prob, strict=True):
        w.writerow([str(s.path), int(lab), f"{z:.6f}", f"{p:.6f}"])
    atomic.write_text(RunFolder(out).val_predictions, rows.getvalue())
    return record


def calibrate_run(run_dir: Path, data_root: Path | None = None, **overrides: Any) -> dict[str, Any]:
    """Redo calibration and threshold choice of a run from its checkpoints, without training.

    Takes the validation films from the run's split record (e.g. to apply another threshold
    rule, or to finish a run that stopped after its members were trained).

    Args:
        run_dir: A training run folder.
        data_root: The training data; default: the path recorded in ``split.json``.
        **overrides: TrainConfig fields to change, e.g. ``min_sensitivity=0.97``.

    Raises:
        SplitRecordError: the split record was edited, or names films not under the data.
    """
    run = RunFolder(run_dir)
    cfg = TrainConfig.load(run.config).with_overrides(**overrides)
    data_summary = run.read_data()
    split = run_split(run, cfg, data_root)
    val_d = load_images(split.val, cfg.preprocess)
    members, nets = [], []
    device = resolve_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    record_environment(run, "calibrate", torch.get_num_threads())
    for d in run.members():
        ckpt = torch.load(d / CHECKPOINT, map_location="cpu", weights_only=True)
        rows = {r["epoch"]: r for r in json.loads((d / HISTORY).read_text())}
        best = rows.get(ckpt["epoch"], {})
        members.append(
            {
                "seed": ckpt["seed"],
                "best_epoch": ckpt["epoch"],
                "val_auc": best.get("val_auc"),
                "val_loss": best.get("val_loss"),
            }
        )
        nets.append(load_member(d / CHECKPOINT).to(device))
    cfg.save(run.config)
    summary = {k: v for k, v in data_summary.items() if k != "validation_patients"}
    summary["split_sha256"] = split.sha256
    stressed = ensemble_stressed(nets, val_d, cfg.stress_seed)
    return _write_calibration(cfg, run.path, val_d, stressed, members, summary)
