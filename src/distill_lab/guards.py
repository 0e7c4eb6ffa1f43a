"""Non-finite weights: which parameters hold a NaN or an infinity, and how to name them in a message."""

from __future__ import annotations

import torch


def non_finite_parameters(module: torch.nn.Module) -> list[str]:
    """Names of the trainable parameters holding a NaN or an infinity (the frozen teacher cannot turn so)."""
    return [name for name, p in module.named_parameters() if p.requires_grad and not torch.isfinite(p).all()]


def describe_names(names: list[str], limit: int = 3) -> str:
    """``a, b, c and 4 more``."""
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more
