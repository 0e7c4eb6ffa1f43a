"""The random state a resumed run continues with.

Lightning checkpoints hold no random-number-generator state, so a resumed run would draw different dropout
masks than the uninterrupted one. :func:`rng_state` and :func:`set_rng_state` save and restore every generator
training draws from (``callbacks.ResumeRandomState`` keeps them in the checkpoints).
"""

from __future__ import annotations

import random

import numpy as np
import torch


def rng_state() -> dict:
    """The state of every random number generator training draws from: torch (CPU and CUDA), numpy, Python.

    Tensors, lists and numbers only, so that ``torch.load(..., weights_only=True)`` (the default that
    Lightning's resume uses) reads the checkpoint.
    """
    name, keys, position, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, gauss],
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` returned (the CUDA part only where this process uses CUDA)."""
    torch.set_rng_state(state["torch"])
    name, keys, position, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
