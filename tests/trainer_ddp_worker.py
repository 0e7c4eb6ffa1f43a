"""One process of ``torchrun --nproc_per_node=2 trainer_ddp_worker.py OUT``: ``DistillationTrainer`` takes one
SGD step under DDP (gloo, CPU) on the four examples of ``test_trainer``'s batch, two per process, and rank 0
saves the student's weights and the training log to ``OUT`` for ``test_trainer.py`` to compare with one
process on all four."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from test_trainer import _one_step

if __name__ == "__main__":
    out = Path(sys.argv[1])
    rank = int(os.environ["RANK"])
    weights, log, world = _one_step(out / f"rank{rank}", 2, 1, ddp_backend="gloo")
    if rank == 0:
        torch.save(weights, out / "weights.pt")
        (out / "log.json").write_text(json.dumps({**log, "world_size": world}))
