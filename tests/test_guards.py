"""The guards every fit registers (``distill_lab.guards``): a run whose configured callbacks are all removed
still stops on a non-finite loss, the module adds each guard once, and a resumed optimizer is rescaled to the
rate it was built with."""

from __future__ import annotations

import functools
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from conftest import CONF_DIR, compose_config, make_text_task, make_tiny_inputs, make_tiny_model
from omegaconf import OmegaConf
from test_resume import PoisonLoss
from transformers import get_linear_schedule_with_warmup

from distill_lab.attention import AttentionDistillationLoss
from distill_lab.guards import RescaleResumedLearningRate, StopOnNonFiniteLoss
from distill_lab.module import DistillationModule
from distill_lab.run import train

pytestmark = pytest.mark.usefixtures("torch_single_thread")


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return make_text_task(tmp_path_factory.mktemp("task"))


def test_a_run_without_its_configured_callbacks_still_stops_on_a_non_finite_loss(task, tmp_path, monkeypatch):
    """Every entry of ``callbacks=`` set to null (the checkpoints too), one callback of the user's added: the
    stop before the update of a non-finite loss is no entry there, and still names the step and the part."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    entries = OmegaConf.load(CONF_DIR / "callbacks" / "default.yaml")
    overrides = [
        *task["overrides"], "student=from_teacher", "student.num_layers=2", "debug=fast", "logger=csv",
        "fused_kernel=false", *(f"callbacks.{name}=null" for name in entries),
        f"+callbacks.poison._target_={PoisonLoss.__module__}.PoisonLoss", "+callbacks.poison.part=output",
        "+callbacks.poison.step=2",
    ]  # fmt: skip
    cfg = compose_config(overrides, tmp_path / "run")
    assert [name for name, entry in cfg.callbacks.items() if entry] == ["poison"]
    with pytest.raises(FloatingPointError) as info:
        train(cfg)
    assert str(info.value).startswith("non-finite loss at step 2 (epoch 0, batch 2): output loss = nan.")


def _fit(tmp_path, callbacks: list, steps: int = 1) -> tuple[L.Trainer, DistillationModule]:
    """A tiny module fitted ``steps`` optimizer steps, then validated; ``callbacks`` go to the trainer."""
    teacher = make_tiny_model("bert", tmp_path / "teacher")
    student = make_tiny_model("bert", tmp_path / "student", seed=1)
    module = DistillationModule(
        teacher,
        student,
        AttentionDistillationLoss("kl", "layerwise", [(0, 0)]),
        functools.partial(torch.optim.SGD, lr=0.1),
        warmup_ratio=0.0,
    )
    batch = {**make_tiny_inputs("bert", teacher.config), "labels": torch.tensor([0, 1])}
    loader = torch.utils.data.DataLoader([batch], batch_size=None)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=steps, callbacks=callbacks, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
    )  # fmt: skip
    trainer.fit(module, loader, loader)
    trainer.validate(module, loader, verbose=False)
    return trainer, module


def test_the_module_registers_each_guard_once(tmp_path):
    """Fitted, then validated with the same trainer, the module has added each guard once; a guard the
    trainer was given is kept, not doubled."""
    trainer, _ = _fit(tmp_path / "plain", [])
    kinds = [type(c) for c in trainer.callbacks]
    assert kinds.count(StopOnNonFiniteLoss) == 1 and kinds.count(RescaleResumedLearningRate) == 1
    given = StopOnNonFiniteLoss()
    trainer, _ = _fit(tmp_path / "given", [given])
    stops = [c for c in trainer.callbacks if isinstance(c, StopOnNonFiniteLoss)]
    assert stops == [given]
    assert [type(c) for c in trainer.callbacks].count(RescaleResumedLearningRate) == 1


def test_a_resumed_schedule_is_rescaled_to_the_rate_the_optimizer_was_built_with(caplog):
    """The optimizer built at 0.05 loads the state of one built at 0.1 (halfway through its warm-up): the
    base rate becomes 0.05 and the current rate halves, the schedule's position kept. ``defaults["lr"]`` is
    the configured rate, which loading the state leaves as it was built."""
    weight = torch.nn.Parameter(torch.zeros(2))

    def schedule(lr: float):
        optimizer = torch.optim.AdamW([weight], lr=lr)
        return optimizer, get_linear_schedule_with_warmup(optimizer, 4, 10)

    old_optimizer, old_scheduler = schedule(0.1)
    for _ in range(2):
        old_optimizer.step(), old_scheduler.step()
    optimizer, scheduler = schedule(0.05)
    optimizer.load_state_dict(old_optimizer.state_dict())
    scheduler.load_state_dict(old_scheduler.state_dict())
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.05) and optimizer.defaults["lr"] == 0.05
    trainer = SimpleNamespace(lr_scheduler_configs=[SimpleNamespace(scheduler=scheduler)])
    RescaleResumedLearningRate().on_train_start(trainer, None)
    assert scheduler.base_lrs == [0.05] and optimizer.param_groups[0]["initial_lr"] == 0.05
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.025)
    assert "optimizer.lr=0.05, and the checkpoint's run used 0.1: training on at 0.5 times" in caplog.text
    scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.05 * 3 / 4)
    RescaleResumedLearningRate().on_train_start(trainer, None)  # a fresh run's: nothing to change
    assert scheduler.base_lrs == [0.05]
