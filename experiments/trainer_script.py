"""Attention distillation in a transformers ``Trainer`` script (docs/trainer.md shows ``distil`` as is).

    python experiments/trainer_script.py [OUTPUT_DIR]

Offline: distils the built-in teacher (a 4-layer BERT classifier, trained and cached on first use, about half
a minute on a CPU) into a 2-layer student on the built-in sentences. ``distil`` takes any saved classifier and
any dataset with ``text`` and ``label`` columns (``load_dataset("glue", "sst2")`` renamed, your CSV files).
"""

import os
import sys
from pathlib import Path

from transformers import AutoModelForSequenceClassification, AutoTokenizer, TrainingArguments

from distill_lab import DistillationTrainer, derive_student


def distil(teacher_dir, data, output_dir, max_steps=300):
    """Distil the classifier saved in ``teacher_dir`` into a 2-layer student on ``data`` (text, label)."""
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    teacher = AutoModelForSequenceClassification.from_pretrained(teacher_dir)
    student = derive_student(teacher, num_layers=2)  # or any model that reads the teacher's tokens
    data = data.map(lambda batch: tokenizer(batch["text"], truncation=True, max_length=64), batched=True)
    args = TrainingArguments(
        output_dir, max_steps=max_steps, learning_rate=5e-4, per_device_train_batch_size=32,
        eval_strategy="steps", eval_steps=100, report_to="none",
    )  # fmt: skip
    trainer = DistillationTrainer(
        model=student, teacher=teacher, args=args, processing_class=tokenizer,
        train_dataset=data["train"], eval_dataset=data["validation"],
        attention_weight=0.3, temperature=3.0, alpha=0.3,  # the objective; kl on the uniform layer map
    )  # fmt: skip
    trainer.train()
    trainer.save_model()  # the student alone, with its tokenizer: the teacher is no part of it
    return trainer.evaluate()


def builtin_teacher() -> str:
    """The built-in sequence classifier's directory, trained there on first use (as ``teacher=builtin``)."""
    from distill_lab.models import load_teacher

    cache = Path(os.environ.get("DISTILL_LAB_CACHE", Path.home() / ".cache" / "distill-lab"))
    path = str(cache / "builtin-sequence_classification-v2")  # conf/teacher/builtin.yaml's directory
    load_teacher(path, "sequence_classification", builtin="auto")
    return path


if __name__ == "__main__":
    from distill_lab.data_synthetic import synthetic_relations

    metrics = distil(
        builtin_teacher(), synthetic_relations(), sys.argv[1] if len(sys.argv) > 1 else "outputs"
    )
    print({k: round(v, 4) for k, v in metrics.items()})
