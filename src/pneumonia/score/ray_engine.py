"""The Ray engine: the same job on Ray Data, on this machine or on an existing cluster.

Ray's readers load the files (``read_binary_files``) or the Parquet bytes (``read_parquet``);
an actor pool holds one Predictor per actor and scores batches; the driver collects the rows
in order and writes them through the same output module as the local engine, so resuming
works identically. Files that Ray cannot hand over (missing, unreadable, not a regular file)
are scored on the driver, which turns them into the same error rows as the local engine.

On a cluster, the model file, the input paths and this package must be available on every
node (a shared filesystem and the same environment).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Generator, Sequence
from pathlib import Path
from typing import Any

from pneumonia.predictor import Predictor
from pneumonia.score.inputs import FolderSource, ManifestSource, NpzSource, ParquetBytesSource
from pneumonia.score.local import batched
from pneumonia.score.output import ParquetFormat
from pneumonia.score.rows import Item, ScoreError, ScoreRow, score_items

log = logging.getLogger(__name__)

RAY_HINT = "install it with: pip install 'pneumonia-detection[ray]'"


def _import_ray() -> Any:
    try:
        import ray
        import ray.data
    except ImportError:
        raise ScoreError(f"--engine ray needs Ray, which is not installed; {RAY_HINT}") from None
    return ray


def _rows_to_table(rows: Sequence[ScoreRow]) -> Any:
    fmt = ParquetFormat()
    schema = fmt.schema("key")
    cols = list(zip(*rows, strict=True)) if rows else [() for _ in schema.names]
    return fmt.pa.Table.from_arrays(
        [fmt.pa.array(c, t) for c, t in zip(cols, schema.types, strict=True)], schema=schema
    )


def _table_to_rows(table: Any) -> list[ScoreRow]:
    return [ScoreRow(*r) for r in zip(*(c.to_pylist() for c in table.columns), strict=True)]


class RayScorer:
    """Ray Data callable class: one Predictor per actor, one Arrow batch in, rows out."""

    def __init__(
        self,
        model_path: str,
        key_column: str,
        bytes_column: str,
        skip: frozenset[str],
        refuse: bool = True,
        use_headers: bool = True,
    ) -> None:
        self.predictor = Predictor(model_path, threads=1, refuse=refuse, use_headers=use_headers)
        self.key_column = key_column
        self.bytes_column = bytes_column
        self.skip = skip

    def __call__(self, batch: Any) -> Any:
        keys = [str(k) for k in batch.column(self.key_column).to_pylist()]
        blobs = batch.column(self.bytes_column).to_pylist()
        items = [
            Item(k, None, b or b"") for k, b in zip(keys, blobs, strict=True) if k not in self.skip
        ]
        return _rows_to_table(score_items(self.predictor, items))


def iter_ray(
    source: FolderSource | ManifestSource | ParquetBytesSource | NpzSource,
    model_path: Path,
    predictor: Predictor,
    skip: frozenset[str],
    *,
    workers: int | None,
    batch_size: int,
    address: str | None,
) -> Generator[list[ScoreRow], None, None]:
    """Score ``source`` on Ray Data, yielding rows as the driver receives them.

    Args:
        source: What to score.
        model_path: The model every actor loads.
        predictor: The driver's model, for files Ray cannot read; actors load theirs with
            its ``refuse`` and ``use_headers`` settings.
        skip: Keys already in the output.
        workers: Predictor actors (one CPU each); default: the CPUs of this machine, or
            those of the cluster less one.
        batch_size: Images per inference batch.
        address: A running cluster (``ray.init(address=...)``); None starts a local instance.

    Raises:
        ScoreError: Ray is not installed, or the cluster has too few CPUs for ``workers``.
    """
    ray = _import_ray()
    started = not ray.is_initialized()
    if started:
        from pneumonia.predictor import available_cpus

        # Ray's readers (file listing, reading) need a whole logical CPU beside the actors;
        # a local instance gets one extra logical CPU for them, as reading is mostly waiting.
        ray.init(
            address=address,
            num_cpus=None if address else (workers or available_cpus()) + 1,
            include_dashboard=False,
            logging_level=logging.WARNING,
        )
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True  # same row order as the local engine
        ctx.enable_progress_bars = False  # the CLI draws its own
        cpus = int(ray.cluster_resources().get("CPU", 0))
        size = workers or max(1, cpus - 1)
        if size >= cpus:
            raise ScoreError(
                f"the Ray cluster has {cpus} CPUs; {size} predictor actors would leave none for "
                f"Ray's readers and the job would wait forever; use --workers {max(1, cpus - 1)} "
                "or fewer on a cluster of at least 2 CPUs"
            )
        map_kw = {
            "batch_size": batch_size,
            "batch_format": "pyarrow",
            "compute": ray.data.ActorPoolStrategy(size=size),
            "num_cpus": 1,
        }
        if isinstance(source, ParquetBytesSource):
            ds = ray.data.read_parquet(
                str(source.path),
                columns=[source.id_column, source.bytes_column],
            )
            ds = ds.map_batches(
                RayScorer,
                fn_constructor_args=(
                    str(model_path),
                    source.id_column,
                    source.bytes_column,
                    skip,
                    predictor.refuse,
                    predictor.use_headers,
                ),
                **map_kw,
            )
            for table in ds.iter_batches(batch_format="pyarrow", batch_size=None):
                yield _table_to_rows(table)
            return
        keys: dict[str, str] = {}  # path read by Ray -> key
        on_driver: list[Item] = []
        for item in source.items(skip):
            path = os.path.normpath(item.path or "")
            if path not in keys and os.path.isfile(path) and os.access(path, os.R_OK):
                keys[path] = item.key
            else:
                on_driver.append(item)
        if keys:
            ds = ray.data.read_binary_files(
                list(keys), include_paths=True, ignore_missing_paths=True
            )
            ds = ds.map_batches(
                RayScorer,
                fn_constructor_args=(
                    str(model_path),
                    "path",
                    "bytes",
                    frozenset(),
                    predictor.refuse,
                    predictor.use_headers,
                ),
                **map_kw,
            )
            for table in ds.iter_batches(batch_format="pyarrow", batch_size=None):
                rows = [r._replace(key=keys.pop(r.key)) for r in _table_to_rows(table)]
                yield rows
            # Whatever Ray did not return vanished or became unreadable meanwhile.
            on_driver.extend(Item(k, p) for p, k in keys.items())
        for batch in batched(on_driver, batch_size):
            yield score_items(predictor, batch)
    finally:
        if started:
            ray.shutdown()
