"""Fine-tune the pretrained encoder into the AG News teacher: a 4-class classifier over the training rows.

    python experiments/agnews/teacher.py --model models/all-MiniLM-L6-v2 \
        --data ../shared/data/agnews --out models/agnews-teacher

One epoch of AdamW (linear warm-up over the first 10% of the steps, then linear decay) on the training rows,
``max_length`` 64, then the validation accuracy, printed and written to ``<out>/teacher_metrics.json``. The
classes are named in ``id2label`` in the order the data's README lists them, so that distill-lab maps the
data's string labels to the teacher's ids by name.
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, get_linear_schedule_with_warmup

LABELS = ("World", "Sports", "Business", "Sci/Tech")


def read_tsv(path: Path) -> tuple[list[str], list[int]]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    return [r["text"] for r in rows], [LABELS.index(r["label"]) for r in rows]


def batches(tokenizer, texts, labels, batch_size: int, max_length: int, order=None):
    order = order if order is not None else range(len(texts))
    order = list(order)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        inputs = tokenizer(
            [texts[i] for i in rows],
            truncation=True,
            max_length=max_length,
            padding=True,
            return_tensors="pt",
        )
        yield inputs, torch.tensor([labels[i] for i in rows])


@torch.no_grad()
def accuracy(model, tokenizer, texts, labels, max_length: int) -> float:
    model.eval()
    correct = 0
    for inputs, target in batches(tokenizer, texts, labels, 128, max_length):
        correct += int((model(**inputs).logits.argmax(-1) == target).sum())
    return correct / len(texts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--data", type=Path, default=Path("../shared/data/agnews"))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForSequenceClassification.from_pretrained(
        args.model, num_labels=len(LABELS), id2label=dict(enumerate(LABELS)),
        label2id={name: i for i, name in enumerate(LABELS)},
    )  # fmt: skip
    train_texts, train_labels = read_tsv(args.data / "train.tsv")
    val_texts, val_labels = read_tsv(args.data / "validation.tsv")
    steps = args.epochs * -(-len(train_texts) // args.batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    schedule = get_linear_schedule_with_warmup(optimizer, steps // 10, steps)
    start = time.perf_counter()
    generator = torch.Generator().manual_seed(args.seed)
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(train_texts), generator=generator).tolist()
        for step, (inputs, target) in enumerate(
            batches(tokenizer, train_texts, train_labels, args.batch_size, args.max_length, order)
        ):
            loss = torch.nn.functional.cross_entropy(model(**inputs).logits, target)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
            if step % 50 == 0:
                print(f"epoch {epoch} step {step}: loss {loss.item():.4f}", flush=True)
    minutes = (time.perf_counter() - start) / 60
    metrics = {
        "val_acc": accuracy(model, tokenizer, val_texts, val_labels, args.max_length),
        "train_rows": len(train_texts), "validation_rows": len(val_texts), "epochs": args.epochs,
        "lr": args.lr, "batch_size": args.batch_size, "max_length": args.max_length,
        "minutes": round(minutes, 1),
    }  # fmt: skip
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    (args.out / "teacher_metrics.json").write_text(json.dumps(metrics, indent=2))
    print(json.dumps(metrics))


if __name__ == "__main__":
    main()
