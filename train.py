"""Distil a teacher into a student: ``python train.py [group=option ...]`` (see conf/ and the README)."""

import hydra
from omegaconf import DictConfig

from distill_lab.run import train


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    metrics = train(cfg)
    return metrics.get(cfg.optimized_metric)


if __name__ == "__main__":
    main()
