"""Every process of a distributed run resumes the same checkpoint and writes to the same directory.

Rank 0 makes the choice (``resume.previous.resolve_ckpt_path``). Under DDP the processes that Lightning
launches for the other ranks (``LOCAL_RANK`` > 0, started after rank 0 chose) take rank 0's choice, handed
over in the ``DISTILL_LAB_RESUME`` environment variable (:func:`hand_over`, :func:`handed_over`). Processes
that torchrun or srun start all run ``train.py`` side by side (:func:`started_by_a_launcher`), in one named
directory (``run.py`` requires ``hydra.run.dir=`` there): nothing is handed over, and the ranks above 0 make
rank 0's choice themselves, from that directory's own checkpoints, which no process changes before every
process has started.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from lightning.pytorch.utilities import rank_zero_only

RANK_HANDOVER = "DISTILL_LAB_RESUME"


def is_rank_zero() -> bool:
    """Whether this process is rank 0 of its run (the only process of a run that is not distributed)."""
    return rank_zero_only.rank == 0


def hand_over(ckpt_path: str | None, run_dir: Path) -> None:
    """Records rank 0's choice for the DDP ranks that Lightning launches later, which inherit this
    process's environment."""
    os.environ[RANK_HANDOVER] = json.dumps({"ckpt_path": ckpt_path, "output_dir": str(run_dir)})


def handed_over() -> tuple[str | None, Path] | None:
    """Rank 0's ``(checkpoint, run directory)`` in a DDP rank that Lightning launched; None elsewhere."""
    if int(os.environ.get("LOCAL_RANK") or 0) > 0 and RANK_HANDOVER in os.environ:
        chosen = json.loads(os.environ[RANK_HANDOVER])
        return chosen["ckpt_path"], Path(chosen["output_dir"])
    return None


def started_by_a_launcher() -> bool:
    """Whether torchrun or srun started this process as one of a distributed run's processes, each running
    ``train.py`` on its own, rather than Lightning's DDP launcher, which starts the ranks above 0 from rank 0
    after rank 0 chose where to resume (``DISTILL_LAB_RESUME``)."""
    if torch.distributed.is_available() and torch.distributed.is_torchelastic_launched():
        return True
    return int(os.environ.get("SLURM_NTASKS") or 1) > 1 and os.environ.get("SLURM_JOB_NAME") not in (
        "bash",
        "interactive",
    )
