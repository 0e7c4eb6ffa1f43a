"""distill-lab: attention-based knowledge distillation for Hugging Face transformers."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("distill-lab")
except PackageNotFoundError:  # the source tree on the path without an install (PYTHONPATH=src)
    __version__ = "0+unknown"
