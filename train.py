"""Distil a teacher into a student: ``python train.py [group=option ...]`` (see conf/ and the README)."""

import sys

import hydra
from omegaconf import DictConfig

from distill_lab.run import train


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    metrics = train(cfg)
    return metrics.get(cfg.optimized_metric)


if __name__ == "__main__":
    try:
        main()
    except (
        KeyboardInterrupt
    ):  # Trainer.fit and validate stop on Ctrl-C themselves (and save interrupted.ckpt)
        print(
            "\nStopped by Ctrl-C outside training (loading, the built-in teacher's training, the export). Run the "
            "same command again: a distillation run resumes from its newest checkpoint, a built-in teacher trains "
            "from its start.",
            file=sys.stderr,
        )
        sys.exit(130)
