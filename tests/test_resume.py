"""Surviving interruption: a run killed mid-epoch (SIGKILL), stopped with Ctrl-C or crashed resumes to the
result of an uninterrupted run, by rerunning the same command (``ckpt_path=auto``); a non-finite loss stops
the run naming the step and the part that went non-finite, and no checkpoint ever holds non-finite weights.

The task is ``conftest.make_text_task`` with dropout on (``hidden_dropout_prob=0.1``, which the derived
student inherits), so a resumed run matches only if it continues with the same data order *and* the same
random state: 64 training examples in batches of 8, i.e. 8 steps per epoch, 3 epochs. "The same result" is
checked on the final ``results.json`` (student accuracy and F1, attention loss per layer pair) and the
exported student's weights, within float32 tolerances (both runs do the same operations on one thread, so the
differences are in fact zero).

The ``slow`` tests run ``python train.py`` in subprocesses (Hydra's own timestamped run directories, under a
temporary working directory) with one torch thread; the others call ``distill_lab.run.train`` in process.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from conftest import TrainRun, app_env, callback_overrides, compose_config, make_text_task, train_py
from hydra.utils import instantiate
from transformers import AutoModelForSequenceClassification

from distill_lab.resume import (
    LOCK_FILE,
    ResumableDistributedSampler,
    ResumableRandomSampler,
    RunDirectoryLocked,
    config_differences,
    find_previous_run,
    resolve_ckpt_path,
)
from distill_lab.run import train

pytestmark = pytest.mark.usefixtures("torch_single_thread")

EPOCHS, STEPS_PER_EPOCH = 3, 8
TOTAL_STEPS = EPOCHS * STEPS_PER_EPOCH
PAIRS = ["L1->0", "L3->1"]  # the uniform map of the 4 teacher layers onto 2 student layers
RUN = [
    "student=from_teacher",
    "student.num_layers=2",
    "logger=csv",
    "data.batch_size=8",
    f"trainer.max_epochs={EPOCHS}",
    "trainer.log_every_n_steps=1",
    "optimizer.lr=0.005",
    "fused_kernel=false",
    "callbacks.attention_maps=null",
    "callbacks.progress_bar=null",
    "+trainer.enable_progress_bar=false",
    "+trainer.enable_model_summary=false",
]


# ---------------------------------------------------------------------- callbacks the tests add


HOLD_VARIABLE = "DISTILL_LAB_TEST_HOLD"


class Pace(L.Callback):
    """Sleeps after every training step, so that a test can interrupt the run between two given checkpoints.

    Part of "the same command" in the CLI tests (the reference run paces too); it changes no number.
    """

    def __init__(self, seconds: float = 0.1) -> None:
        self.seconds = seconds

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        time.sleep(self.seconds)

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        # HOLD_VARIABLE="PATH STEP" (the environment, not the command, so that two runs of one command can
        # differ in it): from optimizer step STEP on, wait while PATH exists, which a test removes to let go
        hold = os.environ.get(HOLD_VARIABLE)
        if hold:
            path, step = hold.rsplit(" ", 1)
            while trainer.global_step >= int(step) and os.path.exists(path):
                time.sleep(0.05)


class Crash(L.Callback):
    """Raises ``RuntimeError`` in ``hook`` once ``trainer.global_step == step`` (steps already taken)."""

    def __init__(self, hook: str, step: int) -> None:
        self.hook, self.step = hook, step

    def _maybe_crash(self, trainer, hook: str) -> None:
        if hook == self.hook and trainer.global_step == self.step:
            raise RuntimeError(f"test crash in {hook} at step {self.step}")

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self._maybe_crash(trainer, "on_train_batch_start")

    def on_before_backward(self, trainer, module, loss) -> None:
        self._maybe_crash(trainer, "on_before_backward")

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self._maybe_crash(trainer, "on_train_batch_end")

    def on_validation_start(self, trainer, module) -> None:
        if not trainer.sanity_checking:
            self._maybe_crash(trainer, "on_validation_start")

    def on_train_epoch_start(self, trainer, module) -> None:
        self._maybe_crash(trainer, "on_train_epoch_start")

    def on_validation_batch_start(self, trainer, module, batch, batch_idx, dataloader_idx=0) -> None:
        if not trainer.sanity_checking and batch_idx == 1:
            self._maybe_crash(trainer, "on_validation_batch_start")


class RecordLearningRate(L.Callback):
    """Appends ``[global step, learning rate]`` of each training batch's start to the JSON-lines
    file ``path``."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps([trainer.global_step, trainer.optimizers[0].param_groups[0]["lr"]]) + "\n")


class CtrlCBeforeUpdate(L.Callback):
    """Sends this process ``times`` SIGINTs once the gradients of step ``step`` are computed, right before the
    optimizer updates the weights: what a Ctrl-C during a step's update does."""

    def __init__(self, step: int, times: int = 1) -> None:
        self.step, self.times = step, times

    def on_before_optimizer_step(self, trainer, module, optimizer) -> None:
        if trainer.global_step == self.step:
            for _ in range(self.times):
                os.kill(os.getpid(), signal.SIGINT)


class CrashInBatch(L.Callback):
    """Raises ``RuntimeError`` in ``hook`` during the training batch ``batch`` (counted over all epochs)."""

    def __init__(self, hook: str, batch: int) -> None:
        self.hook, self.batch = hook, batch

    def _maybe_crash(self, trainer, hook: str) -> None:
        if hook == self.hook and trainer.fit_loop.epoch_loop.total_batch_idx == self.batch:
            raise RuntimeError(f"test crash in {hook} of batch {self.batch}")

    def on_before_backward(self, trainer, module, loss) -> None:
        self._maybe_crash(trainer, "on_before_backward")

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self._maybe_crash(trainer, "on_train_batch_end")


class PoisonLoss(L.Callback):
    """From step ``step`` on, makes one part of the loss NaN with finite weights: ``part="output"`` turns the
    student's logits NaN (a forward hook on its classifier; the attention maps come before it and stay
    finite), a layer pair name makes that pair's attention loss NaN (the output loss stays finite)."""

    def __init__(self, part: str, step: int, rank: int | None = None) -> None:
        self.part, self.step, self.rank = part, step, rank  # rank: poison that process alone

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if trainer.global_step != self.step or self.rank not in (None, trainer.global_rank):
            return
        if self.part == "output":
            module.student.classifier.register_forward_hook(
                lambda layer, inputs, output: output * float("nan")
            )
            return
        original, pair = module.attention_loss.forward, self.part

        def poisoned(*args, **kwargs):
            total, details = original(*args, **kwargs)
            return total * float("nan"), {**details, pair: details[pair] * float("nan")}

        module.attention_loss.forward = poisoned


class InfiniteGradient(L.Callback):
    """Before the optimizer step taken at ``step``, sets one student gradient to infinity: the loss stays
    finite, but after gradient clipping and AdamW that parameter is NaN."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_before_optimizer_step(self, trainer, module, optimizer) -> None:
        if trainer.global_step == self.step:
            next(p for p in module.student.parameters() if p.grad is not None).grad.fill_(float("inf"))


# ---------------------------------------------------------------------- shared helpers


def student_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return AutoModelForSequenceClassification.from_pretrained(run_dir / "student").state_dict()


def assert_same_result(run_dir: Path, reference_dir: Path) -> None:
    """``results.json`` metrics and the exported student of ``run_dir`` equal those of ``reference_dir``."""
    got = json.loads((run_dir / "results.json").read_text())
    want = json.loads((reference_dir / "results.json").read_text())
    for key in ("acc", "f1"):
        assert got["student"][key] == pytest.approx(want["student"][key], abs=1e-6), key
        assert got["teacher"][key] == pytest.approx(want["teacher"][key], abs=1e-6), key
    assert set(got["attention_loss"]) == set(want["attention_loss"]) == set(PAIRS)
    for pair in PAIRS:
        assert got["attention_loss"][pair] == pytest.approx(
            want["attention_loss"][pair], rel=1e-5, abs=1e-9
        ), pair
    got_weights, want_weights = student_weights(run_dir), student_weights(reference_dir)
    assert got_weights.keys() == want_weights.keys()
    for name, value in want_weights.items():
        torch.testing.assert_close(got_weights[name], value, rtol=1e-5, atol=1e-6, msg=name)


def all_finite(checkpoint: Path) -> bool:
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    return all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def train_losses(run_dir: Path, version: int = 0) -> dict[int, float]:
    """``train/loss`` by global step from the CSV logger's ``version`` (a resumed run logs the
    next version)."""
    with open(run_dir / "csv" / f"version_{version}" / "metrics.csv", newline="") as f:
        return {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f) if r["train/loss"]}


def assert_same_losses(losses: dict[int, float], reference: dict[int, float], first_step: int) -> None:
    """The resumed run logged one loss per step from ``first_step`` to the end, each the reference's, at the
    reference's logged step (after an interruption *during* a step too: ``ResumeRandomState`` keeps the
    loggers' step, which Lightning's restart would advance by one)."""
    assert sorted(losses) == list(range(first_step, TOTAL_STEPS))
    assert losses == pytest.approx(
        {step: reference[step] for step in range(first_step, TOTAL_STEPS)}, rel=1e-6, abs=1e-9
    )


def validation_history(run_dir: Path) -> dict[tuple[int, int], dict[str, float]]:
    """``{(epoch, step): {"val/acc": ..., ...}}`` from every CSV logger version of ``run_dir`` (a resumed run
    logs the next version): what each validation logged, and the final evaluation of the best checkpoint
    (``best/...``). One validated in two versions must have logged the same numbers in both."""
    history: dict[tuple[int, int], dict[str, float]] = {}
    for metrics in sorted((run_dir / "csv").glob("version_*/metrics.csv")):
        with open(metrics, newline="") as f:
            for row in csv.DictReader(f):
                values = {k: float(v) for k, v in row.items() if k.startswith(("val/", "best/")) and v}
                if values:
                    when = int(row["epoch"]) if row["epoch"] else "best", int(row["step"])  # best/: no epoch
                    assert history.setdefault(when, values) == pytest.approx(values, rel=1e-6, abs=1e-9), when
    return history


class LockHolder:
    """Another process that holds ``run_dir``'s lock (as a live run does) until :meth:`kill`."""

    SCRIPT = (
        "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
        "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, b'%d\\n' % os.getpid()); print('locked', flush=True); "
        "time.sleep(600)"
    )

    def __init__(self, run_dir: Path) -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [sys.executable, "-c", self.SCRIPT, str(run_dir / LOCK_FILE)], stdout=subprocess.PIPE, text=True
        )
        assert self.process.stdout.readline() == "locked\n"

    def kill(self) -> None:
        self.process.kill()  # SIGKILL: the kernel releases the lock of a process however it dies
        self.process.wait()


@pytest.fixture
def lock_holders():
    holders = []
    yield lambda run_dir: holders.append(LockHolder(run_dir)) or holders[-1]
    for holder in holders:
        holder.kill()


def loop_position(checkpoint: dict) -> tuple[int, int]:
    """``(epoch, batches processed in it)`` as Lightning's loops recorded them in ``checkpoint``."""
    loops = checkpoint["loops"]["fit_loop"]
    return loops["epoch_progress"]["current"]["processed"], loops["epoch_loop.batch_progress"]["current"][
        "processed"
    ]


# ---------------------------------------------------------------------- 1. the CLI: kill, Ctrl-C


@pytest.fixture(scope="module")
def cli_task(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume-cli")
    task = make_text_task(root / "task", hidden_dropout_prob=0.1)
    command = [
        *task["overrides"],
        *RUN,
        "checkpoint_every_n_steps=3",
        *callback_overrides("pace", Pace, seconds=0.1),
    ]
    return root, command


def cli_run(cwd: Path, command: list[str], name: str, hold: tuple[Path, int] | None = None) -> TrainRun:
    """``python train.py *command`` started in the background in ``cwd`` (Hydra writes
    ``cwd/outputs/DATE/TIME``), with one torch thread, offline, its output in ``cwd/<name>.log`` (``tests/``
    on the path: the command names ``test_resume.Pace``). With ``hold=(path, step)`` the run waits from
    optimizer step ``step`` on while ``path`` exists (``Pace``)."""
    cwd.mkdir(parents=True, exist_ok=True)
    env = app_env(cwd)
    if hold is not None:
        env[HOLD_VARIABLE] = f"{hold[0]} {hold[1]}"
    return TrainRun(train_py(*command), env=env, log=cwd / f"{name}.log", cwd=cwd)


@pytest.fixture(scope="module")
def cli_reference(cli_task):
    """The uninterrupted run of the command; it starts at once and runs beside the first interrupted one."""
    root, command = cli_task
    run = cli_run(root / "reference", command, "reference")
    yield run
    run.kill()


def _finished_reference(run: TrainRun) -> Path:
    assert run.wait() == 0, run.output()[-3000:]
    (run_dir,) = run.run_dirs()
    return run_dir


@pytest.mark.slow
def test_sigkill_mid_epoch_then_the_same_command_resumes_to_the_uninterrupted_result(cli_task, cli_reference):
    root, command = cli_task
    cwd = root / "killed"
    first = cli_run(cwd, command, "first")
    last = first.wait_for_checkpoint(min_step=STEPS_PER_EPOCH + 1)  # in the second epoch
    first.process.send_signal(signal.SIGKILL)
    assert first.wait(60) == -signal.SIGKILL
    run_dir = last.parents[1]
    state = torch.load(last, map_location="cpu", weights_only=True)
    epoch, batches = loop_position(state)
    assert (
        STEPS_PER_EPOCH < state["global_step"] < TOTAL_STEPS and epoch >= 1 and 0 < batches < STEPS_PER_EPOCH
    )
    assert state["TextClassificationData"] == {"train_position": [epoch, batches * 8]}
    assert not (run_dir / "results.json").exists() and not (last.parent / "interrupted.ckpt").exists()

    second = cli_run(cwd, command, "second")
    assert second.wait() == 0, second.output()[-3000:]
    output = second.output()
    assert (
        f"ckpt_path=auto: resuming from {last} because {run_dir} is the latest run with the same overrides"
        in output
    )
    assert f"Restored all states from the checkpoint at {last}" in output
    # the rerun continued in the first run's directory;
    # the one Hydra made for it holds only .hydra/ and its log
    (new_dir,) = [d for d in second.run_dirs() if d != run_dir]
    assert sorted(p.name for p in new_dir.iterdir()) == [".hydra", LOCK_FILE, "train.log"]
    assert (run_dir / "results.json").is_file()
    final = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert final["global_step"] == TOTAL_STEPS

    reference_dir = _finished_reference(cli_reference)
    assert_same_result(run_dir, reference_dir)
    # the rerun trained exactly the steps after the checkpoint, each with the uninterrupted run's loss
    assert_same_losses(train_losses(run_dir, version=1), train_losses(reference_dir), state["global_step"])

    # a third run of the same command finds the finished run and starts afresh
    assert find_previous_run(new_dir) is None


@pytest.mark.slow
def test_ctrl_c_leaves_an_interrupted_checkpoint_that_loads_and_resumes(cli_task, cli_reference):
    root, command = cli_task
    cwd = root / "interrupted"
    first = cli_run(cwd, command, "first")
    last = first.wait_for_checkpoint(min_step=3)
    first.interrupt()
    assert first.wait(120) != 0
    assert "KeyboardInterrupt" in first.output()
    interrupted = last.with_name("interrupted.ckpt")
    assert interrupted.is_file() and interrupted.stat().st_mtime_ns >= last.stat().st_mtime_ns
    state = torch.load(interrupted, map_location="cpu", weights_only=True)  # loads as Lightning loads it
    assert 3 <= state["global_step"] < TOTAL_STEPS
    assert all_finite(interrupted) and not any(k.startswith("teacher.") for k in state["state_dict"])
    assert {"rng_state", "TextClassificationData", "optimizer_states"} <= set(state)
    run_dir = last.parents[1]
    assert not (run_dir / "results.json").exists()

    second = cli_run(cwd, command, "second")
    assert second.wait() == 0, second.output()[-3000:]
    assert f"ckpt_path=auto: resuming from {interrupted} because {run_dir}" in second.output()
    reference_dir = _finished_reference(cli_reference)
    assert_same_result(run_dir, reference_dir)
    assert_same_losses(train_losses(run_dir, version=1), train_losses(reference_dir), state["global_step"])


@pytest.mark.slow
def test_a_second_copy_of_a_running_command_starts_afresh_beside_it(cli_task, cli_reference):
    """The same command started again while the first still runs finds the first's unfinished run (a
    checkpoint, no results.json) but not its lock: it starts afresh in its own directory, and each run ends
    with the uninterrupted result, untouched by the other."""
    root, command = cli_task
    cwd = root / "twice"
    # the first is held after its checkpoint of step 3 until the second has ended, so that it still runs then
    # however long the second takes to start on a loaded machine
    hold = root / "hold-first"
    hold.touch()
    first = cli_run(cwd, command, "first", hold=(hold, 4))
    first_dir = first.wait_for_checkpoint(min_step=3).parents[1]
    second = cli_run(cwd, command, "second")
    assert second.wait() == 0, second.output()[-3000:]
    hold.unlink()
    assert first.wait() == 0, first.output()[-3000:]
    (second_dir,) = [d for d in second.run_dirs() if d != first_dir]
    assert f"{first_dir}, the latest run with the same overrides, is still running" in second.output()
    assert "resuming from" not in second.output()
    reference_dir = _finished_reference(cli_reference)
    for run_dir in (first_dir, second_dir):
        assert [p.name for p in (run_dir / "csv").iterdir()] == ["version_0"]  # one run wrote here
        assert_same_result(run_dir, reference_dir)
        assert train_losses(run_dir) == train_losses(reference_dir)


# ---------------------------------------------------------------------- 2. in process: crashes


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return make_text_task(tmp_path_factory.mktemp("resume-task"), hidden_dropout_prob=0.1)


def run_app(task: dict, output_dir: Path, *overrides: str) -> dict:
    return train(
        compose_config([*task["overrides"], *RUN, "checkpoint_every_n_steps=3", *overrides], output_dir)
    )


@pytest.fixture(scope="module")
def reference(task, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    run_app(task, out)
    return out


CRASHES = {  # how Lightning resumes from the interrupted.ckpt written by each
    "after-a-step": ("on_train_batch_end", 5),  # with the next batch of the epoch
    "during-a-step": ("on_before_backward", 10),  # repeating the batch under way (its dropout drawn again)
    "before-an-epoch": ("on_train_batch_start", 2 * STEPS_PER_EPOCH),  # with the first batch of the epoch
}


@pytest.mark.parametrize("case", list(CRASHES))
def test_crash_then_rerun_in_the_same_directory_resumes_to_the_uninterrupted_result(
    task, reference, tmp_path, caplog, case
):
    hook, step = CRASHES[case]
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match=f"test crash in {hook} at step {step}"):
        run_app(task, out, *callback_overrides("crash", Crash, hook=hook, step=step))
    interrupted = out / "checkpoints" / "interrupted.ckpt"
    assert interrupted.is_file() and not (out / "results.json").exists()
    assert torch.load(interrupted, map_location="cpu", weights_only=True)["global_step"] == step

    with caplog.at_level(logging.INFO, logger="distill_lab.resume"):
        run_app(task, out)  # the same directory, ckpt_path=auto
    assert (
        f"resuming from {interrupted} because this run's directory {out} holds an unfinished run"
        in caplog.text
    )
    assert_same_result(out, reference)
    assert_same_losses(train_losses(out, version=1), train_losses(reference), step)


@pytest.fixture
def restore_sigint():
    """Lightning ignores SIGINT once it has caught a KeyboardInterrupt (while it shuts down): give the test
    process back the Ctrl-C handler it had. Yields that handler: Python's ``default_int_handler``, or
    ``SIG_IGN`` where pytest was started as a background job of a shell script (``pytest &``)."""
    handler = signal.getsignal(signal.SIGINT)
    yield handler
    signal.signal(signal.SIGINT, handler)


def test_a_ctrl_c_during_a_step_is_taken_when_the_step_ends(
    task, reference, tmp_path, caplog, restore_sigint
):
    """A Ctrl-C arriving as the optimizer updates the weights would otherwise interrupt the update half done
    (some parameters and Adam moments updated, others not): the step finishes, interrupted.ckpt holds its
    result, and the same command resumes with the next batch to the uninterrupted result. A second Ctrl-C
    stops at once, before the update."""
    out = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="distill_lab.checkpoints"), pytest.raises(SystemExit):
        run_app(task, out, *callback_overrides("ctrl_c", CtrlCBeforeUpdate, step=10))
    assert "Ctrl-C: stopping when this training step ends (press Ctrl-C again to stop now)" in caplog.text
    state = torch.load(out / "checkpoints" / "interrupted.ckpt", map_location="cpu", weights_only=True)
    assert state["global_step"] == 11  # step 10's update was made, and the run stopped after it
    assert signal.getsignal(signal.SIGINT) is restore_sigint  # Ctrl-C does what it did before the run
    run_app(task, out)
    assert_same_result(out, reference)
    assert_same_losses(train_losses(out, version=1), train_losses(reference), 11)

    twice = tmp_path / "twice"
    with pytest.raises(SystemExit):
        run_app(task, twice, *callback_overrides("ctrl_c", CtrlCBeforeUpdate, step=10, times=2))
    assert (
        torch.load(twice / "checkpoints" / "interrupted.ckpt", map_location="cpu", weights_only=True)[
            "global_step"
        ]
        == 10
    )


@pytest.mark.slow
def test_a_masked_lm_run_resumed_mid_epoch_masks_and_ends_as_the_uninterrupted_one(tmp_path_factory):
    """The training masks of a masked-LM run are drawn from the seed, the epoch and the batch's examples, so a
    run resumed mid-epoch masks the rest of its batches as the uninterrupted run did and ends as it did."""
    root = tmp_path_factory.mktemp("resume-mlm")
    task = make_text_task(root / "task", task="masked_lm", hidden_dropout_prob=0.1)
    reference, out = root / "reference", root / "run"
    run_app(task, reference)
    with pytest.raises(RuntimeError, match="test crash in on_before_backward at step 10"):
        run_app(task, out, *callback_overrides("crash", Crash, hook="on_before_backward", step=10))
    run_app(task, out)
    got, want = (json.loads((d / "results.json").read_text()) for d in (out, reference))
    assert got["student"]["perplexity"] == pytest.approx(want["student"]["perplexity"], rel=1e-5)
    assert got["attention_loss"] == pytest.approx(want["attention_loss"], rel=1e-5, abs=1e-9)
    last, reference_last = (
        torch.load(d / "checkpoints" / "last.ckpt", map_location="cpu") for d in (out, reference)
    )
    for name, weight in reference_last["state_dict"].items():
        torch.testing.assert_close(last["state_dict"][name], weight, rtol=1e-5, atol=1e-6, msg=name)
    assert_same_losses(train_losses(out, version=1), train_losses(reference), 10)


# (hook, step, overrides, last.ckpt left): a SIGKILL after the step of a checkpoint
KILLS_AFTER_A_DUE_CHECKPOINT = {
    # due on epoch 0's last batch (step 8, checkpoints every 4 steps), killed during or after its validation
    "during-the-epochs-validation": ("on_validation_start", 8, ["checkpoint_every_n_steps=4"], 4),
    "after-the-epochs-validation": ("on_train_epoch_start", 8, ["checkpoint_every_n_steps=4"], 8),
    # due on step 4, which a mid-epoch validation follows (every 4 batches), killed during it
    "during-a-mid-epoch-validation": (
        "on_validation_start",
        4,
        ["checkpoint_every_n_steps=2", "trainer.val_check_interval=4"],
        2,
    ),
}


def assert_validated_as_the_reference(out: Path, reference: Path, resumed_step: int, *kept: str) -> None:
    """A run resumed from step ``resumed_step`` ended as the uninterrupted ``reference``: every validation in
    its history, its results and student, its losses after the step, and a single best.ckpt of the same epoch
    and step (beside last.ckpt and the ``kept`` checkpoints the interruption left)."""
    history, reference_history = validation_history(out), validation_history(reference)
    assert history == reference_history and len(history) == len(reference_history)
    assert_same_result(out, reference)
    assert_same_losses(train_losses(out, version=1), train_losses(reference), resumed_step)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == sorted(
        ["best.ckpt", "last.ckpt", *kept]
    )
    best, best_reference = (
        torch.load(d / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True)
        for d in (out, reference)
    )
    assert (best["epoch"], best["global_step"]) == (best_reference["epoch"], best_reference["global_step"])


@pytest.mark.parametrize("case", list(KILLS_AFTER_A_DUE_CHECKPOINT))
def test_a_step_checkpoint_that_a_validation_follows_keeps_that_validation(task, tmp_path, case):
    """A step checkpoint due on a batch that a validation follows is written after that validation (on an
    epoch's last batch, at the end of the epoch): resumed from a checkpoint written before it, Lightning took
    the validation (and the epoch) for done, so it never ran: its metrics were never logged and the best
    checkpoint never saw it (the next best was written as ``best-v1.ckpt`` beside a stale ``best.ckpt``)."""
    hook, step, overrides, last_step = KILLS_AFTER_A_DUE_CHECKPOINT[case]
    reference = tmp_path / "reference"
    run_app(task, reference, *overrides)
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="test crash"):
        run_app(task, out, *overrides, *callback_overrides("crash", Crash, hook=hook, step=step))
    (out / "checkpoints" / "interrupted.ckpt").unlink()  # as a SIGKILL leaves the run
    last = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == last_step

    run_app(task, out, *overrides)
    assert_validated_as_the_reference(out, reference, last_step)


CRASHES_DURING_VALIDATION = {  # (hook, step, overrides): interrupted.ckpt is written at the validation's step
    # epoch 0's validation, after its last step (8); last.ckpt of step 4 is the newest step checkpoint
    "the-epochs-validation": ("on_validation_start", 8, ["checkpoint_every_n_steps=4"]),
    # a mid-epoch validation (every 4 batches) after step 4, whose due checkpoint waits for it
    "a-mid-epoch-validation": (
        "on_validation_start",
        4,
        ["checkpoint_every_n_steps=2", "trainer.val_check_interval=4"],
    ),
    # half-way through epoch 0's validation, its first batch done
    # (resumed as written, Lightning would skip it)
    "a-validation-batch": ("on_validation_batch_start", 8, ["checkpoint_every_n_steps=4"]),
}


@pytest.mark.parametrize("case", list(CRASHES_DURING_VALIDATION))
def test_an_exception_during_validation_resumes_by_running_that_validation_again(
    task, tmp_path, caplog, case
):
    """An exception (Ctrl-C too) during a validation inside fit writes ``interrupted.ckpt`` at that step,
    which resumes by running the whole validation again (``restart_validation``): as Lightning wrote it, the
    resumed run skipped the validation's finished batches (or the whole validation), so its metrics were wrong
    or never logged and the best checkpoint never saw it. Nothing trained before the exception is trained
    again, and the run ends with the uninterrupted run's validation history, results and ``best.ckpt``."""
    hook, step, overrides = CRASHES_DURING_VALIDATION[case]
    reference = tmp_path / "reference"
    run_app(task, reference, *overrides)
    out = tmp_path / "run"
    crash = callback_overrides("crash", Crash, hook=hook, step=step)
    with (
        caplog.at_level(logging.INFO, logger="distill_lab.checkpoints"),
        pytest.raises(RuntimeError, match="test crash"),
    ):
        run_app(task, out, *overrides, *crash)
    interrupted = out / "checkpoints" / "interrupted.ckpt"
    assert "stopped during a validation" in caplog.text
    assert torch.load(interrupted, map_location="cpu", weights_only=True)["global_step"] == step

    run_app(task, out, *overrides)
    assert_validated_as_the_reference(out, reference, step, "interrupted.ckpt")


ACCUMULATION_CRASHES = {  # batches 8-9 and 10-11 are the first two windows of epoch 1; step 5 ends 8-9
    "after-a-windows-first-batch": ("on_train_batch_end", 10),
    "during-a-windows-last-batch": ("on_before_backward", 11),
}


@pytest.mark.parametrize("case", list(ACCUMULATION_CRASHES))
def test_a_crash_inside_a_gradient_accumulation_window_resumes_at_its_first_batch(task, tmp_path, case):
    """Under ``trainer.accumulate_grad_batches=2`` an interruption after batch 10 of epoch 1's second window
    (batches 10-11), or during batch 11, leaves a checkpoint without batch 10's gradient: it resumes at batch
    10 (epoch 1, example 16) and steps on both batches' gradients, as the uninterrupted run did."""
    hook, batch = ACCUMULATION_CRASHES[case]
    accumulate = "trainer.accumulate_grad_batches=2"
    reference = tmp_path / "reference"
    run_app(task, reference, accumulate)
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match=f"test crash in {hook} of batch {batch}"):
        run_app(task, out, accumulate, *callback_overrides("crash", CrashInBatch, hook=hook, batch=batch))
    state = torch.load(out / "checkpoints" / "interrupted.ckpt", map_location="cpu", weights_only=True)
    assert state["global_step"] == 5 and loop_position(state) == (1, 2)
    assert state["TextClassificationData"] == {"train_position": [1, 16]}

    run_app(task, out, accumulate)
    assert_same_result(out, reference)
    losses, reference_losses = train_losses(out, version=1), train_losses(reference)
    assert sorted(losses) == list(range(5, TOTAL_STEPS // 2))
    assert losses == pytest.approx({step: reference_losses[step] for step in losses}, rel=1e-6, abs=1e-9)


def test_a_run_resumed_under_another_learning_rate_trains_on_at_it(task, tmp_path, caplog):
    """The README's advice after a non-finite loss: lower optimizer.lr and resume. Lightning restores the
    checkpoint's optimizer and schedule (the old base rate); the module scales them to the configured rate, so
    the resumed steps run at half the rates of the same schedule when the rate is halved."""
    out, rates = tmp_path / "run", tmp_path / "rates"

    def learning_rates(name: str) -> dict[int, float]:
        lines = (rates / name).read_text().splitlines()
        return {step: lr for step, lr in map(json.loads, lines)}

    rates.mkdir()
    record = [*callback_overrides("record", RecordLearningRate, path=str(rates / "first"))]
    with pytest.raises(RuntimeError, match="test crash in on_before_backward at step 10"):
        run_app(task, out, *record, *callback_overrides("crash", Crash, hook="on_before_backward", step=10))
    record = [*callback_overrides("record", RecordLearningRate, path=str(rates / "resumed"))]
    with caplog.at_level(logging.WARNING, logger="distill_lab.guards"):
        run_app(task, out, "optimizer.lr=0.0025", *record)  # RUN's is 0.005
    assert "optimizer.lr=0.0025, and the checkpoint's run used 0.005: training on at 0.5 times" in caplog.text
    first, resumed = learning_rates("first"), learning_rates("resumed")
    assert (
        sorted(resumed) == list(range(10, TOTAL_STEPS)) and max(first) == 10
    )  # step 10 crashed, and is repeated
    assert resumed[10] == pytest.approx(first[10] / 2, rel=1e-12)
    warm_up = int(0.1 * TOTAL_STEPS)  # then the linear decay to 0 at TOTAL_STEPS, at the new base rate
    for step, rate in resumed.items():
        assert rate == pytest.approx(0.0025 * (TOTAL_STEPS - step) / (TOTAL_STEPS - warm_up), rel=1e-9), step


def test_ckpt_path_null_starts_afresh_beside_an_interrupted_checkpoint(task, tmp_path, caplog):
    """ckpt_path=null in a directory holding an unfinished run trains from step 0 and moves that run's
    checkpoints to checkpoints.1: left beside the new run's, Lightning versioned those (last-v1.ckpt,
    best-v1.ckpt) and a later ckpt_path=auto resumed the old run's. In a finished run's directory it
    is refused."""
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="test crash"):
        run_app(task, out, *callback_overrides("crash", Crash, hook="on_train_batch_start", step=2))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["interrupted.ckpt"]
    with caplog.at_level(logging.WARNING, logger="distill_lab.resume"):
        run_app(task, out, "ckpt_path=null", "trainer.max_epochs=1")
    assert (
        f"holds an earlier unfinished run's checkpoints: moved them to {out / 'checkpoints.1'}" in caplog.text
    )
    # from step 0: Lightning's own fit(ckpt_path=None) -> "last" did not pick the interrupted checkpoint
    assert sorted(train_losses(out, version=1)) == list(range(STEPS_PER_EPOCH))
    assert sorted(p.name for p in (out / "checkpoints.1").iterdir()) == ["interrupted.ckpt"]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]
    assert json.loads((out / "results.json").read_text())["best_checkpoint"] == str(
        out / "checkpoints" / "best.ckpt"
    )
    with pytest.raises(ValueError, match=r"holds a finished run \(results\.json\)"):
        run_app(task, out, "ckpt_path=null")


def test_a_run_directory_in_use_by_a_live_process_is_refused_before_anything_trains(
    task, tmp_path, lock_holders
):
    out = tmp_path / "run"
    holder = lock_holders(out)
    for ckpt_path in ("auto", "null"):
        with pytest.raises(RunDirectoryLocked, match=f"process {holder.process.pid} is running there"):
            run_app(task, out, f"ckpt_path={ckpt_path}")
    assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]  # not even config.yaml
    holder.kill()
    run_app(task, out, "trainer.max_epochs=1")  # the lock died with its holder
    assert (out / "results.json").is_file()


# ---------------------------------------------------------------------- 3. non-finite stops


@pytest.mark.parametrize(
    ("part", "named"), [("L3->1", "layer pair L3->1 = nan"), ("output", "output loss = nan")]
)
def test_non_finite_loss_names_step_and_part_and_keeps_finite_checkpoints(task, tmp_path, part, named):
    out = tmp_path / "run"
    with pytest.raises(FloatingPointError) as info:
        run_app(
            task,
            out,
            "checkpoint_every_n_steps=2",
            *callback_overrides("poison", PoisonLoss, part=part, step=5),
        )
    message = str(info.value)
    assert message.startswith(
        f"non-finite loss at step 5 (epoch 0, batch 5): {named}. Training stopped"
    )  # only it
    checkpoints = out / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == [
        "last.ckpt"
    ]  # no interrupted.ckpt of the NaN step
    assert torch.load(checkpoints / "last.ckpt", map_location="cpu", weights_only=True)["global_step"] == 4
    assert all_finite(checkpoints / "last.ckpt") and not (out / "results.json").exists()


def test_non_finite_weights_are_never_checkpointed(task, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(
        FloatingPointError, match=r"non-finite weights at step 4 in student\.bert\.embeddings\."
    ) as info:
        run_app(task, out, "checkpoint_every_n_steps=2", *callback_overrides("inf", InfiniteGradient, step=3))
    assert "no checkpoint was written" in str(info.value)
    checkpoints = out / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["last.ckpt"]
    assert torch.load(checkpoints / "last.ckpt", map_location="cpu", weights_only=True)["global_step"] == 2
    assert all_finite(checkpoints / "last.ckpt")


def test_non_finite_weights_stop_the_run_before_the_next_step(task, tmp_path):
    """Between checkpoints the NaN update stops the run at once (the weights are checked after each update),
    before the next step's loss, naming the checkpoint with the last finite weights."""
    out = tmp_path / "run"
    last = out / "checkpoints" / "last.ckpt"
    with pytest.raises(
        FloatingPointError,
        match=rf"non-finite weights at step 4 in .*last finite weights are in {last} \(step 3\)",
    ):
        run_app(task, out, "checkpoint_every_n_steps=3", *callback_overrides("inf", InfiniteGradient, step=3))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["last.ckpt"]
    assert all_finite(out / "checkpoints" / "last.ckpt")


# ---------------------------------------------------------------------- 4. the pieces


def test_checkpoint_interval_is_one_top_level_option(tmp_path):
    cfg = compose_config(["checkpoint_every_n_steps=7"], tmp_path)
    assert instantiate(cfg.callbacks.last_checkpoint)._every_n_train_steps == 7
    assert compose_config([], tmp_path).ckpt_path == "auto"


def _fake_run(
    root: Path, name: str, overrides: list[str], files: dict[str, int], hydra: list[str] = ()
) -> Path:
    """A run directory with ``.hydra/overrides.yaml`` (and ``hydra.yaml`` listing the ``hydra`` overrides) and
    ``files`` (relative path -> modification time in seconds), as Hydra and a run would leave them: a
    ``.ckpt`` holds a checkpoint of as many steps as its time (``ckpt_path=auto`` reads the step of each),
    the others are empty."""
    run_dir = root / name
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    hydra_overrides = "".join(f"      - {o}\n" for o in ["hydra.mode=RUN", *hydra])
    (run_dir / ".hydra" / "hydra.yaml").write_text(f"hydra:\n  overrides:\n    hydra:\n{hydra_overrides}")
    for relative, mtime in files.items():
        path = run_dir / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".ckpt":
            write_checkpoint(path, mtime)
        else:
            path.touch()
        os.utime(path, (mtime, mtime))
    return run_dir


def write_checkpoint(path: Path, step: int) -> None:
    """A small checkpoint of ``step`` trained steps at ``path``."""
    torch.save({"global_step": step, "state_dict": {}}, path)


def test_a_fresh_start_sets_an_unfinished_runs_checkpoints_aside_but_a_resume_of_its_own_does_not(
    tmp_path, monkeypatch
):
    """resolve_ckpt_path with a run directory holding an unfinished run's checkpoints: ckpt_path=null or a
    checkpoint from elsewhere start a run of their own there (checkpoints/ moved to checkpoints.1, .2...); a
    checkpoint of that directory itself, or Lightning's "last" (no file), resume it (nothing moved)."""
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    run = _fake_run(tmp_path, "run", ["loss=kl"], {"checkpoints/last.ckpt": 100})
    own = run / "checkpoints" / "last.ckpt"
    for ckpt_path in (str(own), "last"):
        assert resolve_ckpt_path(ckpt_path, run) == (ckpt_path, run)
        assert own.is_file()
    elsewhere = (
        _fake_run(tmp_path, "other", ["loss=kl"], {"checkpoints/last.ckpt": 100})
        / "checkpoints"
        / "last.ckpt"
    )
    assert resolve_ckpt_path(str(elsewhere), run) == (str(elsewhere), run)
    assert (run / "checkpoints.1" / "last.ckpt").is_file() and not (run / "checkpoints").exists()
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "interrupted.ckpt").touch()
    assert resolve_ckpt_path(None, run) == (None, run)
    assert (run / "checkpoints.2" / "interrupted.ckpt").is_file() and not (run / "checkpoints").exists()
    assert resolve_ckpt_path(None, run) == (None, run)  # nothing left to move
    assert sorted(p.name for p in run.iterdir() if p.name.startswith("checkpoints")) == [
        "checkpoints.1",
        "checkpoints.2",
    ]


def test_previous_run_is_the_latest_unfinished_one_with_the_same_overrides(tmp_path, monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setenv(
        "DISTILL_LAB_RESUME", "{}"
    )  # restored afterwards: resolve_ckpt_path records its choice
    outputs, same, other = tmp_path / "outputs", ["loss=kl", "seed=1"], ["loss=mse", "seed=1"]
    now = _fake_run(outputs, "2026-01-02/00-05-00", same[::-1], {})  # this run: the same overrides, reordered
    assert find_previous_run(now) is None  # nothing else yet
    old = _fake_run(outputs, "2026-01-01/23-50-00", same, {"checkpoints/last.ckpt": 100})  # before midnight
    _fake_run(outputs, "2026-01-01/23-55-00", other, {"checkpoints/last.ckpt": 300})  # other overrides
    _fake_run(outputs, "2026-01-02/00-01-00", same, {})  # the same command, dead before its first checkpoint
    assert find_previous_run(now)[:2] == (old / "checkpoints" / "last.ckpt", old)
    assert resolve_ckpt_path("auto", now) == (str(old / "checkpoints" / "last.ckpt"), old)
    # the DDP ranks that Lightning launches take rank 0's choice, whatever they would find
    handed_over = os.environ["DISTILL_LAB_RESUME"]
    assert json.loads(handed_over) == {
        "ckpt_path": str(old / "checkpoints" / "last.ckpt"),
        "output_dir": str(old),
    }
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve_ckpt_path("auto", tmp_path / "elsewhere") == (str(old / "checkpoints" / "last.ckpt"), old)
    monkeypatch.setenv("LOCAL_RANK", "0")
    # a directory named with hydra.run.dir= wants a run of its own there, not one found beside it
    named = _fake_run(
        outputs, "2026-01-02/00-06-00", same, {}, hydra=[f"hydra.run.dir={outputs}/2026-01-02/00-06-00"]
    )
    assert find_previous_run(named) is None
    # run.py says whether the directory was named, from its live Hydra config (under torchrun every process
    # writes .hydra/ at once, so the files are not read back then); that answer wins over the files
    assert find_previous_run(now, named=True) is None
    assert find_previous_run(named, named=False)[:2] == (old / "checkpoints" / "last.ckpt", old)
    assert resolve_ckpt_path(None, now) == (None, now)
    elsewhere = tmp_path / "some" / "where.ckpt"
    elsewhere.parent.mkdir()
    write_checkpoint(elsewhere, 100)
    assert resolve_ckpt_path(str(elsewhere), now) == (str(elsewhere), now)
    for name in ("last", "hpc", "registry:my-model", "s3://bucket/run/last.ckpt"):  # Lightning's to resolve
        assert resolve_ckpt_path(name, now) == (name, now)
    for wrong in ("auot", str(tmp_path / "some" / "missing.ckpt")):  # refused before anything loads
        with pytest.raises(ValueError, match=f"ckpt_path={wrong} is no checkpoint file.*auto.*null"):
            resolve_ckpt_path(wrong, now)

    # a Ctrl-C checkpoint of more steps wins over last.ckpt; one of fewer does not, however new
    for step, mtime in ((200, 50), (50, 200)):
        write_checkpoint(old / "checkpoints" / "interrupted.ckpt", step)
        os.utime(old / "checkpoints" / "interrupted.ckpt", (mtime, mtime))
        newest = "interrupted.ckpt" if step == 200 else "last.ckpt"
        assert find_previous_run(now)[0] == old / "checkpoints" / newest

    # a newer run of the same command that finished hides the older unfinished one
    _fake_run(outputs, "2026-01-02/00-03-00", same, {"checkpoints/last.ckpt": 400, "results.json": 401})
    assert find_previous_run(now) is None and resolve_ckpt_path("auto", now) == (None, now)

    # a directory named explicitly (hydra.run.dir) resumes its own unfinished run, whatever its neighbours
    named = _fake_run(tmp_path / "runs", "mine", ["loss=mse"], {"checkpoints/last.ckpt": 10})
    assert find_previous_run(named)[:2] == (named / "checkpoints" / "last.ckpt", named)
    (named / "results.json").touch()  # finished: named again, it is refused (piling a second run onto it)
    with pytest.raises(
        ValueError, match=r"mine holds a finished run \(results\.json\).*Choose another hydra\.run\.dir"
    ):
        find_previous_run(named)
    # and a directory that Hydra does not manage (no .hydra/) has no neighbours to compare with
    assert find_previous_run(tmp_path / "plain") is None

    # a sweep's job continues the same job of a sweep of an earlier date (rerun after midnight)
    sweeps = tmp_path / "multirun"
    job = _fake_run(sweeps, "2026-01-02/00-10-00/1", same, {})
    earlier = _fake_run(sweeps, "2026-01-01/23-00-00/1", same, {"checkpoints/last.ckpt": 100})
    _fake_run(
        sweeps, "2026-01-01/23-00-00/0", other, {"checkpoints/last.ckpt": 200}
    )  # another job of that sweep
    assert find_previous_run(job)[:2] == (earlier / "checkpoints" / "last.ckpt", earlier)


def test_same_overrides_under_an_edited_config_start_afresh(tmp_path, monkeypatch, caplog):
    """A run found by its overrides is resumed only if its saved ``config.yaml`` equals this run's resolved
    config (paths under each run's own directory compared relative to it); a run resumed in its own directory
    under another config is resumed with a warning naming the keys that changed."""
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setenv("DISTILL_LAB_RESUME", "{}")
    outputs, overrides = tmp_path / "outputs", ["loss=kl"]
    old = _fake_run(outputs, "2026-01-01/10-00-00", overrides, {"checkpoints/last.ckpt": 100})
    now = _fake_run(outputs, "2026-01-01/11-00-00", overrides, {})

    def config(run_dir: Path, temperature: float) -> dict:
        paths = {"output_dir": str(run_dir), "cache_dir": f"{run_dir}/.cache"}
        return {"paths": paths, "temperature": temperature, "logger": {"save_dir": f"{run_dir}/csv"}}

    (old / "config.yaml").write_text(yaml.safe_dump(config(old, 3.0)))
    assert config_differences(old, config(now, 3.0)) == []
    assert find_previous_run(now, config(now, 3.0))[:2] == (old / "checkpoints" / "last.ckpt", old)
    assert find_previous_run(now)[:2] == (old / "checkpoints" / "last.ckpt", old)  # nothing to compare with

    # conf/ edited between the two commands: the same overrides, another experiment
    assert config_differences(old, config(now, 2.0)) == ["temperature: 3.0 -> 2.0"]
    with caplog.at_level(logging.WARNING, logger="distill_lab.resume"):
        assert find_previous_run(now, config(now, 2.0)) is None
        assert resolve_ckpt_path("auto", now, config(now, 2.0)) == (None, now)
    assert "starting afresh" in caplog.text and "temperature: 3.0 -> 2.0" in caplog.text

    # a directory of its own is resumed as asked, with the differences named
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="distill_lab.resume"):
        assert find_previous_run(old, config(old, 2.0))[:2] == (old / "checkpoints" / "last.ckpt", old)
    assert "differs from the one it started with: temperature: 3.0 -> 2.0" in caplog.text


def test_auto_resumes_no_run_whose_process_is_alive(tmp_path, monkeypatch, caplog, lock_holders):
    """A run that holds its directory's lock is alive: a second copy of its command starts afresh beside it
    instead of writing into it; killed (SIGKILL), it is resumed. DDP ranks other than 0 lock nothing, so the
    processes that Lightning starts in rank 0's directory are not refused."""
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setenv("DISTILL_LAB_RESUME", "{}")
    outputs, overrides = tmp_path / "outputs", ["loss=kl"]
    first = _fake_run(outputs, "2026-01-01/10-00-00", overrides, {"checkpoints/last.ckpt": 100})
    second = _fake_run(outputs, "2026-01-01/10-00-05", overrides, {})
    holder = lock_holders(first)
    with caplog.at_level(logging.INFO, logger="distill_lab.resume"):
        assert find_previous_run(second) is None
        assert resolve_ckpt_path("auto", second) == (None, second)
    assert (
        f"{first}, the latest run with the same overrides, is still running (process {holder.process.pid}"
        in caplog.text
    )
    assert (second / LOCK_FILE).read_text() == f"{os.getpid()}\n"  # this process now holds its own directory

    # a third copy started in the same second as the second gets the same directory, which is refused
    third = subprocess.run(
        [sys.executable, "-c",
         "import sys; from distill_lab.resume import resolve_ckpt_path; resolve_ckpt_path(None, sys.argv[1])",
         str(second)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert (
        third.returncode != 0
        and f"RunDirectoryLocked: {second} is in use: process {os.getpid()}" in third.stderr
    )

    # a DDP rank other than 0 in a locked directory is one of its run's processes
    monkeypatch.setattr("distill_lab.resume.handover.rank_zero_only.rank", 1)
    assert resolve_ckpt_path(None, first) == (None, first)
    monkeypatch.setattr("distill_lab.resume.handover.rank_zero_only.rank", 0)
    with pytest.raises(RunDirectoryLocked, match=f"process {holder.process.pid} is running there"):
        resolve_ckpt_path("auto", first)

    holder.kill()
    assert find_previous_run(second)[:2] == (first / "checkpoints" / "last.ckpt", first)


def test_a_process_that_torchrun_or_srun_started_beside_rank_zero_resumes_its_directorys_checkpoint(
    tmp_path, monkeypatch
):
    """Under torchrun or srun no rank hands its choice to another: a rank above 0 resolves ``auto`` as rank 0
    does in the named directory such a run has (its newest checkpoint; none: afresh; a finished run:
    an error)."""
    from distill_lab import resume

    for variable in ("TORCHELASTIC_RUN_ID", "SLURM_NTASKS", "SLURM_JOB_NAME", resume.RANK_HANDOVER):
        monkeypatch.delenv(variable, raising=False)
    assert not resume.started_by_a_launcher()
    monkeypatch.setenv("SLURM_NTASKS", "8")
    assert resume.started_by_a_launcher()
    monkeypatch.setenv(
        "SLURM_JOB_NAME", "interactive"
    )  # an allocation for launching by hand (as Lightning reads it)
    assert not resume.started_by_a_launcher()
    monkeypatch.delenv("SLURM_JOB_NAME")
    monkeypatch.setenv("SLURM_NTASKS", "1")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job")
    assert resume.started_by_a_launcher()

    monkeypatch.setattr(resume.handover.rank_zero_only, "rank", 1)
    run = _fake_run(
        tmp_path, "run", ["loss=kl"], {"checkpoints/last.ckpt": 1, "checkpoints/interrupted.ckpt": 2}
    )
    assert resolve_ckpt_path("auto", run) == (str(run / "checkpoints" / "interrupted.ckpt"), run)
    assert not (run / LOCK_FILE).exists()  # rank 0 holds the lock
    empty = tmp_path / "empty"
    assert resolve_ckpt_path("auto", empty) == (None, empty)
    (run / "results.json").write_text("{}")
    with pytest.raises(ValueError, match="holds a finished run"):
        resolve_ckpt_path("auto", run)


def test_sampler_continues_an_epoch_part_way(tmp_path):
    data = list(range(20))
    full = [list(ResumableRandomSampler(data, seed=3, epoch=e)) for e in range(3)]
    assert all(sorted(order) == data for order in full) and len({tuple(o) for o in full}) == 3
    sampler = ResumableRandomSampler(data, seed=3, epoch=1, start=8)
    assert len(sampler) == 20 and list(sampler) == full[1][8:]
    assert list(sampler) == full[1]  # the start applies to one iteration only
    sampler.set_epoch(2)
    assert list(sampler) == full[2]
    assert list(ResumableRandomSampler(data, seed=4)) != full[0]


def test_distributed_sampler_shards_the_same_order_and_continues_each_share_part_way():
    """Process r of 3 visits positions r, r + 3... of the one-process order (padded with its first examples
    to 21, as ``DistributedSampler`` pads), which is ``DistributedSampler``'s order; ``start`` skips the first
    examples of this process's share, once."""
    data = list(range(20))
    full = list(ResumableRandomSampler(data, seed=3, epoch=1))
    shares = [
        list(ResumableDistributedSampler(data, num_replicas=3, rank=r, seed=3, epoch=1)) for r in range(3)
    ]
    padded = full + full[:1]
    assert shares == [padded[r::3] for r in range(3)]
    for r in range(3):
        torch_sampler = torch.utils.data.DistributedSampler(
            data, num_replicas=3, rank=r, shuffle=True, seed=3
        )
        torch_sampler.set_epoch(1)
        assert list(torch_sampler) == shares[r]
    sampler = ResumableDistributedSampler(data, num_replicas=3, rank=1, seed=3, epoch=1, start=4)
    assert len(sampler) == 7 and list(sampler) == shares[1][4:]
    assert list(sampler) == shares[1]
    sampler.set_epoch(2)
    assert list(sampler) == list(ResumableRandomSampler(data, seed=3, epoch=2))[1::3]
