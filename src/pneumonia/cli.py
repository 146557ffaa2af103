"""Every command a user runs: ``pneumonia train|export|evaluate|predict|card|serve|score|
recalibrate|adapt|data audit|data download``."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # a string annotation only: keeps onnxruntime out of --help
    from pneumonia.predictor import Predictor
    from pneumonia.training.config import TrainConfig

log = logging.getLogger("pneumonia")


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


#: Optional dependencies by the extra that installs them: a command that needs a missing one
#: stops with the pip command instead of a traceback.
EXTRAS = {
    "torch": "train",
    "onnx": "train",
    "onnxscript": "train",
    "tqdm": "progress",
    "matplotlib": "plots",
    "pyarrow": "parquet",
    "ray": "ray",
    "dicomweb_client": "pacs",
    "highdicom": "pacs",
}


def missing_extra_message(command: str, exc: ModuleNotFoundError) -> str | None:
    """The one-line error for a missing optional dependency; None when ``exc`` is another one."""
    module = (exc.name or "").split(".")[0]
    extra = EXTRAS.get(module)
    if extra is None:
        return None
    return (
        f"pneumonia {command}: error: {module} is not installed; this needs the `{extra}` extra: "
        f"pip install 'pneumonia-detection[{extra}]'"
    )


def _model_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        type=Path,
        default=None,
        help="exported .onnx model (default: $MODEL_PATH, else the shipped model)",
    )


def _ignore_headers_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--ignore-headers",
        action="store_true",
        help="do not let a DICOM header that names another body part (BodyPartExamined), a "
        "lateral view (ViewPosition) or another modality refuse the file; the image is still "
        "checked (docs/input_check.md)",
    )


def _load_predictor(path: Path | None) -> Predictor:
    from pneumonia.predictor import Predictor, default_model_path

    return Predictor(path or default_model_path())


#: ``pneumonia train`` flags that change the configuration, so a resumed run cannot take them.
_TRAIN_CONFIG_FLAGS = (
    "out",
    "config",
    "epochs",
    "seeds",
    "arch",
    "lr",
    "schedule",
    "device",
    "precision",
    "size",
    "patience",
    "batch_size",
    "max_images",
    "no_augment",
)


def _resume_args(a: argparse.Namespace) -> tuple[TrainConfig, Path, Path] | str:
    """(config, data, run folder) of ``--resume RUN_DIR``, or the error to print."""
    from pneumonia.training.config import TrainConfig

    given = [
        f"--{k.replace('_', '-')}"
        for k in _TRAIN_CONFIG_FLAGS
        if getattr(a, k) not in (None, False)
    ]
    if given:
        return f"--resume goes on as RUN_DIR/config.json says; drop {', '.join(given)}"
    from pneumonia.training.run import RunFolder

    run = a.resume
    folder = RunFolder(run)
    if not folder.config.is_file():
        return f"{run} has no {folder.config.name}: not a training run folder"
    cfg = TrainConfig.load(folder.config).with_overrides(threads=a.threads)
    data = a.data
    if data is None and folder.data.is_file():
        data = Path(folder.read_data()["data_root"])
    if data is None:
        return f"{run} stopped before it recorded its data; pass --data"
    return cfg, data, run


def cmd_train(a: argparse.Namespace) -> int:
    from dataclasses import replace

    from pneumonia.training.config import TrainConfig

    if a.nproc is not None and a.nproc < 1:
        print(f"pneumonia train: error: --nproc must be >= 1, got {a.nproc}", file=sys.stderr)
        return 2
    if a.nproc is not None and a.nproc > 1 and "WORLD_SIZE" not in os.environ:
        return _launch_processes(a.nproc, a.argv)
    if a.resume is not None:
        resolved = _resume_args(a)
        if isinstance(resolved, str):
            print(f"pneumonia train: error: {resolved}", file=sys.stderr)
            return 2
        cfg, data, out = resolved
        return _run_training(cfg, data, out, not a.no_progress, resume=True, dataset=a.dataset)
    if a.data is None or a.out is None:
        print(
            "pneumonia train: error: --data and --out are required (or --resume RUN_DIR)",
            file=sys.stderr,
        )
        return 2
    cfg = TrainConfig.load(a.config) if a.config else TrainConfig()
    cfg = cfg.with_overrides(
        epochs=a.epochs,
        seeds=tuple(a.seeds) if a.seeds else None,
        max_images=a.max_images,
        threads=a.threads,
        patience=a.patience,
        batch_size=a.batch_size,
        lr=a.lr,
        schedule=a.schedule,
        device=a.device,
        precision=a.precision,
    )
    if a.arch:
        cfg = replace(
            cfg, model=replace(cfg.model, arch=a.arch)
        )  # __post_init__ re-derives the spec's normalization
    if a.size:
        cfg = replace(cfg, preprocess=replace(cfg.preprocess, size=a.size))
    if a.no_augment:
        cfg = replace(cfg, augment=replace(cfg.augment, enabled=False))
    return _run_training(cfg, a.data, a.out, not a.no_progress, resume=False, dataset=a.dataset)


def _launch_processes(nproc: int, argv: list[str]) -> int:
    """Start this same command in ``nproc`` processes on this machine with torchrun (each sees
    WORLD_SIZE and so trains its share instead of launching again)."""
    import subprocess

    # --nproc is dropped: torchrun's own parser would take it for its --nproc-per-node.
    rest, skip = [], False
    for arg in argv:
        if skip or arg.startswith("--nproc="):
            skip = False
            continue
        if arg == "--nproc":
            skip = True
            continue
        rest.append(arg)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += [f"--nproc-per-node={nproc}", "-m", "pneumonia.cli", *rest]
    return subprocess.run(cmd, check=False).returncode


def _run_training(
    cfg: TrainConfig, data: Path, out: Path, progress: bool, resume: bool, dataset: Path | None
) -> int:
    import signal

    from pneumonia.card import CardError, find_dataset
    from pneumonia.training.train import train

    try:
        descriptor = find_dataset(data, dataset)
    except CardError as exc:
        print(f"pneumonia train: error: {exc}", file=sys.stderr)
        return 2

    def _terminate(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # a stopped run keeps its finished epochs, as on Ctrl-C

    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        record = train(cfg, data, out, progress=progress, resume=resume, dataset=descriptor)
    except KeyboardInterrupt:
        print(
            f"pneumonia train: interrupted; the finished epochs are saved in {out}, "
            f"go on with: pneumonia train --resume {out}",
            file=sys.stderr,
        )
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    summary = {
        "run_dir": str(out),
        **record["validation"],
        "threshold": record["threshold"],
        "temperature": record["temperature"],
        "bias": record["bias"],
        "skipped": len(record["data"]["skipped"]),
    }
    print(json.dumps(summary))
    return 0


def cmd_calibrate(a: argparse.Namespace) -> int:
    from pneumonia.training.train import calibrate_run

    record = calibrate_run(
        a.run_dir, a.data, threshold_rule=a.threshold_rule, min_sensitivity=a.min_sensitivity
    )
    print(
        json.dumps(
            {
                "run_dir": str(a.run_dir),
                **record["validation"],
                "threshold": record["threshold"],
                "temperature": record["temperature"],
                "bias": record["bias"],
            }
        )
    )
    return 0


def cmd_export(a: argparse.Namespace) -> int:
    from pneumonia.training.export import export_run

    card = export_run(a.run_dir, a.out, name=a.name, version=a.model_version)
    _print_model(a.out, card)
    if a.quantize:
        from pneumonia.training.quantize import quantize_run, quantized_path

        out = quantized_path(a.out)
        _print_model(out, quantize_run(a.run_dir, a.out, out, films=a.calibration_films))
    return 0


def _print_model(path: Path, card: dict[str, Any]) -> None:
    """One JSON line naming a written model file."""
    keys = ("name", "version", "sha256", "weights_sha256", "bytes", "threshold")
    print(json.dumps({"model": str(path), **{k: card[k] for k in keys}}))


def cmd_quantize(a: argparse.Namespace) -> int:
    from pneumonia.training.quantize import QuantizeError, quantize_file

    try:
        card = quantize_file(
            a.model,
            a.data,
            a.out,
            films=a.calibration_films,
            version=a.model_version,
            threads=a.threads,
            progress=not a.no_progress,
        )
    except QuantizeError as exc:
        print(f"pneumonia quantize: error: {exc}", file=sys.stderr)
        return 2
    _print_model(a.out, card)
    return 0


def cmd_evaluate(a: argparse.Namespace) -> int:
    from pneumonia.data import is_manifest, is_npz, resolve_split, score_samples, split_samples
    from pneumonia.evaluate import evaluate_predictions, markdown_summary
    from pneumonia.guard import OUTCOMES

    if a.plots:  # first: a missing `plots` extra is reported before minutes of inference
        from pneumonia.plots import plot_report, plot_training_curves
    predictor = _load_predictor(a.model)
    folder = a.data if is_manifest(a.data) else a.data / a.split
    if not (is_npz(a.data) or is_manifest(a.data)):
        folder = resolve_split(a.data, a.split)
    dataset = _evaluated_dataset(a, predictor)
    loaded = score_samples(predictor, split_samples(a.data, a.split), progress=not a.no_progress)
    probs, checks = loaded.probabilities, loaded.checks
    outcomes = [c.outcome for c in checks]
    ev = evaluate_predictions(
        loaded.y,
        probs,
        predictor.threshold,
        extra={
            "data": str(folder),
            "skipped": [[str(p), why] for p, why in loaded.skipped],
            "dataset": dataset,
            "split": a.split,
            "model": predictor.identity(),
            "input_check": {
                "feature_check": predictor.guard is not None,
                "frontal_check": predictor.frontal is not None,
                # decode statistics come with encoded files, not with .npz pixels
                "colour_checked": not is_npz(a.data),
                **{o: outcomes.count(o) for o in OUTCOMES},
            },
        },
    )
    report = ev.to_json()
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(report, indent=1) + "\n")
    if a.ledger:
        from pneumonia.ledger import record_look

        assert dataset is not None  # _evaluated_dataset refuses --ledger without one
        record_look(
            a.ledger,
            dataset=dataset,
            split=a.split,
            n=len(loaded.y),
            model=predictor.identity(),
            argv=a.argv,
        )
        log.info("recorded this look at %s/%s in %s", dataset, a.split, a.ledger)
    if a.markdown:
        a.markdown.write_text(markdown_summary(report, f"{predictor.name} on {folder.name}"))
    if a.predictions:
        import csv

        with a.predictions.open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(
                [
                    "path",
                    "label",
                    "p_pneumonia",
                    "input_check",
                    "input_score",
                    "input_refusal_score",
                ]
            )
            for s, y, p, c in zip(loaded.samples, loaded.y, probs, checks, strict=True):
                score, refusal = (
                    "" if v is None else f"{v:.4f}" for v in (c.score, c.refusal_score)
                )
                w.writerow([str(s.path), int(y), f"{p:.6f}", c.outcome, score, refusal])
    if a.plots:
        plot_report(report, a.plots, title=folder.name)
        if a.run_dir:
            plot_training_curves(a.run_dir, a.plots)
    summary = {
        k: report[k] for k in ("n", "auc", "accuracy", "sensitivity", "specificity", "threshold")
    }
    summary["skipped"] = len(loaded.skipped)
    summary["input_check"] = {o: outcomes.count(o) for o in OUTCOMES}
    print(json.dumps(summary))
    return 0


def _evaluated_dataset(a: argparse.Namespace, predictor: Predictor) -> str | None:
    """The name of the data set ``pneumonia evaluate`` scores: its descriptor (``--dataset``, or
    ``dataset.json`` beside the data), else the model's own training set when ``--data`` is the
    folder it was trained from, else None (and ``--ledger`` is refused: a look must say what it
    looked at)."""
    from pneumonia.card import find_dataset

    given = find_dataset(a.data, a.dataset)
    if given is not None:
        return given.name
    card = predictor.card
    root = ((card.training or {}).get("data") or {}).get("data_root")
    if card.dataset is not None and root and Path(root).resolve() == a.data.resolve():
        return card.dataset.name
    if a.ledger:
        raise FileNotFoundError(
            f"--ledger needs to know which data set {a.data} is: pass --dataset FILE "
            "(a dataset descriptor, e.g. datasets/kermany-2018.json)"
        )
    return None


def cmd_predict(a: argparse.Namespace) -> int:
    from pneumonia.predictor import Prediction

    predictor = _load_predictor(a.model)
    predictor.use_headers = not a.ignore_headers
    status = 0
    paths = [Path(p) for p in a.images]
    for path, out in zip(paths, predictor.predict(paths, refuse=not a.flag_only), strict=True):
        if isinstance(out, Prediction):
            print(json.dumps({"filename": str(path), **out.to_dict()}))
        else:  # unreadable, undecodable or refused: this file's error, the others still answer
            status = 1
            error = {"code": out.code, "message": out.message}
            print(json.dumps({"filename": str(path), "error": error}))
    return status


def cmd_guard_fit(a: argparse.Namespace) -> int:
    import torch

    from pneumonia.training.guard_fit import fit_run_guard
    from pneumonia.training.run import RunFolder

    if a.threads:
        torch.set_num_threads(a.threads)
    guard = fit_run_guard(a.run_dir, a.data, components=a.components, progress=not a.no_progress)
    s = guard.summary()
    print(
        json.dumps(
            {
                "guard": str(RunFolder(a.run_dir).guard),
                **{
                    k: s[k]
                    for k in (
                        "n_train",
                        "n_validation",
                        "dim",
                        "components",
                        "flag_distance",
                        "refuse_distance",
                        "refuse_rule",
                    )
                },
                "mid_flag_distance": s.get("mid_flag_distance"),
            }
        )
    )
    return 0


def cmd_card(a: argparse.Namespace) -> int:
    """Render a model file's card to Markdown, or rewrite its version or data set."""
    import hashlib

    from pneumonia import atomic
    from pneumonia.card import (
        CardError,
        Dataset,
        read_model_card,
        render_markdown,
        rewrite_card,
    )
    from pneumonia.ledger import Ledger, LedgerError

    try:
        if a.set_version or a.dataset:
            dataset = Dataset.load(a.dataset) if a.dataset else None
            sidecar = rewrite_card(
                a.model,
                a.model,
                lambda c: c.with_(version=a.set_version or c.version, dataset=dataset or c.dataset),
            )
            print(
                json.dumps({k: sidecar[k] for k in ("name", "version", "sha256", "weights_sha256")})
            )
            if not a.out:
                return 0
        if not a.out:
            print(
                "pneumonia card: error: give --out FILE.md (or --set-version / --dataset)",
                file=sys.stderr,
            )
            return 2
        card, _, raw = read_model_card(a.model)
        identity = {
            "sha256": hashlib.sha256(raw).hexdigest(),
            "file": a.model.name,
            "bytes": len(raw),
        }
        del raw
        test = json.loads(a.report.read_text()) if a.report else None
        if test is not None and a.ledger is None:
            print(
                "pneumonia card: error: --report needs --ledger (the test-look ledger says which "
                "look at the test set the report is)",
                file=sys.stderr,
            )
            return 2
        text = render_markdown(
            card,
            identity,
            test=test,
            baseline=json.loads(a.baseline.read_text()) if a.baseline else None,
            previous=(a.previous_label, json.loads(a.previous.read_text())) if a.previous else None,
            input_check=json.loads(a.input_check_report.read_text())
            if a.input_check_report
            else None,
            looks=Ledger.load(a.ledger) if a.ledger else None,
        )
    except (CardError, LedgerError, ValueError) as exc:
        print(f"pneumonia card: error: {exc}", file=sys.stderr)
        return 2
    atomic.write_text(a.out, text)
    return 0


def cmd_serve(a: argparse.Namespace) -> int:
    from pneumonia.serve.heap import fix_mmap_threshold

    fix_mmap_threshold()  # first: before the imports and the model allocate
    from pydantic import ValidationError

    from pneumonia.serve.settings import Settings, settings_error_message

    flags = {"host": a.host, "port": a.port, "model_path": a.model}
    if a.verbose:
        flags["log_level"] = "DEBUG"
    try:
        settings = Settings(**{k: v for k, v in flags.items() if v is not None})
    except ValidationError as exc:
        print(f"pneumonia serve: error: {settings_error_message(exc)}", file=sys.stderr)
        return 2
    from pneumonia.serve.settings import load_predictor

    # The model opens before the web stack (fastapi, uvicorn) is imported: onnxruntime's graph
    # optimization holds about 18 MB more while the session opens than after, and without the
    # web stack resident yet that transient no longer sets the service's peak RSS (issue 23:
    # benchmarks/bench_session.py, docs/benchmarks.md).
    predictor = load_predictor(settings)
    from pneumonia.serve.app import serve

    return serve(settings, predictor)


def cmd_score(a: argparse.Namespace) -> int:
    import signal
    import threading

    from pneumonia.predictor import default_model_path
    from pneumonia.score import ScoreError, open_input, score_archive
    from pneumonia.score.dicomweb import parse_source

    # The first Ctrl-C or SIGTERM asks the job to stop after the batch in hand (a
    # KeyboardInterrupt raised anywhere, say inside the process pool's bookkeeping, could leave
    # it hanging); a second one interrupts at once. Either way the finished rows are kept.
    stop = threading.Event()

    def _stop(signum: int, frame: object) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()

    job = {
        "engine": a.engine,
        "workers": a.workers,
        "batch_size": a.batch_size,
        "part_rows": a.part_rows,
        "address": a.address,
        "progress": not a.no_progress,
        "refuse": not a.flag_only,
        "stop": stop,
        "use_headers": not a.ignore_headers,
    }
    model = a.model or default_model_path()
    url = parse_source(a.input)
    previous = {s: signal.signal(s, _stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        if url is not None:
            return _score_pacs(a, url, model, job)
        pacs_only = [f for f in _PACS_FLAGS if getattr(a, f.lstrip("-").replace("-", "_"))]
        if pacs_only:
            raise ScoreError(f"{', '.join(pacs_only)} only apply to a dicomweb: input")
        source = open_input(
            Path(a.input),
            path_column=a.path_column,
            id_column=a.id_column,
            bytes_column=a.bytes_column,
        )
        summary = score_archive(source, a.out, model, **job)
    except ScoreError as exc:
        print(f"pneumonia score: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            f"pneumonia score: interrupted; finished rows are saved in {a.out}.parts/, "
            "rerun the same command to finish",
            file=sys.stderr,
        )
        return 130
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    _log_summary(summary)
    print(json.dumps(summary.to_dict()))
    return 0


#: Options of `pneumonia score` that only a dicomweb: input takes.
_PACS_FLAGS = (
    "--study-date",
    "--study-uid",
    "--accession",
    "--write-back",
    "--write-heatmap",
    "--watch",
    "--max-polls",
    "--duration",
)


def _log_summary(summary: Any) -> None:
    labels = ", ".join(f"{k} {v}" for k, v in summary.labels.items())
    log.info(
        "%d rows in %s (%s, %d errors); this run scored %d images at %.1f images/s",
        summary.rows,
        summary.out,
        labels,
        sum(summary.errors.values()),
        summary.scored,
        summary.images_per_second,
    )


def _score_pacs(a: argparse.Namespace, url: str, model: Path, job: dict[str, Any]) -> int:
    """`pneumonia score dicomweb:URL`: one job, or polls with --watch (a JSON line each)."""
    from pneumonia.score.dicomweb import DicomWebSettings, Query, require_pacs
    from pneumonia.score.pacs import score_pacs, watch_pacs

    require_pacs()
    if not a.verbose:  # it logs every request at INFO
        logging.getLogger("dicomweb_client").setLevel(logging.WARNING)
    settings = DicomWebSettings.from_env(url, timeout=a.timeout)
    query = Query(a.study_date, a.study_uid, a.accession)
    job = {**job, "write_back": a.write_back, "heatmaps": a.write_heatmap}
    if a.watch:
        polls = watch_pacs(
            settings,
            query,
            a.out,
            model,
            interval=a.poll_interval,
            max_polls=a.max_polls,
            duration=a.duration,
            **job,
        )
    else:
        if a.max_polls is not None or a.duration is not None:
            from pneumonia.score import ScoreError

            raise ScoreError("--max-polls and --duration bound --watch; add --watch")
        polls = iter([score_pacs(settings, query, a.out, model, **job)])
    for summary in polls:
        _log_summary(summary.job)
        print(json.dumps(summary.to_dict()), flush=True)
    return 0


def cmd_audit(a: argparse.Namespace) -> int:
    from pneumonia.audit import (
        NEAR_DUPLICATE_CORRELATION,
        NEAR_DUPLICATE_DISTANCE,
        audit,
        render_html,
        render_markdown,
    )
    from pneumonia.data import DEFAULT_SPLIT_SEED, DEFAULT_VAL_FRACTION

    report = audit(
        a.data,
        max_distance=NEAR_DUPLICATE_DISTANCE if a.near_distance is None else a.near_distance,
        min_correlation=NEAR_DUPLICATE_CORRELATION
        if a.near_correlation is None
        else a.near_correlation,
        val_fraction=DEFAULT_VAL_FRACTION if a.val_fraction is None else a.val_fraction,
        split_seed=DEFAULT_SPLIT_SEED if a.split_seed is None else a.split_seed,
        workers=a.workers,
        progress=not a.no_progress,
    )
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(report, indent=1) + "\n")
    if a.html:
        a.html.parent.mkdir(parents=True, exist_ok=True)
        a.html.write_text(render_html(report))
    if a.markdown:
        a.markdown.parent.mkdir(parents=True, exist_ok=True)
        a.markdown.write_text(render_markdown(report))
    for w in report["warnings"]:
        log.warning("%s", w)
    ts = report["patients"]["trainer_split"] or {}
    print(
        json.dumps(
            {
                "data": report["data"],
                "images": {k: v["total"] for k, v in report["counts"]["images"].items()},
                "unreadable": len(report["counts"]["unreadable"]),
                "exact_duplicate_groups": report["duplicates"]["exact"]["groups"],
                "near_duplicate_pairs": report["duplicates"]["near"]["pairs"],
                "trainer_split_shared_patients": ts.get("shared_patients"),
                "shortcut_warnings": [
                    f"{r['split']}:{r['statistic']} {r['auc']}"
                    for r in report["shortcuts"]
                    if r["warning"]
                ]
                + [
                    f"manifest:{m['column']} {m['auc']}"
                    for m in report["metadata_shortcuts"]
                    if m["warning"]
                ],
                "seconds": report["seconds"],
            }
        )
    )
    return 0


def cmd_download(a: argparse.Namespace) -> int:
    from pneumonia.download import DownloadError, download, verify

    if a.verify and a.to:
        print(
            "pneumonia data download: error: give --verify DIR or --to DIR, not both",
            file=sys.stderr,
        )
        return 2
    try:
        root = a.verify if a.verify else download(a.to, force=a.force)
    except DownloadError as exc:
        print(f"pneumonia data download: error: {exc}", file=sys.stderr)
        return 2
    check = verify(root)
    for line in check.differences:
        log.warning("differs from the published set: %s", line)
    if check.matches:
        log.info("layout and counts match the published set; pass --data %s", check.root)
    else:
        log.warning(
            "%s has the train/test layout and can be passed as --data, but its counts differ "
            "from the published set in %d place(s) (listed above)",
            check.root,
            len(check.differences),
        )
    print(json.dumps(check.to_dict()))
    return 0 if check.matches else 1


def cmd_adapt(a: argparse.Namespace) -> int:
    from pneumonia.adapt import AdaptError, adapt_model

    try:
        report = adapt_model(
            a.model,
            a.data,
            a.out,
            min_sensitivity=a.min_sensitivity,
            force=a.force,
            n_boot=a.bootstrap,
            progress=not a.no_progress,
        )
    except AdaptError as exc:
        print(f"pneumonia adapt: error: {exc}", file=sys.stderr)
        return 2
    if a.report:
        from pneumonia import atomic

        a.report.parent.mkdir(parents=True, exist_ok=True)
        atomic.write_text(a.report, json.dumps(report, indent=1) + "\n")
    for w in report["warnings"]:
        log.warning("%s", w)
    cv = report["cross_validated"]
    print(
        json.dumps(
            {
                "out": report["out"],
                "head": report["head"]["chosen"],
                "cross_validated": {
                    k: cv[k] for k in ("auc", "auc_ci95", "sensitivity", "specificity", "ece")
                },
                "base_auc_on_site": report["base_on_site"]["auc"],
                "threshold": report["fitted"]["threshold"],
                "seconds": round(report["seconds"], 1),
            }
        )
    )
    return 0


def cmd_recalibrate(a: argparse.Namespace) -> int:
    from pneumonia.recalibrate import recalibrate_model

    try:
        report = recalibrate_model(
            a.model,
            a.data,
            a.out,
            split=a.split,
            rule=a.threshold_rule,
            min_sensitivity=a.min_sensitivity,
            folds=a.folds,
            n_boot=a.bootstrap,
            progress=not a.no_progress,
        )
    except ValueError as exc:
        print(f"pneumonia recalibrate: error: {exc}", file=sys.stderr)
        return 2
    if a.report:
        a.report.parent.mkdir(parents=True, exist_ok=True)
        a.report.write_text(json.dumps(report, indent=1) + "\n")
    for w in report["warnings"]:
        log.warning("%s", w)
    log.info("%s", report["ranking"])
    keys = ("sensitivity", "specificity", "ece")
    print(
        json.dumps(
            {
                "out": report["out"],
                "site": report["site"]["counts"],
                "fitted": report["fitted"],
                "original": report["original"],
                "auc": report["auc"],
                "before": {k: report["before"][k] for k in keys},
                "after_cross_fitted": {k: report["after"][k] for k in keys},
                "warnings": len(report["warnings"]),
                "ranking": report["ranking"],
            }
        )
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    from pneumonia.card import RULES

    p = argparse.ArgumentParser(prog="pneumonia", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser(
        "train",
        help="train on ROOT/train (Kaggle layout), DIR/{NORMAL,PNEUMONIA} or a MedMNIST .npz",
    )
    t.add_argument(
        "--data",
        type=Path,
        help=(
            "Kaggle root, split folder, CSV manifest (its train rows), or MedMNIST .npz (its "
            "val split is the validation split); required unless --resume"
        ),
    )
    t.add_argument("--out", type=Path, help="run folder to write; required unless --resume")
    t.add_argument(
        "--resume",
        type=Path,
        metavar="RUN_DIR",
        help=(
            "go on with a stopped run from its last finished epoch, as "
            "configured in RUN_DIR/config.json (--data: default the run's)"
        ),
    )
    t.add_argument("--config", type=Path, help="a config.json from an earlier run")
    t.add_argument(
        "--dataset",
        type=Path,
        help="dataset descriptor JSON (name, source, licence, population) for the model card; "
        "default: DATA/dataset.json if present, else the card says the source is undeclared",
    )
    t.add_argument("--epochs", type=int)
    t.add_argument("--seeds", type=int, nargs="+", help="one ensemble member per seed")
    t.add_argument("--arch", choices=["effnet_lite0", "cnn", "logreg"])
    t.add_argument("--lr", type=float, help="peak learning rate")
    t.add_argument("--schedule", choices=["onecycle", "cosine"])
    t.add_argument(
        "--device", choices=["auto", "cpu", "cuda"], help="auto: CUDA when present, else the CPU"
    )
    t.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16"],
        help="training arithmetic; auto: bfloat16 autocast and channels-last on CUDA, float32 on the CPU",
    )
    t.add_argument("--size", type=int, help="input size in pixels")
    t.add_argument("--patience", type=int)
    t.add_argument("--batch-size", type=int)
    t.add_argument("--max-images", type=int, help="subsample the training folder (smoke tests)")
    t.add_argument("--threads", type=int)
    t.add_argument(
        "--nproc",
        type=int,
        help="data-parallel processes on this machine (torchrun; one per GPU with --device "
        "cuda); --batch-size stays the global batch (docs/training.md)",
    )
    t.add_argument("--no-augment", action="store_true")
    t.add_argument("--no-progress", action="store_true")
    t.set_defaults(func=cmd_train)

    k = sub.add_parser(
        "calibrate", help="redo calibration and threshold choice of a run from its checkpoints"
    )
    k.add_argument("run_dir", type=Path)
    k.add_argument(
        "--data", type=Path, help="training data root (default: the one recorded in the run)"
    )
    k.add_argument("--threshold-rule", choices=sorted(RULES))
    k.add_argument("--min-sensitivity", type=float)
    k.set_defaults(func=cmd_calibrate)

    e = sub.add_parser("export", help="export a run folder to ONNX with its model card")
    e.add_argument("run_dir", type=Path)
    e.add_argument("--out", type=Path, required=True)
    e.add_argument("--name", help="model name in the card (default pneumonia-<arch>)")
    e.add_argument(
        "--version",
        dest="model_version",
        default=None,
        help="the model's own version in the card (default 0.1.0; releases set theirs, docs/model.md)",
    )
    e.add_argument(
        "--quantize",
        choices=["int8"],
        help="also write a static int8 (QDQ, per-channel) copy beside OUT (model.int8.onnx), "
        "calibrated on training films of the run's split, its calibration, threshold and input "
        "check refitted on its own outputs (docs/model.md)",
    )
    e.add_argument(
        "--calibration-films",
        type=int,
        help="training films that set the int8 ranges (default: the documented number, "
        "pneumonia.training.quantize.CALIBRATION_FILMS)",
    )
    e.set_defaults(func=cmd_export)

    qz = sub.add_parser(
        "quantize",
        help="static int8 copy of an exported model, refitted on its own outputs",
        description="Quantize MODEL to int8 (static, QDQ, per-channel) and write OUT with its "
        "card. The split MODEL was trained on is drawn again from its card's training config "
        "(refused unless its counts are the card's); the int8 ranges come from training films "
        "only, and calibration, threshold and input check are refitted on OUT's own outputs by "
        "the rules the card records. Needs the `train` extra. See docs/model.md.",
    )
    qz.add_argument("model", type=Path, help="the exported fp32 .onnx model (only read)")
    qz.add_argument(
        "--data", type=Path, required=True, help="the training data root MODEL was trained on"
    )
    qz.add_argument("--out", type=Path, required=True, help="the int8 model to write (.onnx)")
    qz.add_argument(
        "--calibration-films",
        type=int,
        help="training films that set the int8 ranges (default: the documented number, "
        "pneumonia.training.quantize.CALIBRATION_FILMS)",
    )
    qz.add_argument(
        "--version",
        dest="model_version",
        help="the int8 model's version (default: the base's with +int8, e.g. 2.0.0+int8)",
    )
    qz.add_argument("--threads", type=int, help="onnxruntime threads (default: all CPUs)")
    qz.add_argument("--no-progress", action="store_true")
    qz.set_defaults(func=cmd_quantize)

    v = sub.add_parser(
        "evaluate",
        help="evaluate an exported model on DIR/{NORMAL,PNEUMONIA}, a CSV manifest or a MedMNIST .npz",
    )
    v.add_argument(
        "--data",
        type=Path,
        required=True,
        help="Kaggle root, split folder, CSV manifest (docs/data.md), or MedMNIST .npz",
    )
    v.add_argument(
        "--split",
        choices=["test", "val", "train"],
        default="test",
        help="split of a Kaggle root or .npz (default: test)",
    )
    v.add_argument("--json", type=Path, required=True)
    _model_arg(v)
    v.add_argument(
        "--plots", type=Path, help="folder for ROC, PR, confusion, reliability, sweep plots"
    )
    v.add_argument(
        "--run-dir", type=Path, help="training run folder: also plot its training curves"
    )
    v.add_argument("--markdown", type=Path, help="also write a Markdown summary")
    v.add_argument("--predictions", type=Path, help="also write per-image predictions (CSV)")
    v.add_argument(
        "--dataset",
        type=Path,
        help="dataset descriptor of DATA (default: DATA/dataset.json, else the model's own "
        "training set when DATA is its training folder)",
    )
    v.add_argument(
        "--ledger",
        type=Path,
        help="test-look ledger to record this scoring in (the project's: artifacts/test_looks.json)",
    )
    v.add_argument("--no-progress", action="store_true")
    v.set_defaults(func=cmd_evaluate)

    r = sub.add_parser("predict", help="one JSON line per image")
    r.add_argument("images", nargs="+", type=Path)
    _model_arg(r)
    r.add_argument(
        "--flag-only",
        action="store_true",
        help="answer images the input check finds are not (frontal) chest X-rays (flagged) "
        "instead of refusing them",
    )
    _ignore_headers_arg(r)
    r.set_defaults(func=cmd_predict)

    g = sub.add_parser("guard", help="the input check that refuses what is not a chest X-ray")
    gsub = g.add_subparsers(dest="guard_command", required=True)
    gf = gsub.add_parser(
        "fit",
        help="fit it on a run's training-split films (thresholds on its validation split) into RUN_DIR/guard.json",
        description="Fit the input check of a training run: statistics of the network's features on the "
        "run's training-split films, thresholds from its validation-split films. Writes RUN_DIR/guard.json, "
        "which `pneumonia export` puts into the model.",
    )
    gf.add_argument("run_dir", type=Path)
    gf.add_argument(
        "--data", type=Path, help="training data root (default: the one recorded in the run)"
    )
    gf.add_argument(
        "--components", type=int, default=64, help="principal directions kept (default 64)"
    )
    gf.add_argument("--threads", type=int, help="torch threads (default: all cores)")
    gf.add_argument("--no-progress", action="store_true")
    gf.set_defaults(func=cmd_guard_fit)

    c = sub.add_parser(
        "card",
        help="render a model file's card as Markdown (with held-out reports), or set its version or data set",
        description="Render the model card inside MODEL as Markdown (--out), with test reports that "
        "the test-look ledger places; or rewrite the card in the file (--set-version, --dataset): "
        "the weights and their digest stay as they are. Needs only the serving install.",
    )
    _model_arg(c)
    c.add_argument("--report", type=Path, help="evaluation JSON of the model on the test set")
    c.add_argument("--baseline", type=Path, help="evaluation JSON of the baseline on the same set")
    c.add_argument(
        "--previous",
        type=Path,
        help="evaluation JSON of the model this one replaces, on the same set",
    )
    c.add_argument(
        "--previous-label", default="previous model", help="its row label in the comparison table"
    )
    c.add_argument(
        "--input-check-report",
        type=Path,
        help="benchmarks/bench_guard.py's JSON for this model: adds the input check's measured rates",
    )
    c.add_argument(
        "--ledger",
        type=Path,
        help="the test-look ledger (artifacts/test_looks.json): required with --report",
    )
    c.add_argument("--set-version", help="rewrite the card's model version in the file")
    c.add_argument(
        "--dataset", type=Path, help="rewrite the card's training data set from a descriptor JSON"
    )
    c.add_argument("--out", type=Path, help="the Markdown file to write")
    c.set_defaults(func=cmd_card)

    s = sub.add_parser(
        "serve",
        help="run the HTTP service (POST /predict, web page at /)",
        description="Run the HTTP service. Settings come from the environment (MODEL_PATH, HOST, "
        "PORT, API_KEY, MAX_UPLOAD_MB, ...; see docs/api.md); these flags override them.",
    )
    s.add_argument("--host", help="interface to listen on (default: $HOST, else 0.0.0.0)")
    s.add_argument("--port", type=int, help="TCP port (default: $PORT, else 8000)")
    _model_arg(s)
    s.set_defaults(func=cmd_serve)

    sc = sub.add_parser(
        "score",
        help="score a folder tree, a manifest, a Parquet of image bytes or a MedMNIST .npz into Parquet/CSV",
        description="Score every image of INPUT into OUT, one row per image (errors included). "
        "Interrupted runs resume: rerun the same command.",
    )
    sc.add_argument(
        "input",
        help="folder (searched recursively), .csv/.parquet manifest of paths, "
        ".parquet of image bytes, a MedMNIST .npz (every split; ids SPLIT/NNNNN), or "
        "dicomweb:URL, a PACS's DICOMweb service (docs/pacs.md)",
    )
    sc.add_argument("--out", type=Path, required=True, help="results file, .parquet or .csv")
    _model_arg(sc)
    sc.add_argument("--engine", choices=["local", "ray"], default="local", help="default: local")
    sc.add_argument("--address", help="Ray cluster for --engine ray (default: start Ray here)")
    sc.add_argument("--workers", type=int, help="processes or Ray actors (default: CPUs)")
    # 8, not 32: on the shipped model a batch of 32 held ~160 MB more activations per worker
    # for ~3% more images/s (1,872 films, one worker: 237 MB at 8, 394 MB at 32).
    sc.add_argument("--batch-size", type=int, default=8, help="images per inference batch")
    sc.add_argument(
        "--path-column",
        default=None,
        help="manifest column of image paths (default: path, else relpath)",
    )
    sc.add_argument("--id-column", default="id", help="Parquet-of-bytes column of image ids")
    sc.add_argument("--bytes-column", help="Parquet-of-bytes image column (default: binary column)")
    sc.add_argument("--part-rows", type=int, default=1000, help="rows per part saved while scoring")
    sc.add_argument(
        "--flag-only",
        action="store_true",
        help="score images the input check finds are not (frontal) chest X-rays (input_check "
        "column not_a_chest_xray or not_a_frontal_chest_xray) instead of making them error rows; "
        "resume with the same setting",
    )
    _ignore_headers_arg(sc)
    sc.add_argument("--no-progress", action="store_true")
    pacs = sc.add_argument_group(
        "dicomweb: input (docs/pacs.md; credentials from DICOMWEB_USER/DICOMWEB_PASSWORD or "
        "DICOMWEB_TOKEN, a private CA from DICOMWEB_CA_BUNDLE)"
    )
    pacs.add_argument("--study-date", help="YYYYMMDD or a range: YYYYMMDD-YYYYMMDD, YYYYMMDD-")
    pacs.add_argument("--study-uid", help="only this StudyInstanceUID")
    pacs.add_argument("--accession", help="only this AccessionNumber")
    pacs.add_argument(
        "--write-back",
        action="store_true",
        help="store a DICOM Structured Report per scored film in its study (STOW-RS)",
    )
    pacs.add_argument(
        "--write-heatmap",
        action="store_true",
        help="with --write-back: also store each film's heatmap as a Secondary Capture",
    )
    pacs.add_argument(
        "--watch", action="store_true", help="poll for new studies (bounded by the next two)"
    )
    pacs.add_argument("--max-polls", type=int, help="with --watch: stop after this many polls")
    pacs.add_argument("--duration", type=float, help="with --watch: stop after this many seconds")
    pacs.add_argument(
        "--poll-interval", type=float, default=60.0, help="with --watch: seconds between polls"
    )
    pacs.add_argument(
        "--timeout", type=float, default=30.0, help="seconds to connect and per read (default 30)"
    )
    sc.set_defaults(func=cmd_score)
    rc = sub.add_parser(
        "recalibrate",
        help="refit calibration and threshold on a site's labelled films (no retraining)",
        description="Refit temperature, bias and threshold of MODEL on the labelled films of "
        "SITE_DIR (DIR/{NORMAL,PNEUMONIA}, a Kaggle root's --split, or an .npz) and write "
        "SITE_MODEL.onnx with its card. Figures before and after are cross-fitted with "
        "patient bootstrap intervals. Ranking (ROC-AUC) is unchanged by design.",
    )
    rc.add_argument("--model", type=Path, required=True, help="exported .onnx model to recalibrate")
    rc.add_argument("--data", type=Path, required=True, help="the site's labelled films")
    rc.add_argument("--out", type=Path, required=True, help="the site model to write (.onnx)")
    rc.add_argument(
        "--split",
        choices=["train", "val", "test"],
        default="train",
        help="split of a Kaggle root or .npz (default: train; a plain DIR/{NORMAL,PNEUMONIA} is used whole)",
    )
    rc.add_argument(
        "--threshold-rule",
        choices=sorted(RULES),
        help="default: the model's rule",
    )
    rc.add_argument("--min-sensitivity", type=float, help="default: the model's")
    rc.add_argument(
        "--folds", type=int, default=5, help="cross-fitting folds, grouped by patient (default 5)"
    )
    rc.add_argument(
        "--bootstrap",
        type=int,
        default=1000,
        help="bootstrap resamples for the intervals (default 1000)",
    )
    rc.add_argument("--report", type=Path, help="also write the full report as JSON")
    rc.add_argument("--no-progress", action="store_true")
    rc.set_defaults(func=cmd_recalibrate)
    ad = sub.add_parser(
        "adapt",
        help="fit a new head, operating point and input check to a site's labelled films",
        description="Fit a new head on MODEL's features to the labelled films of SITE "
        "(DIR/{NORMAL,PNEUMONIA}), chosen by patient-grouped cross-validation, and write one "
        "complete model for the site (served as it is: MODEL_PATH=SITE.onnx pneumonia serve) with "
        "its card: cross-validated figures with patient-bootstrap intervals, a learning curve, "
        "the input check refitted on the site. Needs the `adapt` extra (onnx); no torch. "
        "See docs/site.md.",
    )
    ad.add_argument("--model", type=Path, required=True, help="the base .onnx model (only read)")
    ad.add_argument("--data", type=Path, required=True, help="the site's labelled films")
    ad.add_argument("--out", type=Path, required=True, help="the site model to write (.onnx)")
    ad.add_argument(
        "--min-sensitivity",
        type=float,
        help="operating point: the highest threshold whose cross-fitted site sensitivity is at "
        "least this (default: Youden's J on the cross-fitted site scores)",
    )
    ad.add_argument("--force", action="store_true", help="replace --out if it exists")
    ad.add_argument(
        "--bootstrap", type=int, default=1000, help="bootstrap resamples (default 1000)"
    )
    ad.add_argument("--report", type=Path, help="also write the full report as JSON")
    ad.add_argument("--no-progress", action="store_true")
    ad.set_defaults(func=cmd_adapt)

    d = sub.add_parser("data", help="know your data: audit a data set, download the Kaggle set")
    dsub = d.add_subparsers(dest="data_command", required=True)
    au = dsub.add_parser(
        "audit",
        help="counts, patients, duplicates, image formats and shortcuts of a labelled data set",
        description="Audit DATA: a Kaggle root (train|val|test/{NORMAL,PNEUMONIA}), one labelled "
        "folder (with an optional manifest.csv), a CSV manifest (path or relpath, label as 0/1 or "
        "NORMAL/PNEUMONIA, optional patient_id, site, split and metadata columns) or a MedMNIST "
        ".npz. "
        "Prints a summary; --json and --html write the full report (docs/data.md).",
    )
    au.add_argument("data", type=Path)
    au.add_argument("--json", type=Path, help="write the full report as JSON")
    au.add_argument("--html", type=Path, help="write the report as a self-contained HTML page")
    au.add_argument(
        "--markdown", type=Path, help="write the warnings and shortcut tables as Markdown"
    )
    au.add_argument(
        "--near-distance",
        type=int,
        default=None,
        help="near-duplicate candidates: pHash or dHash Hamming distance at most this, 0-7 (default 7)",
    )
    au.add_argument(
        "--near-correlation",
        type=float,
        default=None,
        help="near duplicates: thumbnail correlation at least this (default 0.98)",
    )
    au.add_argument(
        "--val-fraction",
        type=float,
        default=None,
        help="the trainer's split to check (default: TrainConfig's)",
    )
    au.add_argument(
        "--split-seed",
        type=int,
        default=None,
        help="the trainer's split seed (default: TrainConfig's)",
    )
    au.add_argument("--workers", type=int, default=2, help="threads reading images (default 2)")
    au.add_argument("--no-progress", action="store_true")
    au.set_defaults(func=cmd_audit)
    dl = dsub.add_parser(
        "download",
        help="fetch the Kaggle chest X-ray set (kagglehub) or --verify a copy; prints the --data path",
        description="Download the Kaggle chest X-ray set with kagglehub (pip install "
        "'pneumonia-detection[download]'), find its chest_xray root, and check its layout and "
        "counts against the published ones. Exit 0: matches; 1: usable layout but the counts "
        "differ (each difference is printed); 2: no usable layout or the download failed.",
    )
    dl.add_argument(
        "--to",
        type=Path,
        help="folder to download into (kagglehub's cache; default ~/.cache/kagglehub)",
    )
    dl.add_argument(
        "--verify", type=Path, metavar="DIR", help="only check a copy obtained elsewhere"
    )
    dl.add_argument("--force", action="store_true", help="download again even if cached")
    dl.set_defaults(func=cmd_download)
    return p


#: Commands on the serving path, whose numpy work is small matrix products (the input check).
SERVING_COMMANDS = ("serve", "predict", "score")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    a.argv = list(sys.argv[1:] if argv is None else argv)  # what a record says was run
    if a.command in SERVING_COMMANDS and "numpy" not in sys.modules:
        # numpy's OpenBLAS would start a spinning thread per core for the input check's small
        # matrix products, taking CPU from onnxruntime (measured: 125 ms of server CPU per
        # request on 2 cores against 31 ms): one BLAS thread, unless the operator says otherwise.
        # Only before numpy is first imported; worker processes inherit it.
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    _setup_logging(a.verbose)
    if a.command == "card" and a.model is None:
        from pneumonia.predictor import default_model_path

        a.model = default_model_path()
    from pneumonia.data import DatasetLayoutError
    from pneumonia.predictor import ModelLoadError

    try:
        return int(a.func(a))
    except (DatasetLayoutError, ModelLoadError, FileNotFoundError) as exc:
        print(f"pneumonia {a.command}: error: {exc}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:
        message = missing_extra_message(a.command, exc)
        if message is None:
            raise
        print(message, file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
