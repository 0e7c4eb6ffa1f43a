"""Faults at the command line: a refused command aimed at another run's directory, two commands started in
the same second, SIGTERM and Ctrl-C mid-training, and setup errors (a negative learning rate, a
``data.max_length`` past the teacher's positions).

The CLI tests run ``python train.py`` on a tiny random teacher and a small CSV task
(``conftest.make_text_task``), a few steps each; they start Python, torch and transformers, hence ``slow``.
"""

from __future__ import annotations

import logging
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import (
    CONF_DIR,
    TrainRun,
    app_env,
    callback_overrides,
    compose_config,
    make_text_task,
    run_to_end,
    train_py,
)
from test_resume import Pace

FAST = ["debug=fast", "student=from_teacher", "student.num_layers=2", "logger=csv"]
NO_MAPS = ["callbacks.attention_maps=null"]


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return make_text_task(tmp_path_factory.mktemp("faults-cli-task"))


def cli(tmp_path: Path, *args: str, fails: bool = False) -> subprocess.CompletedProcess:
    """``python train.py *args`` to its end (``run_to_end``), the app's environment kept in ``tmp_path``."""
    return run_to_end(train_py(*args), app_env(tmp_path), timeout=300, fails=fails)


def snapshot(run_dir: Path) -> dict[str, bytes]:
    """Every file below ``run_dir`` and its bytes, the lock file included: the run that wrote it has ended,
    and a refused command must not write even its own process id there."""
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


def overrides_of(run_dir: Path) -> list[str]:
    return yaml.safe_load((run_dir / ".hydra" / "overrides.yaml").read_text())


# ------------------------------------------------------------------------------- another run's directory


@pytest.mark.slow
def test_a_refused_command_leaves_the_finished_run_it_names_untouched(task, tmp_path):
    """``hydra.run.dir=<a finished run>`` is refused, and the finished run's records (Hydra's ``.hydra/``,
    ``config.yaml``, its log, its checkpoints) stay byte for byte as that run wrote them."""
    run_dir = tmp_path / "finished"
    cli(tmp_path, *task["overrides"], *FAST, *NO_MAPS, f"hydra.run.dir={run_dir}")
    before = snapshot(run_dir)
    assert {".hydra/overrides.yaml", ".hydra/config.yaml", ".hydra/hydra.yaml", "results.json"} <= set(before)

    refused = cli(
        tmp_path, *task["overrides"], *FAST, *NO_MAPS, "seed=1", "alpha=0.9", f"hydra.run.dir={run_dir}",
        fails=True,
    )  # fmt: skip
    assert f"{run_dir} holds a finished run" in refused.stderr, refused.stderr[-3000:]
    assert snapshot(run_dir) == before
    assert "seed=1" not in overrides_of(run_dir)


@pytest.mark.slow
def test_a_sweep_into_an_existing_sweep_directory_does_not_relabel_its_jobs(task, tmp_path):
    """A second ``-m`` sweep given the first's ``hydra.sweep.dir`` is refused in the jobs that finished
    there: job 0 keeps its overrides (``loss=kl``), ``summarize`` shows it as the kl run it was, and the
    sweep's ``multirun.yaml`` (which Hydra writes before any job starts) is the first sweep's again."""
    from distill_lab.summarize import collect

    sweep = tmp_path / "sweep"
    common = [*task["overrides"], *FAST, *NO_MAPS, f"hydra.sweep.dir={sweep}"]
    cli(tmp_path, "-m", "loss=kl", *common)
    before = snapshot(sweep)  # its jobs and Hydra's record of the sweep, multirun.yaml
    assert "loss=kl" in overrides_of(sweep / "0")

    second = cli(tmp_path, "-m", "loss=cosine", *common, fails=True)
    assert f"{sweep / '0'} holds a finished run" in second.stderr, second.stderr[-3000:]
    assert snapshot(sweep) == before
    (row,) = collect(sweep)
    assert row["overrides"]["loss"] == "kl"


SAME_SECOND = """\
import datetime, sys
import hydra.core.utils

class SameSecond(datetime.datetime):
    # a clock on which every command starts at 12:00:00 on 2030-01-01, a fraction of a second apart
    @classmethod
    def now(cls, tz=None):
        return datetime.datetime.now(tz).replace(year=2030, month=1, day=1, hour=12, minute=0, second=0)

hydra.core.utils.datetime = SameSecond  # Hydra's ${now:...} resolver reads this
from distill_lab.cli import main
main(config_path=sys.argv.pop(1))
"""


@pytest.mark.slow
def test_two_commands_started_in_the_same_second_get_their_own_directories(task, tmp_path):
    """Hydra names a run's directory by the clock: two different commands started within one second each get
    a directory of their own, and each directory's records are its own command's."""
    clock = tmp_path / "same_second.py"
    clock.write_text(SAME_SECOND)
    args = [*task["overrides"], *FAST, *NO_MAPS]
    for extra in (["seed=42", "alpha=0.3"], ["seed=1", "alpha=0.9"]):
        command = [sys.executable, str(clock), str(CONF_DIR), *args, *extra]
        result = subprocess.run(
            command, cwd=tmp_path, env=app_env(tmp_path), capture_output=True, text=True, timeout=300
        )
        assert result.returncode == 0, result.stderr[-4000:]
    runs = sorted(tmp_path.glob("outputs/2030-01-01/*"))
    assert len(runs) == 2 and all(r.name.startswith("12-00-00") for r in runs), runs
    by_seed = {}
    for run in runs:
        config = yaml.safe_load((run / "config.yaml").read_text())
        by_seed[config["seed"]] = (config["alpha"], overrides_of(run), (run / "results.json").is_file())
    assert by_seed[42] == (0.3, [*args, "seed=42", "alpha=0.3"], True)
    assert by_seed[1] == (0.9, [*args, "seed=1", "alpha=0.9"], True)


# ------------------------------------------------------------------------------------------------ signals


@pytest.mark.slow
@pytest.mark.parametrize(("signum", "status"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_mid_training_saves_exits_non_zero_and_the_rerun_resumes(task, tmp_path, signum, status):
    """SIGTERM (``timeout``, SLURM preemption, Kubernetes) and SIGINT (Ctrl-C) mid-training write
    ``interrupted.ckpt`` and end with 128 + the signal's number, so that what started the run knows it did
    not finish; the same command again resumes from the checkpoint and finishes."""
    run_dir = tmp_path / "run"
    command = [
        *task["overrides"], "student=from_teacher", "student.num_layers=2", "logger=csv", *NO_MAPS,
        "data.batch_size=8", "trainer.max_epochs=2", "trainer.num_sanity_val_steps=0",
        "checkpoint_every_n_steps=2", *callback_overrides("pace", Pace, seconds=0.3),
        f"hydra.run.dir={run_dir}",
    ]  # fmt: skip
    run = TrainRun(train_py(*command), env=app_env(tmp_path), log=tmp_path / "first.log")
    run.wait_for_checkpoint(min_step=2, last=run_dir / "checkpoints" / "last.ckpt")
    run.process.send_signal(signum)
    returncode, output = run.wait(120), run.output()
    assert returncode == status, output[-3000:]
    assert "Run the same command again" in output and "Traceback" not in output, output[-3000:]
    interrupted = run_dir / "checkpoints" / "interrupted.ckpt"
    step = torch.load(interrupted, map_location="cpu", weights_only=True)["global_step"]
    assert 2 <= step < 16 and not (run_dir / "results.json").exists()

    if signum == signal.SIGINT:  # resuming from it is tested for Ctrl-C in test_resume.py
        return
    rerun = TrainRun(train_py(*command), env=app_env(tmp_path), log=tmp_path / "second.log")
    assert rerun.wait() == 0, rerun.output()[-3000:]
    assert "Restored all states from the checkpoint at" in rerun.output()
    final = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert final["global_step"] == 16 and (run_dir / "results.json").is_file()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("signum", "status", "message"),
    [(signal.SIGTERM, 143, "Stopped by SIGTERM"), (signal.SIGINT, 130, "Stopped by Ctrl-C outside training")],
)
def test_a_signal_while_the_builtin_teacher_trains_exits_with_a_message(tmp_path, signum, status, message):
    """A signal outside ``Trainer.fit`` (here the built-in teacher's training on first use) ends the command
    with 128 + the signal's number and a message saying what a rerun does, not 0 or a traceback (from torch,
    for a KeyboardInterrupt), and caches no half-trained teacher."""
    run = TrainRun(
        train_py("logger=csv", f"hydra.run.dir={tmp_path / 'run'}"),
        env=app_env(tmp_path),
        log=tmp_path / "log",
    )
    deadline = time.monotonic() + 240
    while "teacher epoch 1:" not in run.output():
        assert run.process.poll() is None and time.monotonic() < deadline, run.output()[-3000:]
        time.sleep(0.2)
    run.process.send_signal(signum)
    returncode, output = run.wait(120), run.output()
    assert returncode == status, output[-3000:]
    assert message in output and "Run the same command again" in output, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    assert not (tmp_path / "cache" / "builtin-sequence_classification-v2" / "config.json").exists()


# ------------------------------------------------------------------------------------------- setup errors


@pytest.mark.slow
def test_a_negative_learning_rate_is_refused_naming_the_key_before_anything_is_written(task, tmp_path):
    run_dir = tmp_path / "run"
    result = cli(
        tmp_path, *task["overrides"], *FAST, "optimizer.lr=-1", f"hydra.run.dir={run_dir}", fails=True
    )
    assert re.search(r"optimizer\.lr=-1\b", result.stderr), result.stderr[-3000:]
    assert result.stderr.count('File "') <= 5, result.stderr[-3000:]  # a short traceback, not Lightning's
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "config.yaml").exists()


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("optimizer.lr=-1", r"optimizer\.lr=-1 must be above 0"),
        ("optimizer.weight_decay=-0.5", r"optimizer \(torch\.optim\.AdamW\).*weight_decay.*-0\.5"),
        ("+optimizer.betas=[0.9,1.5]", r"optimizer \(torch\.optim\.AdamW\).*betas.*1\.5"),
    ],
)
def test_the_optimizer_is_built_and_checked_before_the_run_directory(task, tmp_path, setting, message):
    """The optimizer is built on a stand-in parameter before the run takes its directory: what torch refuses
    is named with the ``optimizer.`` settings, and nothing is written."""
    from distill_lab.run import train

    out = tmp_path / "run"
    cfg = compose_config([*task["overrides"], *FAST, setting], out)
    with pytest.raises(ValueError, match=message):
        train(cfg)
    assert not out.exists()


def test_max_length_defaults_to_the_teachers_position_limit(task, tmp_path, caplog):
    """Without ``data.max_length`` a run takes the smaller of 128 and the teacher's positions (64 here, as the
    built-in teacher's), and says so; an explicit length past them is refused, naming it."""
    from distill_lab import builtin, run

    assert builtin.TEACHER_CONFIG["max_position_embeddings"] == 64  # the built-in teacher's, as this one's
    overrides = [o for o in task["overrides"] if not o.startswith("data.max_length=")]
    cfg = compose_config([*overrides, *FAST], tmp_path / "run")
    assert cfg.data.max_length is None  # the default: chosen once the teacher is loaded
    task_ = run.instantiate(cfg.task)
    with caplog.at_level(logging.INFO, logger="distill_lab.run"):
        teacher, _, data = run._load(cfg, task_)
    assert cfg.data.max_length == 64 and data.max_length == 64
    assert "data.max_length=64: the teacher" in caplog.text and "128" in caplog.text

    cfg = compose_config([*overrides, *FAST, "data.max_length=128"], tmp_path / "run2")
    with pytest.raises(ValueError, match=r"data\.max_length=128, but the teacher .* for 64 tokens"):
        run._load(cfg, task_)
