"""Summarise a Hydra multirun: ``python -m distill_lab.summarize multirun/2026-11-23/10-00-00``.

Reads every ``results.json`` below the directory with the run's ``.hydra/overrides.yaml``, prints a markdown
table (one row per run, the overrides as columns, the student's metric and its gap to the teacher), writes it
to ``summary.md`` and draws ``summary.png``, a bar chart of the student metric per run.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import yaml  # noqa: E402


def collect(directory: str | Path) -> list[dict]:
    """One row per run: its overrides (``key=value``) and its results."""
    rows = []
    for results_file in sorted(Path(directory).rglob("results.json")):
        run_dir = results_file.parent
        overrides_file = run_dir / ".hydra" / "overrides.yaml"
        overrides = yaml.safe_load(overrides_file.read_text()) if overrides_file.exists() else []
        rows.append(
            {
                "run": run_dir.name,
                "overrides": dict(o.split("=", 1) for o in overrides or [] if "=" in o),
                "results": json.loads(results_file.read_text()),
            }
        )
    if not rows:
        raise FileNotFoundError(f"no results.json below {directory}: is it a finished multirun directory?")
    return rows


def markdown_table(rows: list[dict], metric: str = "acc") -> str:
    keys = sorted({k for row in rows for k in row["overrides"]})
    header = ["run", *keys, f"student {metric}", f"teacher {metric}", "gap", "compression"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in sorted(rows, key=lambda r: -r["results"]["student"].get(metric, float("-inf"))):
        res = row["results"]
        cells = [row["run"], *(str(row["overrides"].get(k, "")) for k in keys)]
        student, teacher = res["student"].get(metric), res["teacher"].get(metric)
        cells += [
            f"{student:.4f}" if student is not None else "",
            f"{teacher:.4f}" if teacher is not None else "",
            f"{teacher - student:+.4f}" if None not in (student, teacher) else "",
            f"{res['parameters']['compression']:.2f}x",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def bar_chart(rows: list[dict], path: str | Path, metric: str = "acc") -> Path:
    labels = [" ".join(f"{k}={v}" for k, v in sorted(r["overrides"].items())) or r["run"] for r in rows]
    values = [r["results"]["student"].get(metric, 0.0) for r in rows]
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(rows) + 1.5))
    ax.barh(range(len(rows)), values, color="tab:blue")
    teacher = [r["results"]["teacher"].get(metric) for r in rows if r["results"]["teacher"].get(metric) is not None]
    if teacher:
        ax.axvline(sum(teacher) / len(teacher), color="tab:red", linestyle="--", label=f"teacher {metric}")
        ax.legend(loc="lower right")
    ax.set_yticks(range(len(rows)), labels, fontsize=8)
    ax.set_xlabel(f"student validation {metric}")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", help="a Hydra multirun directory")
    parser.add_argument("--metric", default="acc", help="student metric to compare (acc, f1)")
    args = parser.parse_args(argv)
    rows = collect(args.directory)
    table = markdown_table(rows, args.metric)
    out = Path(args.directory)
    (out / "summary.md").write_text(table + "\n")
    bar_chart(rows, out / "summary.png", args.metric)
    print(table)
    print(f"\nwrote {out / 'summary.md'} and {out / 'summary.png'}")


if __name__ == "__main__":
    main()
