"""Run the AG News comparison and write its table: ways of distilling the fine-tuned teacher, each under
several seeds, through ``python train.py experiment=agnews``.

    python experiments/agnews/run.py --teacher models/agnews-teacher --out runs/agnews
    python experiments/agnews/run.py --teacher models/agnews-teacher --out runs/agnews \
        --layers 2 --ways attention relations
    python experiments/agnews/run.py --out runs/agnews --summary

Each run writes to ``<out>/L<layers>/<way>/seed<seed>``; a run whose ``results.json`` exists is not run
again, so an interrupted comparison continues where it stopped. ``--summary`` prints the table of every
finished run (mean and standard deviation over seeds of the validation accuracy, the median time per run)
and writes it to ``<out>/summary.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# the ways of distilling, each a set of overrides of experiment=agnews (L = (1 - w) L_output + w L_attention +
# w_h L_hidden, w = attention_weight 0.3 unless set)
WAYS = {
    "output": ["attention_weight=0"],  # logit KD and labels only
    "attention": ["loss=kl"],  # attention KL on the uniform layer pairs
    "relations": ["loss=relation", "loss.relation_heads=12"],  # MiniLMv2: q-q, k-k, v-v, last layers
    "hidden": ["attention_weight=0", "hidden=mse"],  # hidden states and embeddings, no attention term
    "all": ["loss=relation", "loss.relation_heads=12", "loss.attention=1", "layer_map=uniform", "hidden=mse"],
}


def run(teacher: str, data: str, out: Path, layers: int, way: str, seed: int) -> Path:
    run_dir = out / f"L{layers}" / way / f"seed{seed}"
    if (run_dir / "results.json").is_file():
        return run_dir
    command = [
        sys.executable, str(REPO / "train.py"), "experiment=agnews", f"teacher.name_or_path={teacher}",
        f"agnews_dir={data}", f"student.num_layers={layers}", f"seed={seed}", "ckpt_path=null",
        f"hydra.run.dir={run_dir}", *WAYS[way],
    ]  # fmt: skip
    print(" ".join(command[1:]), flush=True)
    start = time.perf_counter()
    subprocess.run(command, check=True, cwd=REPO)
    (run_dir / "time.json").write_text(json.dumps({"seconds": time.perf_counter() - start}))
    return run_dir


def summary(out: Path) -> str:
    lines = [
        "| student | way | runs | accuracy (mean ± sd) | macro-F1 | seeds | minutes per run (median) |",
        "|---|---|---|---|---|---|---|",
    ]
    for layer_dir in sorted(out.glob("L*")):
        for way in WAYS:
            runs = sorted((layer_dir / way).glob("seed*/results.json"))
            if not runs:
                continue
            results = [json.loads(p.read_text()) for p in runs]
            acc = [r["student"]["acc"] for r in results]
            f1 = [r["student"]["f1"] for r in results]
            minutes = [json.loads((p.parent / "time.json").read_text())["seconds"] / 60 for p in runs]
            spread = statistics.stdev(acc) if len(acc) > 1 else 0.0
            seeds = ", ".join(f"{a:.4f}" for a in acc)
            mean = f"{statistics.mean(acc):.4f} ± {spread:.4f}"
            lines.append(
                f"| {layer_dir.name[1:]} layers | {way} | {len(acc)} | {mean} | {statistics.mean(f1):.4f} "
                f"| {seeds} | {statistics.median(minutes):.1f} |"
            )
    teacher = next(out.glob("L*/*/seed*/results.json"), None)
    if teacher is not None:
        lines.append(f"\nTeacher accuracy {json.loads(teacher.read_text())['teacher']['acc']:.4f}.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", help="the fine-tuned teacher's folder (experiments/agnews/teacher.py)")
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "agnews"))
    parser.add_argument("--out", type=Path, default=Path("runs/agnews"))
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--ways", nargs="+", choices=list(WAYS), default=list(WAYS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--summary", action="store_true", help="only print and write the table")
    args = parser.parse_args()
    out = args.out.resolve()
    if not args.summary:
        if not args.teacher:
            parser.error("--teacher is needed to run (experiments/agnews/teacher.py writes one)")
        for seed in args.seeds:  # seeds outermost: an early stop leaves every way with some seeds
            for way in args.ways:
                run(
                    str(Path(args.teacher).resolve()),
                    str(Path(args.data).resolve()),
                    out,
                    args.layers,
                    way,
                    seed,
                )
    table = summary(out)
    (out / "summary.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
