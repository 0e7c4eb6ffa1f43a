"""Checkpoint files on disk: written whole or not at all, and read back only when whole.

A checkpoint is written to a temporary file beside its final name (``.last.ckpt.<pid>-<random>.tmp``, in the
same directory, so on the same filesystem), flushed to the disk (``fsync``) and only then renamed to its name
(:func:`atomic_save`). A rename within a filesystem replaces the old file in one step: a run killed, or a disk
that fills up, part-way through a save leaves the previous file under the name, never a partial one.
Lightning's own save (``TorchCheckpointIO``) goes through fsspec's transaction, which writes the temporary
file in the system's temporary directory and *copies* it to the checkpoint's name when that directory is
another filesystem (a tmpfs ``/tmp``): a copy that fails part-way leaves a truncated file under the documented
name.
:class:`AtomicCheckpointIO` replaces it (:func:`use_atomic_saves`, called by the checkpoint callbacks).

Reading: :func:`checkpoint_step` opens a checkpoint as ``torch.load`` does (memory-mapped: the tensors are not
read) and returns its trained step, or raises :class:`UnreadableCheckpoint` naming the file; a file cut short
has lost the zip index at its end and is refused. :func:`readable_checkpoints` orders several files by trained
step, naming each that cannot be read in a warning.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
from collections.abc import Iterable
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

log = logging.getLogger(__name__)

# the checkpoints a run writes under fixed names (checkpoints/), which ckpt_path=auto may resume
DOCUMENTED_CHECKPOINTS = ("last.ckpt", "interrupted.ckpt", "best.ckpt")


class UnreadableCheckpoint(ValueError):
    """A checkpoint file that cannot be read (truncated, empty, not a checkpoint)."""


def checkpoint_step(path: str | Path) -> int:
    """The trained step (``global_step``) of the checkpoint ``path``; raises :class:`UnreadableCheckpoint`
    when the file cannot be read as one. Only the index and the pickled records are read, not the tensors."""
    try:
        step = torch.load(path, map_location="cpu", weights_only=False, mmap=True)["global_step"]
    except Exception as err:  # a truncated zip, an empty file (EOFError), a pickle cut short...
        reason = (str(err).strip().splitlines() or [""])[0].split(". ")[0]
        raise UnreadableCheckpoint(
            f"{path} cannot be read ({type(err).__name__}: {reason}): it is truncated or not a checkpoint, "
            "e.g. left by a copy or a save that failed part-way"
        ) from None
    if not isinstance(step, int):
        raise UnreadableCheckpoint(f"{path} cannot be read: it holds no trained step (global_step)")
    return step


def readable_checkpoints(paths: Iterable[str | Path], context: str = "") -> list[tuple[Path, int]]:
    """``[(path, step), ...]`` of the files ``paths`` that exist and can be read as checkpoints, the most
    trained first (of equal steps, the one written last first). Each file that cannot be read is named in a
    warning (after ``context``) and left out."""
    readable = []
    for path in map(Path, paths):
        if not path.is_file():
            continue
        try:
            step = checkpoint_step(path)
        except UnreadableCheckpoint as err:
            log.warning("%sskipping %s: it %s", context, path, str(err).removeprefix(f"{path} "))
            continue
        readable.append((step, path.stat().st_mtime_ns, path))
    return [(path, step) for step, _, path in sorted(readable, key=lambda r: r[:2], reverse=True)]


def newest_valid_checkpoint(paths: Iterable[str | Path], context: str = "") -> tuple[Path, int] | None:
    """``(path, step)``: the first of :func:`readable_checkpoints`, the one with the most trained steps, or
    None."""
    return next(iter(readable_checkpoints(paths, context)), None)


def _fsync_directory(directory: Path) -> None:
    """Makes a rename in ``directory`` durable (where the platform lets a directory be opened)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_save(checkpoint: dict, path: str | Path) -> None:
    """``torch.save(checkpoint, path)`` through a temporary file in ``path``'s directory, fsync'ed, then
    renamed to ``path``: ``path`` holds the old file or the new one, whole. On a failure the temporary file
    is removed and the error (the first ``OSError``, e.g. ``ENOSPC``, rather than the ``RuntimeError`` that
    ``torch.save`` makes of it) gets a note naming ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        try:
            with open(temporary, "xb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
        except RuntimeError as err:  # torch.save reports a failed write as a RuntimeError of its own
            if isinstance(err.__context__, OSError):
                raise err.__context__ from None
            raise
        os.replace(temporary, path)
    except BaseException as err:
        with contextlib.suppress(OSError):
            temporary.unlink()
        err.add_note(
            f"while writing {path}: that name holds what it held before (the partial file was removed)"
        )
        raise
    _fsync_directory(path.parent)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``TorchCheckpointIO`` whose local saves are :func:`atomic_save` (remote paths,
    ``s3://...``, and ``storage_options`` are left to it)."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if storage_options is not None or "://" in str(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        atomic_save(checkpoint, path)


def use_atomic_saves(trainer: L.Trainer) -> None:
    """Makes ``trainer``'s checkpoints (every callback's, ``trainer.save_checkpoint``) atomic, where its
    strategy uses Lightning's default ``TorchCheckpointIO``; a checkpoint IO of another kind (XLA, async,
    a user's plugin) is left as it is."""
    strategy = trainer.strategy
    if type(strategy.checkpoint_io) is TorchCheckpointIO:
        strategy.checkpoint_io = AtomicCheckpointIO()
