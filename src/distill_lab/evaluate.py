"""Score saved models on a split with the task's metrics: ``distill-lab-eval`` (``python -m
distill_lab.evaluate``), so that an exported or published student can be checked without retraining.

    distill-lab-eval --student outputs/run/student --teacher bert-base-uncased-sst2 \\
        --task sequence_classification --file test.csv --text-column text --label-column label \\
        --batch-size 32 --max-length 128 --output scores.json

The split is a local file (``--file``: csv, tsv, json, jsonl, parquet), a hub dataset (``--dataset``,
``--dataset-config``, ``--split``) or, for images, a folder with a sub-folder per class (``--image-dir``). It
is read, tokenized and batched by the same data modules as a run's validation (``distill_lab.data``,
``data_lm``, ``data_images``), and each model is scored with the task's metrics
(:func:`distill_lab.builtin.evaluate`): the numbers a run reports for the same weights and examples.
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
import sys
from pathlib import Path

import torch
from datasets import Dataset, DatasetDict, load_dataset
from rich.console import Console
from rich.table import Table

from distill_lab.builtin import evaluate
from distill_lab.data import TextClassificationData, load_file
from distill_lab.data_images import ImageFolderData
from distill_lab.data_lm import LanguageModelingData
from distill_lab.data_tokens import TokenClassificationData
from distill_lab.models import load_preprocessor
from distill_lab.tasks import TASKS, get_task, model_label_names

log = logging.getLogger(__name__)
ROLES = ("student", "teacher")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="distill-lab-eval",
        description="Score saved models (a student and/or a teacher: directories or hub names) on a split "
        "with the task's metrics.",
    )
    p.add_argument("--student", "--model", dest="student", help="the model to score (directory or hub name)")
    p.add_argument("--teacher", help="a second model to score beside it, e.g. the teacher")
    p.add_argument("--task", default="sequence_classification", choices=sorted(TASKS))
    source = p.add_argument_group("the split (one of --file, --dataset, --image-dir)")
    source.add_argument("--file", help="a local csv, tsv, json, jsonl or parquet file")
    source.add_argument("--dataset", help="a hub dataset, e.g. glue")
    source.add_argument("--dataset-config", help="its configuration, e.g. sst2")
    source.add_argument("--split", default="validation", help="the hub dataset's split (default: validation)")
    source.add_argument("--image-dir", help="an image folder with one sub-folder per class")
    columns = p.add_argument_group("columns and batching")
    columns.add_argument("--text-column", default="text")
    columns.add_argument("--text-pair-column", help="the second text of a pair (e.g. MNLI's hypothesis)")
    columns.add_argument("--label-column", default="label")
    columns.add_argument("--image-column", default="image")
    columns.add_argument("--tokens-column", default="tokens", help="token_classification: the words")
    columns.add_argument("--tags-column", default="ner_tags", help="token_classification: their tags")
    columns.add_argument(
        "--label-names", help="the data's class names in the model's id order, comma-separated, for a model "
        "whose config names no classes (default: sorted order)"
    )  # fmt: skip
    columns.add_argument("--batch-size", type=int, default=32)
    columns.add_argument("--max-length", type=int, default=128, help="tokens per text (default: 128)")
    columns.add_argument(
        "--seed", type=int, default=42, help="masked_lm: seeds the masks, as a run's seed does (default: 42)"
    )
    p.add_argument("--max-samples", type=int, help="score only the first N examples")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--output", help="also write the scores to this JSON file")
    return p


def load_split(args: argparse.Namespace) -> Dataset:
    """The examples to score, from ``--file``, ``--dataset`` or ``--image-dir``."""
    given = [name for name in ("file", "dataset", "image_dir") if getattr(args, name)]
    if len(given) != 1:
        raise ValueError(
            "give the split as exactly one of --file, --dataset (with --split) or --image-dir"
            + (f", not {' and '.join('--' + n.replace('_', '-') for n in given)}" if given else "")
        )
    if args.file:
        split, where = load_file(args.file), f"--file {args.file}"
    elif args.image_dir:
        if not Path(args.image_dir).is_dir():
            raise ValueError(f"--image-dir {args.image_dir!r} is not a directory")
        split = load_dataset("imagefolder", data_dir=glob.escape(args.image_dir), split="train")
        where = f"--image-dir {args.image_dir}"
    else:
        where = f"--dataset {args.dataset} --split {args.split}"
        try:
            split = load_dataset(args.dataset, args.dataset_config, split=args.split)
        except Exception as err:
            raise ValueError(f"cannot load {where} ({type(err).__name__}: {err})") from err
    task = get_task(args.task)
    needed = {"--image-column": args.image_column}
    if task.name == "token_classification":
        needed = {"--tokens-column": args.tokens_column, "--tags-column": args.tags_column}
    elif task.inputs == "text":
        needed = {"--text-column": args.text_column, "--text-pair-column": args.text_pair_column}
    if task.name.endswith("classification") and task.name != "token_classification":
        needed["--label-column"] = args.label_column
    for option, column in needed.items():
        if column is not None and column not in split.column_names:
            raise ValueError(f"{option} {column!r} is not a column of {where}; columns: {split.column_names}")
    if args.max_samples is not None:
        split = split.select(range(min(args.max_samples, len(split))))
    return split


def load_model(task, name_or_path: str, role: str):
    try:
        return task.auto_class.from_pretrained(name_or_path).eval()
    except (OSError, ValueError) as err:
        raise ValueError(
            f"cannot load --{role} {name_or_path!r} as a {task.name} model "
            f"({task.auto_class.__name__}): {err}"
        ) from err


def data_module(args: argparse.Namespace, split: Dataset, preprocessor, config):
    """The task's data module over ``split`` (its validation split: the same reading, labels, tokenization
    and batching as a run's validation and test), set up."""
    task = get_task(args.task)
    # a data module takes train and validation splits: the train split numbers the classes, so both are it
    splits = DatasetDict(train=split, validation=split)
    common = dict(batch_size=args.batch_size, seed=args.seed)
    if task.inputs == "image":
        data = ImageFolderData(
            splits, preprocessor, image_column=args.image_column, label_column=args.label_column,
            model_labels=model_label_names(config), **common,
        )  # fmt: skip
    elif task.name == "sequence_classification":
        names = args.label_names.split(",") if args.label_names else None
        data = TextClassificationData(
            splits, preprocessor, text_column=args.text_column, text_pair_column=args.text_pair_column,
            label_column=args.label_column, max_length=args.max_length, label_names=names,
            model_labels=model_label_names(config), regression=config.num_labels == 1, **common,
        )  # fmt: skip
    elif task.name == "token_classification":
        names = args.label_names.split(",") if args.label_names else None
        data = TokenClassificationData(
            splits, preprocessor, tokens_column=args.tokens_column, tags_column=args.tags_column,
            max_length=args.max_length, label_names=names, model_labels=model_label_names(config), **common,
        )  # fmt: skip
    else:
        data = LanguageModelingData(
            splits, preprocessor, mlm=task.name == "masked_lm", text_column=args.text_column,
            max_length=args.max_length, **common,
        )  # fmt: skip
    data.setup()
    return data


def score(args: argparse.Namespace) -> dict:
    """``{"task", "source", "examples", "student": {metric: value}, "teacher": {...}}`` for the models
    given."""
    paths = {role: getattr(args, role) for role in ROLES if getattr(args, role)}
    if not paths:
        raise ValueError("give a model to score: --student (or --model) and/or --teacher")
    task = get_task(args.task)
    split = load_split(args)
    models = {role: load_model(task, path, role).to(args.device) for role, path in paths.items()}
    first = next(iter(paths))
    preprocessor = load_preprocessor(paths[first], task.name)
    data = data_module(args, split, preprocessor, models[first].config)
    loader = data.val_dataloader()
    results = {
        "task": task.name,
        "source": args.file or args.image_dir or f"{args.dataset}/{args.dataset_config or ''}:{args.split}",
        "examples": len(data.splits["validation"]),
    }
    for role, model in models.items():
        results[role] = evaluate(model, loader, task.name)
    return results


def print_scores(results: dict) -> None:
    roles = [role for role in ROLES if role in results]
    table = Table(title=f"{results['task']} on {results['source']} ({results['examples']} examples)")
    table.add_column("")
    for role in roles:
        table.add_column(role, justify="right")
    for name in results[roles[0]]:
        table.add_row(name, *(f"{results[role].get(name, float('nan')):.4f}" for role in roles))
    Console().print(table)


def main(argv: list[str] | None = None) -> None:
    """The command: parse ``argv`` (the command line where None), score (:func:`score`), print the table
    and, with ``--output``, write the scores as JSON. A wrong argument, file, column or model exits with
    status 2 and a message that names it."""
    p = parser()
    args = p.parse_args(argv)
    try:
        results = score(args)
    except ValueError as err:
        p.error(str(err))
    print_scores(results)
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    main()
