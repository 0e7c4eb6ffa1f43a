"""Checkpoints under faults: nothing trained is lost, and no documented checkpoint name holds a broken file.

- A run killed after ``last.ckpt`` has steps, then a rerun that fails while it sets up, then the right
  command: the last one resumes at the step of ``last.ckpt``, never at step 0 (slow, the CLI).
- A truncated ``last.ckpt`` beside an intact ``best.ckpt``: the rerun names the broken file in a warning and
  resumes from ``best.ckpt`` at its step.
- A disk that fills part-way through a checkpoint (``ENOSPC``, injected): no partial file under
  ``last.ckpt``, ``best.ckpt`` or ``interrupted.ckpt``; the error reported is the first one, the failure to
  save ``interrupted.ckpt`` after it is added to it as a note; the rerun resumes.
- Non-finite weights: stopped right after the update that made them, whatever ``callbacks=`` holds, and
  never checkpointed; the message names the checkpoint with the last finite weights, or says none exists.

The task is ``conftest.make_text_task``: 64 training examples in batches of 8, 8 steps per epoch.
"""

from __future__ import annotations

import builtins
import errno
import logging
import os
import tempfile
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import (
    TrainRun,
    app_env,
    callback_overrides,
    compose_config,
    make_text_task,
    run_to_end,
    train_py,
)
from test_resume import RUN, Crash, InfiniteGradient, Pace, all_finite, assert_same_result, train_losses

from distill_lab.run import train

pytestmark = pytest.mark.usefixtures("torch_single_thread")

DOCUMENTED = ("last.ckpt", "best.ckpt", "interrupted.ckpt")


class FailInSetup(L.Callback):
    """Fails while ``fit`` sets up, before a checkpoint is restored or a step taken: as a wrong override of
    the optimizer or the data fails there."""

    def setup(self, trainer, module, stage) -> None:
        raise RuntimeError("test failure while setting up")


class FullDisk:
    """``builtins.open`` on a disk that fills up, for the files opened for binary writing in the directories
    ``on_disk``: the first ``whole`` are written whole; after them ``free`` bytes are left, shared by every
    later file, and a write past them writes what fits and raises ``OSError(ENOSPC)``, as a full disk
    does."""

    def __init__(self, on_disk: list[Path], whole: int, free: int) -> None:
        self.on_disk, self.whole, self.free, self.opened = on_disk, whole, free, []
        self._open = builtins.open

    def open(self, file, mode="r", *args, **kwargs):
        f = self._open(file, mode, *args, **kwargs)
        if "b" not in mode or not any(m in mode for m in "wxa+") or Path(file).parent not in self.on_disk:
            return f
        self.opened.append(str(file))
        return f if len(self.opened) <= self.whole else _FillingFile(f, self)


class _FillingFile:
    def __init__(self, f, disk: FullDisk) -> None:
        self._f, self._disk = f, disk

    def write(self, data) -> int:
        data = bytes(data)
        if len(data) > self._disk.free:
            self._f.write(data[: self._disk.free])
            self._f.flush()
            self._disk.free = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._disk.free -= len(data)
        return self._f.write(data)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self._f.close()

    def __getattr__(self, name):
        return getattr(self._f, name)


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return make_text_task(tmp_path_factory.mktemp("faults-task"))


def run_app(task: dict, output_dir: Path, *overrides: str) -> dict:
    return train(compose_config([*task["overrides"], *RUN, *overrides], output_dir))


def step_of(checkpoint: Path) -> int:
    return torch.load(checkpoint, map_location="cpu", weights_only=True)["global_step"]


def assert_whole_checkpoints(checkpoints: Path) -> None:
    """Every file in ``checkpoints`` is a documented name that loads with finite weights: no partial file, no
    temporary file left behind."""
    for path in checkpoints.iterdir():
        assert path.name in DOCUMENTED, path
        step_of(path)  # loads
        assert all_finite(path), path


# ---------------------------------------------------------------------- 1. which checkpoint a rerun resumes


@pytest.mark.slow
def test_kill_then_a_rerun_failing_in_setup_then_the_command_resumes_at_the_step_of_last(task, tmp_path):
    run_dir = tmp_path / "run"
    command = [
        *task["overrides"], *RUN, "trainer.max_epochs=2", "checkpoint_every_n_steps=2",
        f"hydra.run.dir={run_dir}", *callback_overrides("pace", Pace, seconds=0.2),
    ]  # fmt: skip
    last = run_dir / "checkpoints" / "last.ckpt"
    first = TrainRun(train_py(*command), env=app_env(tmp_path), log=tmp_path / "first.log", cwd=tmp_path)
    first.wait_for_checkpoint(min_step=4, last=last)
    first.kill()  # SIGKILL
    step = step_of(last)
    assert 4 <= step < 16 and not (run_dir / "checkpoints" / "interrupted.ckpt").exists()

    failing = run_to_end(
        train_py(*command, *callback_overrides("broken", FailInSetup)), app_env(tmp_path), fails=True
    )
    assert "test failure while setting up" in failing.stdout + failing.stderr
    assert step_of(last) == step

    good = run_to_end(train_py(*command), app_env(tmp_path))
    output = good.stdout + good.stderr
    assert f"ckpt_path=auto: resuming from {last} because" in output
    assert f"last.ckpt, at step {step}, is its readable checkpoint with the most trained steps" in output
    assert f"Restored all states from the checkpoint at {last}" in output
    assert step_of(last) == 16 and (run_dir / "results.json").is_file()
    versions = sorted((run_dir / "csv").glob("version_*"))
    assert min(train_losses(run_dir, version=int(versions[-1].name.split("_")[1]))) == step


def test_a_truncated_last_checkpoint_is_named_and_skipped_for_the_intact_best_one(task, tmp_path, caplog):
    out = tmp_path / "run"
    checkpoints = out / "checkpoints"
    crash = callback_overrides("crash", Crash, hook="on_train_batch_end", step=11)
    with pytest.raises(RuntimeError, match="test crash"):
        run_app(task, out, "trainer.max_epochs=2", "checkpoint_every_n_steps=3", *crash)
    (checkpoints / "interrupted.ckpt").unlink()  # as a SIGKILL at step 11 leaves the run
    last, best = checkpoints / "last.ckpt", checkpoints / "best.ckpt"
    assert step_of(last) == 9 and step_of(best) == 8
    whole = last.read_bytes()
    last.write_bytes(whole[: len(whole) // 2])  # a copy cut short

    with caplog.at_level(logging.INFO):
        run_app(task, out, "trainer.max_epochs=2", "checkpoint_every_n_steps=3")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(f"skipping {last}: it cannot be read" in w for w in warnings), warnings
    assert f"ckpt_path=auto: resuming from {best} because" in caplog.text
    assert "best.ckpt, at step 8, is its readable checkpoint with the most trained steps" in caplog.text
    assert step_of(last) == 16
    # best.ckpt, written after its epoch's validation, resumes exactly: the uninterrupted run's losses, result
    reference = tmp_path / "reference"
    run_app(task, reference, "trainer.max_epochs=2", "checkpoint_every_n_steps=3")
    losses, want = train_losses(out, version=1), train_losses(reference)
    assert sorted(losses) == list(range(8, 16))
    assert losses == pytest.approx({s: want[s] for s in range(8, 16)}, rel=1e-6, abs=1e-9)
    assert_same_result(out, reference)


def test_a_checkpoint_given_by_path_that_cannot_be_read_is_refused_before_anything_loads(tmp_path):
    from distill_lab.resume import resolve_ckpt_path

    broken = tmp_path / "last.ckpt"
    torch.save({"global_step": 3, "state_dict": {"w": torch.zeros(100)}}, broken)
    broken.write_bytes(broken.read_bytes()[:200])
    with pytest.raises(ValueError, match=f"ckpt_path={broken} cannot be read.*truncated"):
        resolve_ckpt_path(str(broken), tmp_path / "run")


def test_a_directory_whose_checkpoints_cannot_be_read_starts_afresh_with_them_set_aside(
    tmp_path, monkeypatch, caplog
):
    from distill_lab.resume import resolve_ckpt_path

    monkeypatch.delenv("LOCAL_RANK", raising=False)
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "interrupted.ckpt").touch()  # emptied by a full disk
    with caplog.at_level(logging.WARNING):
        assert resolve_ckpt_path("auto", run) == (None, run)
    assert f"skipping {run / 'checkpoints' / 'interrupted.ckpt'}: it cannot be read" in caplog.text
    assert (run / "checkpoints.1" / "interrupted.ckpt").is_file() and not (run / "checkpoints").exists()


# ---------------------------------------------------------------------- 2. a disk that fills up


def test_a_save_failing_with_enospc_part_way_leaves_no_partial_file_and_reports_the_first_error(
    task, tmp_path, caplog
):
    out = tmp_path / "run"
    checkpoints = out / "checkpoints"
    last = checkpoints / "last.ckpt"
    # the run's checkpoints and the system's temporary directory (where Lightning's own save writes first)
    disk = FullDisk([checkpoints, Path(tempfile.gettempdir())], whole=1, free=4096)  # last.ckpt of step 3
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(builtins, "open", disk.open)
        with pytest.raises(OSError) as info:
            run_app(task, out, "trainer.max_epochs=1", "checkpoint_every_n_steps=3")
    error = info.value
    assert error.errno == errno.ENOSPC
    notes = "\n".join(getattr(error, "__notes__", []))
    # the first failure: last.ckpt of step 6; the one after it (interrupted.ckpt) is added as a note
    assert f"while writing {last}" in notes, notes
    assert f"saving {checkpoints / 'interrupted.ckpt'} failed too" in notes, notes
    assert sorted(p.name for p in checkpoints.iterdir()) == ["last.ckpt"]
    assert_whole_checkpoints(checkpoints)
    assert step_of(last) == 3

    # space freed: the same command resumes at step 3
    with caplog.at_level(logging.INFO):
        run_app(task, out, "trainer.max_epochs=1", "checkpoint_every_n_steps=3")
    assert f"ckpt_path=auto: resuming from {last} because" in caplog.text
    assert "last.ckpt, at step 3, is its readable checkpoint" in caplog.text
    assert min(train_losses(out, version=1)) == 3 and step_of(last) == 8


# ---------------------------------------------------------------------- 3. non-finite weights


def test_a_diverging_run_without_a_checkpoint_says_that_none_holds_finite_weights(task, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(FloatingPointError) as info:
        run_app(task, out, "optimizer.lr=1e6", "warmup_ratio=0", "trainer.max_epochs=1")
    message = str(info.value)
    assert "no checkpoint holds earlier weights" in message, message
    assert "newest checkpoint holds" not in message
    assert not list(out.glob("checkpoints/*.ckpt"))


def test_non_finite_weights_stop_the_step_that_made_them_and_name_the_last_finite_checkpoint(task, tmp_path):
    """An infinite gradient at step 3 (the loss finite) makes NaN weights; the run stops right after that
    update, before the checkpoint due then, also without ``callbacks.finite_checkpoints``."""
    out = tmp_path / "run"
    checkpoints = out / "checkpoints"
    with pytest.raises(FloatingPointError) as info:
        run_app(
            task, out, "trainer.max_epochs=1", "checkpoint_every_n_steps=2",
            "callbacks.finite_checkpoints=null", *callback_overrides("inf", InfiniteGradient, step=3),
        )  # fmt: skip
    message = str(info.value)
    assert message.startswith("non-finite weights at step 4 in student."), message
    assert "after the update of epoch 0, batch 3" in message
    assert f"the last finite weights are in {checkpoints / 'last.ckpt'} (step 2)" in message, message
    assert sorted(p.name for p in checkpoints.iterdir()) == ["last.ckpt"]
    assert step_of(checkpoints / "last.ckpt") == 2
    assert_whole_checkpoints(checkpoints)
