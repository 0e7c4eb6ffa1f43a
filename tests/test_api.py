"""The public API: every name ``distill_lab`` exports resolves, importing the package loads no training stack,
and the plain PyTorch loop of docs/python-api.md runs as written."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import distill_lab

PYTHON_API = Path(__file__).resolve().parents[1] / "docs" / "python-api.md"


@pytest.mark.parametrize("name", distill_lab.__all__)
def test_every_exported_name_resolves(name):
    value = getattr(distill_lab, name)
    if name != "__version__":
        assert value.__name__ == name


def test_an_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'AttentionDistilationLoss'"):
        distill_lab.AttentionDistilationLoss  # noqa: B018


def test_the_functional_core_loads_no_training_stack():
    """``distill_lab`` and its pure-PyTorch parts import without Lightning, Hydra or wandb (the benchmarks run
    where they are not installed); the training names load them when asked for."""
    code = (
        "import sys, distill_lab\n"
        "from distill_lab import AttentionDistillationLoss, AttentionCapture, kd_loss, layer_map\n"
        "stack = ('lightning', 'hydra', 'omegaconf', 'wandb', 'torchmetrics')\n"
        "heavy = [m for m in stack if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "from distill_lab import DistillationModule\n"
        "assert 'lightning' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_documented_python_loop_runs_and_trains(capsys):
    """docs/python-api.md's plain PyTorch loop, run as written: it ends with the per-pair details of the
    uniform 12 -> 4 map and a finite objective."""
    text = PYTHON_API.read_text()
    section = text.split("## A plain PyTorch loop", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace: dict = {}
    torch.manual_seed(0)
    exec(compile(code, "python-api.md", "exec"), namespace)
    assert sorted(k for k in namespace["details"] if "/" not in k) == ["L11->3", "L2->0", "L5->1", "L8->2"]
    assert torch.isfinite(namespace["loss"])
