"""TinyBERT's two stages of task distillation in one run: the intermediate layers first, then the
predictions.

TinyBERT distils a task in two stages: first the intermediate layers alone (attention, hidden states and
embeddings: no output loss), then the predictions alone (the soft targets). ``TwoStageDistillation``
switches the module's objective weights at a share of the run's optimizer steps:

- intermediate stage: ``attention_weight = 1`` (``L = L_attention + w_h * L_hidden``, the output loss off);
- prediction stage: ``attention_weight = 0`` and ``hidden_weight = 0`` (``L = L_output``).

The stage follows from the optimizer step alone, so a resumed run is in the stage the interrupted one was.
"""

from __future__ import annotations

import logging

import lightning as L

log = logging.getLogger(__name__)


class TwoStageDistillation(L.Callback):
    """The intermediate stage for the first ``intermediate_share`` of the optimizer steps, the prediction
    stage for the rest; the stage is logged as ``train/stage`` (0 intermediate, 1 prediction).

    Args:
        intermediate_share: the share of the run's optimizer steps (``trainer.estimated_stepping_batches``)
            that the intermediate stage takes, in (0, 1).
    """

    def __init__(self, intermediate_share: float = 0.5) -> None:
        if not 0.0 < intermediate_share < 1.0:
            raise ValueError(
                f"intermediate_share must be in (0, 1) (the intermediate stage's share of the steps); got "
                f"{intermediate_share}"
            )
        self.intermediate_share = intermediate_share
        self._hidden_weight: float | None = None
        self._stage: int | None = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._hidden_weight = pl_module.hparams.get("hidden_weight")
        self._stage = None

    def switch_step(self, trainer: L.Trainer) -> int:
        """The first optimizer step of the prediction stage."""
        return max(1, round(self.intermediate_share * trainer.estimated_stepping_batches))

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx
    ) -> None:
        stage = int(trainer.global_step >= self.switch_step(trainer))
        if stage != self._stage:
            self._stage = stage
            pl_module.hparams.attention_weight = 0.0 if stage else 1.0
            if self._hidden_weight is not None:
                pl_module.hparams.hidden_weight = 0.0 if stage else self._hidden_weight
            name = "prediction (output loss only)" if stage else "intermediate (attention and hidden states)"
            log.info("step %d: the %s stage", trainer.global_step, name)
        pl_module.log("train/stage", float(stage))
