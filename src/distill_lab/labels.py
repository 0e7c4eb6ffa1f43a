"""Class labels of a classification dataset (text and images alike): :func:`class_ids` numbers its classes
as the teacher numbers them where it can tell (the teacher's names, the data's own ids, ``data.label_names``)
and in sorted order, with a warning, where it cannot (:func:`sorted_numbering`)."""

from __future__ import annotations

import logging

from datasets import ClassLabel, DatasetDict

log = logging.getLogger(__name__)


def class_ids(
    raw: DatasetDict,
    label_column: str,
    model_labels: list[str] | None = None,
    match_label_names: bool = True,
    label_names: list[str] | None = None,
) -> tuple[list[str], dict]:
    """The class names of a classification dataset and the mapping from its raw label values to class ids,
    shared by text and image classification.

    - a ``ClassLabel`` (glue, an image folder's sub-folders): its own names and ids; a validation split with a
      ``ClassLabel`` must have the same classes.
    - strings: the train split's values, sorted (as numbers where all are whole numbers: ``"2"`` before
      ``"10"``), with a warning that names the mapping (:func:`sorted_numbering`); or in the order of
      ``label_names`` where it is given.
    - ints: the ids themselves, names ``"0"`` to the largest id in either split.

    Where the model (the teacher) names its classes, named classes (a ``ClassLabel`` or strings) are then
    mapped to the model's ids by name, ignoring case: MNLI's ``entailment, neutral, contradiction`` against a
    teacher whose ``id2label`` reads ``CONTRADICTION, NEUTRAL, ENTAILMENT`` swaps ids 0 and 2, where a
    positional reading would teach (and score) the student against swapped labels. Int labels carry no names
    and stay positional.

    Args:
        raw: ``train`` and ``validation`` splits (and ``test``, where there is one), each with
            ``label_column`` (before any subsampling: a subset may miss a class).
        label_column: The label column (``data.label_column``).
        model_labels: The model's class names in id order (:func:`~distill_lab.tasks.model_label_names`), or
            None where the model has none (transformers' ``LABEL_0, LABEL_1, ...``).
        match_label_names: False takes the data's class ids as the model's (``data.match_label_names=false``:
            the same classes under other names, in the same order).
        label_names: The data's class names in id order (``data.label_names``), for named classes (strings,
            a ``ClassLabel``): the order of a teacher that names no classes. Matching by name, where it
            applies, then renumbers them as the model does.

    Returns:
        ``(names, ids)``: the class names in id order, and raw label value -> class id.

    Raises:
        ValueError: Labels of another type (float scores, multi-label lists), classes in the validation or
            test split that the train split lacks, ids that are no class (e.g. -1), named classes the model
            does not have (a subset of the model's classes is numbered as the model numbers them, with a
            warning), or ``label_names`` that lack a class of the data or are given for int labels.
    """
    feature = raw["train"].features[label_column]
    dtype = getattr(feature, "dtype", None) or ""  # a list (multi-label) feature has none
    key = f"data.label_column={label_column!r}"
    if not (isinstance(feature, ClassLabel) or dtype in ("string", "large_string") or "int" in dtype):
        raise ValueError(
            f"{key} holds labels of type {feature} (first values: {raw['train'][:3][label_column]}); "
            "classification needs int, string or ClassLabel labels. Float labels that are whole numbers (a "
            "csv column with an empty cell reads as float) need a cast to int in the data; regression scores "
            "(STS-B) need a teacher with one output (num_labels=1); multi-label lists are not supported"
        )
    train_values = set(raw["train"][label_column])
    held_out = {split: set(raw[split][label_column]) for split in ("validation", "test") if split in raw}
    names, label_ids = _numbering(
        raw, label_column, feature, train_values.union(*held_out.values()), label_names, key
    )
    for split, values in held_out.items():
        if unknown := values - train_values:
            raise ValueError(f"{split} labels {sorted(unknown)} of {key} do not occur in the train split")
    if invalid := train_values - set(label_ids):
        raise ValueError(f"{key} holds invalid labels {sorted(invalid)}")
    if label_names is not None:
        names, label_ids = _in_given_order(names, label_ids, label_names, key)
    if sorted_numbering(feature, names, model_labels, match_label_names, label_names):
        why = "as the teacher's config names no classes (id2label)"
        if model_labels is not None:
            why = "as data.match_label_names=false takes them as they are"
        log.warning(
            "%s: string labels numbered in sorted order %s, %s. If the teacher numbers them otherwise, give "
            "its order: data.label_names=[...] (the class names in the teacher's id order)",
            key, label_ids, why,
        )  # fmt: skip
    named = isinstance(feature, ClassLabel) or dtype in ("string", "large_string")
    if model_labels is not None and match_label_names and named:
        names, label_ids = _to_model_ids(names, label_ids, model_labels, key)
    return names, label_ids


def check_scores(raw: DatasetDict, label_column: str) -> None:
    """Regression targets (a teacher with one output, ``num_labels=1``: STS-B's similarity scores) must be
    numbers in every split; no classes are numbered or matched by name.

    Raises:
        ValueError: A split's labels are strings, classes (a ``ClassLabel``) or lists.
    """
    for split, rows in raw.items():
        feature = rows.features[label_column]
        dtype = getattr(feature, "dtype", None) or ""
        if isinstance(feature, ClassLabel) or not ("float" in dtype or "int" in dtype):
            raise ValueError(
                f"data.label_column={label_column!r} of the {split} split holds labels of type {feature} "
                f"(first values: {rows[:3][label_column]}), but the teacher has one output (num_labels=1, "
                "regression): its labels must be numbers (scores); for classes, give a teacher with a head "
                "per class"
            )


def _numbering(raw: DatasetDict, label_column: str, feature, values: set, label_names, key: str):
    """The data's own class names in id order and raw label value -> id, before ``label_names`` and the
    model's names apply (see :func:`class_ids`): a ``ClassLabel``'s, sorted strings, or int ids."""
    dtype = getattr(feature, "dtype", None) or ""
    if isinstance(feature, ClassLabel):  # e.g. glue: keep the dataset's own names
        names = list(feature.names)
        for split in ("validation", "test"):
            other = raw[split].features[label_column] if split in raw else None
            if isinstance(other, ClassLabel) and other.names != names:
                raise ValueError(
                    f"{key}: the train and {split} splits have different classes: {names} vs {other.names}; "
                    "give the splits the same classes (for image folders, the same class sub-folders)"
                )
        return names, {i: i for i in range(feature.num_classes)}
    if dtype in ("string", "large_string"):
        train_values = set(raw["train"][label_column])
        numeric = all(v.strip().lstrip("-").isdigit() for v in train_values)
        names = sorted(train_values, key=lambda v: (int(v), v) if numeric else (0, v))
        return names, {name: i for i, name in enumerate(names)}
    if label_names is not None:
        raise ValueError(
            f"data.label_names={list(label_names)} names classes, but {key} holds int labels, which are "
            "the class ids themselves: leave data.label_names unset (null)"
        )
    names = [str(i) for i in range(max(values) + 1)]
    return names, {i: i for i in range(len(names))}


def sorted_numbering(
    feature,
    names: list[str],
    model_labels: list[str] | None,
    match_label_names: bool,
    label_names: list[str] | None,
) -> bool:
    """Whether :func:`class_ids` numbers string labels by their sorted order, a guess at the teacher's ids:
    neither the teacher's names (``model_labels``, matched by name) nor ``data.label_names`` give the order,
    and the labels are not the ids themselves written as strings (``"0"`` to ``"<classes - 1>"``)."""
    strings = getattr(feature, "dtype", None) in ("string", "large_string")
    matched = model_labels is not None and match_label_names
    as_ids = names == [str(i) for i in range(len(names))]
    return strings and not matched and label_names is None and not as_ids


def _in_given_order(names: list[str], label_ids: dict, label_names: list[str], key: str) -> tuple[list, dict]:
    """The data's named classes renumbered in the order of ``data.label_names``."""
    given = [str(name) for name in label_names]
    if len(set(given)) != len(given):
        raise ValueError(f"data.label_names={given} names a class twice; name each class once")
    if absent := [name for name in names if name not in given]:
        raise ValueError(
            f"data.label_names={given} lacks the data's classes {absent} ({key}): list every class of the "
            f"data ({names}) in the teacher's id order"
        )
    return given, {value: given.index(names[i]) for value, i in label_ids.items()}


def _label_key(name) -> str:
    return str(name).strip().casefold()


def _to_model_ids(
    names: list[str], label_ids: dict, model_labels: list[str], key: str
) -> tuple[list[str], dict]:
    """The data's named classes renumbered as the model numbers them (its ``id2label``), matched by name."""
    model_ids = {_label_key(name): i for i, name in enumerate(model_labels)}
    if len(model_ids) != len(model_labels):
        raise ValueError(
            f"{key}: the teacher's id2label {list(model_labels)} names a class twice (ignoring case), so the "
            f"data's classes {names} cannot be matched to its ids by name; if the data's ids are the "
            "teacher's, set data.match_label_names=false, else fix the teacher config's id2label"
        )
    data_keys = [_label_key(name) for name in names]
    if not set(data_keys) <= set(model_ids):
        raise ValueError(
            f"{key}: the data's classes {names} are not the teacher's {list(model_labels)} (its config's "
            "id2label, compared by name, ignoring case). Give the teacher trained on these classes; if they "
            "are the same classes under other names, in the same id order, set data.match_label_names=false"
        )
    if absent := [name for name in model_labels if _label_key(name) not in data_keys]:
        # a subset of the teacher's classes is still numbered by name: the student keeps the teacher's head
        log.warning(
            "%s: the data has no class %s of the teacher's %s; the student keeps all %d of the teacher's "
            "classes",
            key, absent, list(model_labels), len(model_labels),
        )  # fmt: skip
    renumbered = [model_ids[k] for k in data_keys]
    return list(model_labels), {value: renumbered[i] for value, i in label_ids.items()}
