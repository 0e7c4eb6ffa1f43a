"""The held-out test split, evaluated once at the end of a run: the ``test_step`` of
``DistillationModule`` (a mixin, so that the module itself stays about distillation) and
:func:`held_out_scores`, which runs it on the best checkpoint through ``Trainer.test``.

Student and teacher are scored with the task's metrics (``distill_lab.tasks``) under the prefixes ``test/``
and ``test/teacher_``. As in validation, every example counts once under DDP and FSDP, where Lightning's
sampler repeats the first examples to give each process as many (``distill_lab.repeats``).
"""

from __future__ import annotations

from collections.abc import Mapping

import lightning as L
import torch
from torch import Tensor

from distill_lab.repeats import batch_size, select_rows, unrepeated_rows

STUDENT_PREFIX, TEACHER_PREFIX = "test/", "test/teacher_"


class HeldOutTest:
    """``test_step`` and its epoch hooks for a LightningModule with ``task``, ``student``, ``teacher`` and
    their attention captures (``student_capture``, ``teacher_capture``): the two models' forwards, no loss."""

    def on_test_epoch_start(self) -> None:
        classes = self.task.num_classes(self.student.config)
        self.test_metrics = torch.nn.ModuleDict(
            {
                "student": self.task.metrics(STUDENT_PREFIX, classes),
                "teacher": self.task.metrics(TEACHER_PREFIX, classes),
            }
        ).to(self.device)

    @torch.no_grad()
    def test_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> None:
        # the forward of the whole batch in every process (under FSDP each joins the others' parameter
        # gathers); the metrics then take this process's own rows only
        real = unrepeated_rows(self.trainer.test_dataloaders, batch_idx, batch_size(batch))
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        logits = {
            "teacher": self.teacher_capture(**inputs)[0].logits,
            "student": self.student_capture(**inputs)[0].logits,
        }
        if real is not None:
            real = real.to(self.device)
            batch = select_rows(batch, real)
            logits = {role: values[real] for role, values in logits.items()}
        if len(logits["student"]):  # a metric update of no rows fails
            for role, values in logits.items():
                self.task.update(self.test_metrics[role], values, batch)

    def on_test_epoch_end(self) -> None:
        # the metrics sync themselves across processes, so every process logs the same values
        for metrics in self.test_metrics.values():
            self.log_dict(metrics.compute(), sync_dist=True)
            metrics.reset()


def held_out_scores(trainer: L.Trainer, module: L.LightningModule, data) -> dict | None:
    """Student and teacher scored on the held-out ``test`` split with the module's weights as they are (the
    export calls it after the best checkpoint's validation has loaded them; loading a checkpoint again would
    fail under FSDP, whose wrapped module takes no whole state dict): ``{"student": {metric: value},
    "teacher": {...}, "examples": N}``; None where the data holds no test split. The loggers get the values
    under ``test/`` at the last step, as one point."""
    if not getattr(data, "has_test", False):
        return None
    loggers, trainer.loggers = trainer.loggers, []
    try:
        scores = trainer.test(module, datamodule=data, verbose=False)[0]
    finally:
        trainer.loggers = loggers
    for each in loggers:
        each.log_metrics(dict(scores), step=trainer.global_step)
        each.save()
    teacher = {k.removeprefix(TEACHER_PREFIX): v for k, v in scores.items() if k.startswith(TEACHER_PREFIX)}
    student = {
        k.removeprefix(STUDENT_PREFIX): v
        for k, v in scores.items()
        if k.startswith(STUDENT_PREFIX) and not k.startswith(TEACHER_PREFIX)
    }
    return {"student": student, "teacher": teacher, "examples": len(data.splits["test"])}
