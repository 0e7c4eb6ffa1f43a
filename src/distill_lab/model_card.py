"""The exported student's model card (``student/README.md``): the metadata the hub reads and what a reader
needs to trust the student: its teacher, size, data, objective, layer map, scores and the command that made
it.

Pure: the text is built from plain dicts (the run's resolved config and its ``results.json`` record), so it
can be tested, and written again, without Lightning, Hydra or a run.
"""

from __future__ import annotations

import math
import shlex
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

CARD = "README.md"
TAGS = ["distillation", "knowledge-distillation", "distill-lab"]
# the hub's pipeline of each task, and the transformers class that loads its student
PIPELINE_TAGS = {
    "sequence_classification": "text-classification",
    "token_classification": "token-classification",
    "masked_lm": "fill-mask",
    "causal_lm": "text-generation",
    "image_classification": "image-classification",
}
AUTO_CLASSES = {
    "sequence_classification": "AutoModelForSequenceClassification",
    "token_classification": "AutoModelForTokenClassification",
    "masked_lm": "AutoModelForMaskedLM",
    "causal_lm": "AutoModelForCausalLM",
    "image_classification": "AutoModelForImageClassification",
}
# the hub's metric ids (those of the `evaluate` library) and names of the tasks' metrics (distill_lab.tasks)
METRIC_TYPES = {
    "acc": ("accuracy", "Accuracy"),
    "f1": ("f1", "Macro F1"),
    "mcc": ("matthews_correlation", "Matthews correlation"),
    "pearson": ("pearsonr", "Pearson correlation"),
    "spearman": ("spearmanr", "Spearman correlation"),
    "masked_acc": ("accuracy", "Masked-token accuracy"),
    "perplexity": ("perplexity", "Perplexity"),
}
OBJECTIVE_KEYS = ("attention_weight", "alpha", "temperature", "layer_map", "layer_weights", "capture")


def hub_id(name_or_path: str | None) -> str | None:
    """``name_or_path`` where it names a hub repository (``bert-base-uncased``, ``org/model``), None where it
    is a local directory (a saved model, the built-in teacher's cache)."""
    if not name_or_path or Path(name_or_path).exists():
        return None
    try:
        validate_repo_id(name_or_path)
    except HFValidationError:
        return None
    return name_or_path


def hub_dataset(data: dict) -> str | None:
    """The hub dataset the data option reads (``data=hf``, ``data=lm_hf``: ``data.dataset.path``), if any."""
    dataset = data.get("dataset") or {}
    if str(dataset.get("_target_", "")).endswith(".hub_dataset"):
        return hub_id(dataset.get("path"))
    return None


def _plain(value) -> str:
    """A setting as the card prints it; a local path by its file name (the card is public, the path not)."""
    if isinstance(value, str) and Path(value).is_absolute():
        return Path(value).name
    return str(value)


def _settings(node: dict, skip: tuple[str, ...] = ("_target_", "_partial_")) -> str:
    return ", ".join(f"{k}={_plain(v)}" for k, v in node.items() if k not in skip and v is not None)


def describe_data(data: dict) -> str:
    """One line: how the data is read (the dataset function and its settings) and the subset limits."""
    dataset = data.get("dataset") or {}
    source = str(dataset.get("_target_", "?")).rsplit(".", 1)[-1]
    limits = {k: data.get(k) for k in ("max_train_samples", "max_eval_samples", "max_length")}
    line = f"`{source}` ({_settings(dataset)})"
    return f"{line}; {_settings(limits)}" if _settings(limits) else line


def _size_lines(results: dict, layers: dict) -> list[str]:
    p = results["parameters"]
    return [
        f"- **Teacher:** {layers['teacher']} layers, {p['teacher']:,} parameters",
        f"- **Student:** {layers['student']} layers, {p['student']:,} parameters "
        f"({p['compression']:.2f}x fewer)",
    ]


def _objective_lines(config: dict, results: dict) -> list[str]:
    loss, matching = dict(config.get("loss") or {}), dict(config.get("matching") or {})
    pairs = ", ".join(f"teacher {t} -> student {s}" for t, s in results.get("layer_map") or [])
    lines = [
        "L = (1 - attention_weight) * L_output + attention_weight * L_attention, with "
        "L_output = alpha * CE + (1 - alpha) * temperature^2 * KL(teacher_T || student_T).",
        "",
        "| setting | value |",
        "|---|---|",
        *(f"| {k} | {config[k]} |" for k in OBJECTIVE_KEYS if k in config),
        f"| loss | {loss.get('name', '?')} ({_settings(loss, ('_target_', 'name')) or 'defaults'}) |",
        f"| matching | {str(matching.get('_target_', '?')).rsplit('.', 1)[-1].lower()}"
        f"{' (' + _settings(matching) + ')' if _settings(matching) else ''} |",
        f"| layer pairs | {pairs or 'none'} |",
    ]
    if results.get("selected_heads"):
        lines.append(f"| selected heads | {results['selected_heads']} |")
    if hidden := dict(config.get("hidden") or {}):  # hidden=mse or cosine: + hidden_weight * L_hidden
        lines[0] = lines[0].replace("L_attention,", "L_attention + hidden_weight * L_hidden,")
        lines.append(
            f"| hidden | {hidden.get('name', '?')} (hidden_weight={config.get('hidden_weight')}, "
            f"hidden_layer_map={config.get('hidden_layer_map')}) |"
        )
    return lines


def _metric_lines(results: dict) -> list[str]:
    higher = results.get("higher_is_better", {})
    lines = ["| metric | teacher | student |", "|---|---|---|"]
    for name, value in results["student"].items():
        direction = (
            "" if name not in higher else (" (higher is better)" if higher[name] else " (lower is better)")
        )
        teacher = results["teacher"].get(name)
        shown = "n/a" if teacher is None else f"{teacher:.4f}"
        lines.append(f"| {name}{direction} | {shown} | {value:.4f} |")
    steps = results.get("trained_steps")
    lines += ["", f"Validation scores of the best validated checkpoint, after {steps} optimizer steps."]
    if test := results.get("test"):
        lines += ["", "| held-out test | teacher | student |", "|---|---|---|"]
        for name, value in test["student"].items():
            teacher = test["teacher"].get(name)
            lines.append(f"| {name} | {'n/a' if teacher is None else f'{teacher:.4f}'} | {value:.4f} |")
        lines += ["", f"The same checkpoint on the held-out test split ({test['examples']} examples)."]
    return lines


def _dataset_fields(data: dict, split_key: str) -> dict:
    """The ``dataset`` of a ``model-index`` result: the hub dataset and split where the data is one (``type``
    its id, ``config`` its configuration), else the kind of data and the file's name (never its path)."""
    dataset = data.get("dataset") or {}
    if path := hub_dataset(data):
        name = f"{path} ({dataset['name']})" if dataset.get("name") else path
        split = dataset.get(f"{split_key}_split")
        return {"dataset_type": path, "dataset_name": name, "dataset_config": dataset.get("name")} | (
            {"dataset_split": split} if split else {}
        )
    source = str(dataset.get("_target_", "local")).rsplit(".", 1)[-1]
    file = dataset.get(f"{split_key}_file") or dataset.get(f"{split_key}_dir")
    return {
        "dataset_type": source,
        "dataset_name": _plain(file) if file else source,
        "dataset_split": split_key,
    }


def eval_results(results: dict, config: dict) -> list[EvalResult]:
    """The student's scores as the hub's ``model-index`` results: its validation metrics of the best
    checkpoint and, where the run had a test split, its held-out test metrics; one result per metric (the
    hub's form), each named with its split. Non-finite values are left out."""
    task, data = results["task"], config.get("data") or {}
    scored = [("validation", results.get("student") or {})]
    if results.get("test"):
        scored.append(("test", results["test"]["student"]))
    out = []
    for split, metrics in scored:
        fields = _dataset_fields(data, split)
        for name, value in metrics.items():
            if not isinstance(value, int | float) or not math.isfinite(value):
                continue
            metric_type, shown = METRIC_TYPES.get(name, (name, name))
            out.append(
                EvalResult(
                    task_type=PIPELINE_TAGS.get(task, task),
                    metric_type=metric_type,
                    metric_value=float(value),
                    metric_name=f"{shown} ({split})",
                    **fields,
                )  # fmt: skip
            )
    return out


def _adapter(config: dict) -> bool:
    """Whether the run's student is a LoRA adapter (``student.lora.r`` above 0)."""
    return bool(((config.get("student") or {}).get("lora") or {}).get("r"))


def card_data(
    config: dict, task: str, results: dict | None = None, model_name: str | None = None
) -> ModelCardData:
    """The front matter the hub reads: library, tags, and base model, pipeline and dataset where known; with
    ``results``, the ``model-index`` of the student's scores (:func:`eval_results`) under ``model_name``. A
    LoRA adapter is the hub's ``library_name: peft``, its ``base_model`` the model the adapter applies to:
    the student's hub name where it has one (a derived student's base is no hub model, it lies in
    ``base/``)."""
    adapter = _adapter(config)
    base = hub_id((config.get("student" if adapter else "teacher") or {}).get("name_or_path"))
    dataset = hub_dataset(config.get("data") or {})
    scores = eval_results(results, config) if results else None
    return ModelCardData(
        library_name="peft" if adapter else "transformers",
        tags=[*TAGS, "lora"] if adapter else list(TAGS),
        base_model=base,
        pipeline_tag=PIPELINE_TAGS.get(task),
        datasets=[dataset] if dataset else None,
        model_name=(model_name or "distill-lab-student") if scores else None,
        eval_results=scores or None,
    )


def _lora_lines(record: dict) -> list[str]:
    """The LoRA settings (``results.json``'s ``lora`` record) as the card's Model section lists them."""
    targets = record["target_modules"]
    return [
        f"- **LoRA:** r={record['r']}, alpha={record['alpha']}, dropout={record['dropout']}, on "
        f"{', '.join(targets) if isinstance(targets, list) else targets}; trained in full: "
        f"{', '.join(record['modules_to_save']) or 'nothing'}; {record['trainable_parameters']:,} trained "
        "parameters",
    ]


def _use_lines(task: str, repo_id: str | None, record: dict | None) -> list[str]:
    """How to load the student: its transformers class; for a LoRA adapter its frozen base (``base/``) and
    the adapter onto it, and the merged model (``merged/``) where the run wrote one. Those load by path:
    transformers' Auto classes, given a ``subfolder`` of a repository whose top holds an adapter, load the
    adapter's base instead, so a hub repository is downloaded first."""
    load = AUTO_CLASSES.get(task, "AutoModel")
    where = repo_id or "path/to/student"
    if record is None:
        return [
            "```python",
            f"from transformers import {load}",
            f'model = {load}.from_pretrained("{where}")',
            "```",
        ]
    lines = ["```python", "from peft import PeftModel", f"from transformers import {load}"]
    if repo_id:
        lines += [
            "from huggingface_hub import snapshot_download",
            "",
            f'path = snapshot_download("{repo_id}")',
        ]
    else:
        lines += ["", f'path = "{where}"']
    lines += [
        f'base = {load}.from_pretrained(f"{{path}}/base")  # the frozen student',
        "model = PeftModel.from_pretrained(base, path)  # with its adapters",
    ]
    if record.get("merged_dir"):
        lines.append(f'merged = {load}.from_pretrained(f"{{path}}/merged")  # the adapters merged in')
    return [*lines, "```"]


def card_text(
    results: dict,
    config: dict,
    *,
    layers: dict,
    command: list[str] | None,
    version: str,
    repo_id: str | None = None,
) -> str:
    """The card's text: YAML front matter (:func:`card_data`) and the body. ``results`` is the run's
    ``results.json`` record, ``config`` its resolved config, ``layers`` the hidden layers of ``teacher`` and
    ``student``, ``command`` the command-line overrides (None: ``train(cfg)`` called from Python), ``repo_id``
    the hub repository the student is uploaded to, if any."""
    task = results["task"]
    teacher = (config.get("teacher") or {}).get("name_or_path")
    shown_teacher = hub_id(teacher) or f"a local model (`{_plain(teacher)}`)"
    made_by = (
        ["```bash", shlex.join(["python", "train.py", *command]), "```"]
        if command is not None
        else ["`distill_lab.run.train(cfg)` from Python; the resolved config is the run's `config.yaml`."]
    )
    body = [
        f"# Student of {shown_teacher}",
        "",
        f"Distilled with distill-lab {version} from **{shown_teacher}** "
        f"(task: `{task}`), matching the teacher's attention as well as its outputs.",
        "",
        "## Model",
        "",
        f"- **Base (teacher):** {shown_teacher}",
        *_size_lines(results, layers),
        *(_lora_lines(results["lora"]) if results.get("lora") else []),
        "",
        "## Data",
        "",
        describe_data(config.get("data") or {}),
        "",
        "## Objective",
        "",
        *_objective_lines(config, results),
        "",
        "## Results",
        "",
        *_metric_lines(results),
        "",
        "## How it was made",
        "",
        *made_by,
        "",
        f"distill_lab version: {version}",
        "",
        "## Use",
        "",
        *_use_lines(task, repo_id, results.get("lora")),
        "",
    ]
    meta = card_data(config, task, results, repo_id.rsplit("/", 1)[-1] if repo_id else None)
    return str(ModelCard(f"---\n{meta.to_yaml()}\n---\n\n" + "\n".join(body)))


def write_card(directory: str | Path, results: dict, config: dict, **details) -> Path:
    """:func:`card_text` written to ``directory/README.md``; returns its path."""
    path = Path(directory) / CARD
    path.write_text(card_text(results, config, **details))
    return path
