"""Image-classification data for ``task=image_classification`` (ViT and other image transformers).

:class:`ImageFolderData` reads an image folder with one sub-folder per class (``train/cat/1.png``) through
the ``datasets`` ``imagefolder`` builder, or takes any DatasetDict with an image and a label column (e.g.
:func:`~distill_lab.data.hub_dataset` for ``cifar10``), and turns images into ``pixel_values`` with the
teacher's image processor (resizing and normalisation as the teacher was trained).
"""

from __future__ import annotations

import glob
from collections.abc import Callable
from pathlib import Path

import torch
from datasets import ClassLabel, DatasetDict, load_dataset

from distill_lab.data import check_both_splits, class_ids
from distill_lab.data_module import TrainValidationData


def synthetic_stripes(
    num_train: int = 1000, num_validation: int = 200, size: int = 32, seed: int = 0
) -> DatasetDict:
    """The built-in offline image task: ``size`` x ``size`` RGB images of horizontal or vertical stripes of
    random widths under noise (labels ``horizontal``, ``vertical``), for ``task=image_classification``."""
    import numpy as np
    from datasets import Dataset, Features, Image

    rng = np.random.default_rng(seed)
    features = Features({"image": Image(), "label": ClassLabel(names=["horizontal", "vertical"])})

    def split(count: int) -> Dataset:
        images, labels = [], []
        for _ in range(count):
            label = int(rng.integers(2))
            stripes = (np.arange(size) // rng.integers(2, 6) % 2 * 180).astype(np.float32)
            plane = np.broadcast_to(stripes[:, None] if label == 0 else stripes[None, :], (size, size))
            pixels = plane[..., None] * rng.uniform(0.5, 1.0, 3) + rng.normal(0, 25, (size, size, 3))
            images.append(np.clip(pixels, 0, 255).astype(np.uint8))
            labels.append(label)
        return Dataset.from_dict({"image": images, "label": labels}, features=features)

    return DatasetDict(train=split(num_train), validation=split(num_validation))


def image_folders(
    train_dir: str | Path | None = None,
    validation_dir: str | Path | None = None,
    test_dir: str | Path | None = None,
) -> DatasetDict:
    """``train`` and ``validation`` splits from two image folders (one sub-folder per class, same names), and
    a held-out ``test`` split from ``test_dir`` where it is given.

    Raises:
        ValueError: A folder is not given (Hydra leaves an unset ``???`` out of a partial's arguments) or does
            not exist.
    """
    folders = {"train": train_dir, "validation": validation_dir}
    check_both_splits(folders, "dir", "an image folder with one sub-folder per class", "images/{split}")
    if test_dir is not None:
        folders["test"] = test_dir
    splits = {}
    for split, directory in folders.items():
        if not Path(directory).is_dir():
            raise ValueError(
                f"data.dataset.{split}_dir={str(directory)!r} is not a directory; give an image folder with "
                "one sub-folder per class"
            )
        # data_dir is a glob pattern to datasets: a folder named images[1] would read images1
        splits[split] = load_dataset("imagefolder", data_dir=glob.escape(str(directory)), split="train")
    return DatasetDict(splits)


class ImageFolderData(TrainValidationData):
    """Batches of ``pixel_values`` and ``labels``.

    Args:
        dataset: Train and validation splits with an image column and a label column: a ``ClassLabel``, as
            :func:`image_folders` gives, or ints or strings as for text classification (see
            :class:`~distill_lab.data_module.TrainValidationData` for it and for ``batch_size``,
            ``eval_batch_size``, ``num_workers``, ``max_train_samples``, ``max_eval_samples``, ``seed``).
        image_processor: The teacher's image processor; may be assigned before :meth:`setup`.
        image_column, label_column: Column names.
        model_labels, match_label_names: The teacher's class names and whether the data's classes are mapped
            to them by name (:func:`~distill_lab.data.class_ids`).
    """

    def __init__(
        self,
        dataset: DatasetDict | Callable[[], DatasetDict],
        image_processor=None,
        image_column: str = "image",
        label_column: str = "label",
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        max_train_samples: int | None = None,
        max_eval_samples: int | None = None,
        seed: int = 0,
        model_labels: list[str] | None = None,
        match_label_names: bool = True,
    ) -> None:
        super().__init__(
            dataset, batch_size, eval_batch_size, num_workers, max_train_samples, max_eval_samples, seed
        )
        self.image_processor = image_processor
        self.model_labels = model_labels
        self.match_label_names = match_label_names
        self.image_column = image_column
        self.label_column = label_column
        self.label_names: list[str] | None = None
        self.label_ids: dict | None = None  # raw label value -> class id, set by setup()

    @property
    def num_labels(self) -> int:
        if self.label_names is None:
            raise RuntimeError("num_labels is known only after ImageFolderData.setup()")
        return len(self.label_names)

    def setup(self, stage: str | None = None) -> None:
        """Load, check and subsample the images (processed lazily, batch by batch); labels are mapped to class
        ids as for text classification (:func:`~distill_lab.data.class_ids`).

        Raises:
            ValueError: No image processor is set, a split or column is missing, or the labels are unusable.
        """
        if self.splits is not None:
            return
        if self.image_processor is None:
            raise ValueError(
                "ImageFolderData has no image processor: set its `image_processor` before setup()"
            )
        raw = self.load_splits({"image_column": self.image_column, "label_column": self.label_column})
        self.label_names, self.label_ids = class_ids(  # before any subsampling
            raw, self.label_column, self.model_labels, self.match_label_names
        )
        self.splits = self.subsample(raw)  # images are processed lazily, batch by batch

    def collator(self, split: str):
        return self.collate

    def collate(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        images = [row[self.image_column].convert("RGB") for row in rows]
        pixel_values = self.image_processor(images, return_tensors="pt")["pixel_values"]
        labels = torch.tensor([self.label_ids[row[self.label_column]] for row in rows])
        return {"pixel_values": pixel_values, "labels": labels}
