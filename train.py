"""Distil a teacher into a student: ``python train.py [group=option ...]`` (see conf/ and the README).

The same command as the installed ``distill-lab`` (``distill_lab.cli``), with the ``conf/`` beside this file.
"""

from pathlib import Path

from distill_lab.cli import main

if __name__ == "__main__":
    main(config_path=Path(__file__).resolve().parent / "conf")
