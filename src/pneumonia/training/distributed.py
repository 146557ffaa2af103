"""The process group of a data-parallel training run: the one owner of ranks and collectives.

``torchrun`` (or ``pneumonia train --nproc N``, which starts it) sets ``WORLD_SIZE``, ``RANK``
and ``LOCAL_RANK`` in every process; :func:`from_env` reads them, :func:`setup` joins the group
(NCCL on CUDA, gloo on the CPU). Without them a run is one process and every function here does
nothing, so one training loop serves one process, several on one machine and several machines.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist

from pneumonia.data import LoadedImages, Sample, load_images
from pneumonia.preprocess import PreprocessSpec

T = TypeVar("T")

#: How long a process waits for the others at a collective: long enough for rank 0 to decode
#: the training set and to validate, short enough that a hung run ends.
TIMEOUT = timedelta(hours=2)


class RanksDisagreeError(ValueError):
    """The processes of one run were given other configurations or other data."""


@dataclass(frozen=True)
class Dist:
    """This process's place in the run: ``rank`` of ``world``, ``local_rank`` on its machine."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        """More than one process (collectives run)."""
        return self.world > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that writes the run folder and validates."""
        return self.rank == 0


SINGLE = Dist()


def from_env(env: dict[str, str] | None = None) -> Dist:
    """The ranks torchrun set in the environment; one process when it set none.

    Raises:
        ValueError: the variables are inconsistent (say RANK not below WORLD_SIZE).
    """
    env = dict(os.environ) if env is None else env
    if "WORLD_SIZE" not in env:
        return SINGLE
    try:
        d = Dist(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", "0")))
    except (KeyError, ValueError) as exc:
        raise ValueError(
            f"WORLD_SIZE is set but RANK/LOCAL_RANK are not integers ({exc}); start several "
            "processes with torchrun or pneumonia train --nproc N"
        ) from exc
    if d.world < 1 or not 0 <= d.rank < d.world or d.local_rank < 0:
        raise ValueError(f"RANK {d.rank} / WORLD_SIZE {d.world} / LOCAL_RANK {d.local_rank}")
    return d


def process_device(d: Dist, device: torch.device) -> torch.device:
    """The device this process trains on: its own GPU (``cuda:LOCAL_RANK``) under several."""
    if d.active and device.type == "cuda":
        return torch.device("cuda", d.local_rank)
    return device


def setup(d: Dist, device: torch.device) -> bool:
    """Join the process group (NCCL for CUDA, gloo for the CPU); True if this call joined it."""
    if not d.active or dist.is_initialized():
        return False
    if device.type == "cuda":
        torch.cuda.set_device(d.local_rank)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=TIMEOUT)
    return True


def teardown() -> None:
    """Leave the group once every process is done (a process that leaves early can abort a
    peer still talking to it)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def gather(d: Dist, obj: T) -> list[T]:
    """Every rank's ``obj``, in rank order (``[obj]`` for one process)."""
    if not d.active:
        return [obj]
    out: list[Any] = [None] * d.world
    dist.all_gather_object(out, obj)
    return out


def broadcast(d: Dist, obj: T) -> T:
    """Rank 0's ``obj`` on every rank."""
    if not d.active:
        return obj
    box: list[Any] = [obj if d.is_main else None]
    dist.broadcast_object_list(box, src=0)
    result: T = box[0]
    return result


def mean(d: Dist, value: float) -> float:
    """The mean of ``value`` over the ranks."""
    if not d.active:
        return value
    return float(np.mean(gather(d, value)))


def barrier(d: Dist) -> None:
    if d.active:
        dist.barrier()


def check_agree(d: Dist, what: str, value: str) -> None:
    """Refuse to go on when the ranks hold other ``value``s (a digest of ``what``).

    Raises:
        RanksDisagreeError: on every rank, naming each rank's value.
    """
    values = gather(d, value)
    if len(set(values)) > 1:
        per_rank = ", ".join(f"rank {r}: {v[:12]}" for r, v in enumerate(values))
        raise RanksDisagreeError(
            f"the processes disagree on {what} ({per_rank}); start every process with the same "
            "command, configuration and data (the same files under --data on every machine)"
        )


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def shard(d: Dist, n: int) -> torch.Tensor:
    """This rank's positions in a global batch of ``n``: every ``world``-th from ``rank``."""
    return torch.arange(d.rank, n, d.world)


@contextmanager
def node_cache(d: Dist) -> Iterator[Path]:
    """A folder the processes of one machine share for the run (removed at the end).

    Local rank 0 makes it; the ranks of a machine are contiguous (torchrun), so each finds
    its machine's folder at rank ``rank - local_rank`` of the gathered paths.
    """
    if not d.active:  # one process keeps its films in memory: no folder
        yield Path(tempfile.gettempdir())
        return
    made = tempfile.mkdtemp(prefix="pneumonia-train-") if d.local_rank == 0 else ""
    paths = gather(d, made)
    path = Path(paths[d.rank - d.local_rank])
    try:
        yield path
    except BaseException:
        # No barrier: the peers may be waiting at another collective. A file still mapped by
        # one of them stays readable once unlinked.
        if made:
            shutil.rmtree(made, ignore_errors=True)
        raise
    barrier(d)
    if made:
        shutil.rmtree(made, ignore_errors=True)


def shared_images(
    d: Dist, samples: list[Sample], spec: PreprocessSpec, cache: Path, progress: bool
) -> LoadedImages:
    """The training films, decoded once per machine and memory-mapped by its processes.

    One process: :func:`pneumonia.data.load_images` in memory, as always. Several: local rank 0
    decodes and writes the float32 array to ``cache``; every process of the machine maps that
    file copy-on-write, so the machine holds one copy in its page cache, not one per process.
    Only local rank 0's result lists the samples and skipped files.

    Raises:
        RanksDisagreeError: the machines could read other films (other data under --data).
    """
    if not d.active:
        return load_images(samples, spec, progress=progress)
    x_file, y_file = cache / "train_x.npy", cache / "train_y.npy"
    kept: list[Sample] = []
    skipped: list[tuple[Path, str]] = []
    if d.local_rank == 0:
        loaded = load_images(samples, spec, progress=progress)
        kept, skipped = loaded.samples, loaded.skipped
        np.save(x_file, loaded.x)
        np.save(y_file, loaded.y)
        del loaded
    barrier(d)
    x = np.load(x_file, mmap_mode="c")
    y = np.load(y_file)
    check_agree(d, "the training films each process could read", digest(y.tobytes().hex()))
    return LoadedImages(x=x, y=y, samples=kept, skipped=skipped)
