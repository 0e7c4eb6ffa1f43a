"""Summarise a Hydra multirun: ``python -m distill_lab.summarize multirun/2026-11-23/10-00-00``.

Reads every ``results.json`` below the directory with the run's ``.hydra/overrides.yaml``, prints a markdown
table (one row per run, the overrides as columns, the student's metric and its gap to the teacher), writes it
to ``summary.md`` and draws ``summary.png``, a bar chart of the student metric per run. Runs that wrote no
``results.json`` (unfinished, failed, or still running) are named below the table.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import yaml  # noqa: E402


def _natural_key(path: Path) -> list:
    """Sort key that orders numbered run directories as numbers: 0, 1, 2, ..., 10 (not 0, 1, 10, 2)."""
    return [
        (0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", path.as_posix())
    ]


def _override(override: str) -> tuple[str, str]:
    key, value = override.split("=", 1)
    return key.lstrip("+"), value  # +key=value and ++key=value set the same key as key=value


def collect(directory: str | Path) -> list[dict]:
    """One row per run (in run order): its overrides (``key=value``) and its results."""
    directory = Path(directory)
    rows = []
    for results_file in sorted(directory.rglob("results.json"), key=_natural_key):
        run_dir = results_file.parent
        overrides_file = run_dir / ".hydra" / "overrides.yaml"
        overrides = yaml.safe_load(overrides_file.read_text()) if overrides_file.exists() else []
        rows.append(
            {
                # the path below the directory, so runs of nested sweeps (two 0/ folders) stay apart
                "run": run_dir.name if run_dir == directory else run_dir.relative_to(directory).as_posix(),
                "overrides": dict(_override(o) for o in overrides or [] if "=" in o),
                "results": json.loads(results_file.read_text()),
            }
        )
    if not rows:
        missing = unfinished(directory)
        named = f" ({len(missing)} runs without one: {', '.join(missing)})" if missing else ""
        raise FileNotFoundError(
            f"no results.json below {directory}{named}: is it a finished multirun directory?"
        )
    return rows


def unfinished(directory: str | Path) -> list[str]:
    """The runs below ``directory`` (directories with Hydra's ``.hydra/``) without a ``results.json``:
    unfinished, failed or still running, in run order, each with its overrides (``2 (loss=mse seed=1)``) where
    it has any."""
    directory = Path(directory)
    runs = sorted((h.parent for h in directory.rglob(".hydra") if h.is_dir()), key=_natural_key)
    named = []
    for run in runs:
        if (run / "results.json").exists():
            continue
        name = run.name if run == directory else run.relative_to(directory).as_posix()
        try:
            overrides = yaml.safe_load((run / ".hydra" / "overrides.yaml").read_text()) or []
        except (OSError, yaml.YAMLError):
            overrides = []
        named.append(f"{name} ({' '.join(map(str, overrides))})" if overrides else name)
    return named


LOWER_IS_BETTER = ("perplexity", "loss")  # for results.json written before it recorded higher_is_better


def higher_is_better(row: dict, metric: str) -> bool:
    """The direction of ``metric``, as the run's ``results.json`` records it (from the metric itself)."""
    return row["results"].get("higher_is_better", {}).get(metric, metric not in LOWER_IS_BETTER)


def _score(row: dict, metric: str) -> float:
    """The student's ``metric`` for sorting, higher is better (perplexity and losses negated): a missing or
    NaN value ranks below every number."""
    value = row["results"]["student"].get(metric)
    if value is None or math.isnan(value):
        return float("-inf")
    return value if higher_is_better(row, metric) else -value


def _cell(value) -> str:
    return str(value).replace("|", "\\|")  # a literal | would end the markdown cell


def varying_overrides(rows: list[dict]) -> list[str]:
    """The override keys whose value differs between runs (all keys for a single run)."""
    keys = sorted({k for row in rows for k in row["overrides"]})
    if len(rows) < 2:
        return keys
    return [k for k in keys if len({row["overrides"].get(k) for row in rows}) > 1]


def shared_overrides(rows: list[dict]) -> dict[str, str]:
    """The overrides every run has with the same value (the sweep's fixed settings), for two or more runs."""
    if len(rows) < 2:
        return {}
    varying = set(varying_overrides(rows))
    return {k: v for k, v in sorted(rows[0]["overrides"].items()) if k not in varying}


def markdown_table(rows: list[dict], metric: str = "acc") -> str:
    """One line per run, best student ``metric`` first (lowest for perplexity; runs without it last); the
    overrides that differ between runs as columns (those they share in a line above the table). ``gap`` is how
    far the student is behind the teacher, positive when it is worse: teacher minus student for accuracy,
    student minus teacher for perplexity."""
    keys = varying_overrides(rows)
    header = ["run", *keys, f"student {metric}", f"teacher {metric}", "gap", "compression"]
    shared = shared_overrides(rows)
    lines = [f"shared overrides: {' '.join(f'`{k}={v}`' for k, v in shared.items())}", ""] if shared else []
    lines += ["| " + " | ".join(_cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    for row in sorted(rows, key=lambda r: _score(r, metric), reverse=True):  # stable: ties keep run order
        res = row["results"]
        cells = [_cell(row["run"]), *(_cell(row["overrides"].get(k, "")) for k in keys)]
        student, teacher = res["student"].get(metric), res["teacher"].get(metric)
        cells += [
            f"{student:.4f}" if student is not None else "",
            f"{teacher:.4f}" if teacher is not None else "",
            f"{(teacher - student) * (1 if higher_is_better(row, metric) else -1):+.4f}"
            if None not in (student, teacher)
            else "",
            f"{res['parameters']['compression']:.2f}x",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def bar_chart(rows: list[dict], path: str | Path, metric: str = "acc") -> Path:
    # what tells the runs apart: the overrides they do not share (common ones, such as data paths, would
    # make every label the same long string)
    keys = varying_overrides(rows)
    labels = [
        " ".join(f"{k}={r['overrides'][k]}" for k in keys if k in r["overrides"]) or r["run"] for r in rows
    ]
    values = [r["results"]["student"].get(metric, 0.0) for r in rows]
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(rows) + 1.5))
    ax.barh(range(len(rows)), values, color="tab:blue")
    teacher = [
        r["results"]["teacher"].get(metric) for r in rows if r["results"]["teacher"].get(metric) is not None
    ]
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


def default_metric(rows: list[dict]) -> str:
    """The metric the runs optimised: the first run's ``optimized_metric``; for results written without it,
    the monitor of its task (``perplexity`` for a language model, ``acc`` for a classifier), else its first
    student metric."""
    results = rows[0]["results"]
    if "optimized_metric" in results:
        return results["optimized_metric"]
    task = results.get("task")
    if task is not None:
        from distill_lab.tasks import TASKS  # imports torch and transformers (seconds): only when asked for

        if task in TASKS:
            return TASKS[task].monitor.removeprefix("val/")
    return next(iter(results["student"]), "acc")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", help="a Hydra multirun directory")
    parser.add_argument(
        "--metric",
        default=None,
        help="student metric to compare (acc, f1, masked_acc, perplexity); default: the one the runs "
        "optimised",
    )
    args = parser.parse_args(argv)
    try:
        rows = collect(args.directory)
    except FileNotFoundError as err:
        parser.exit(2, f"error: {err}\n")
    metric = args.metric or default_metric(rows)
    reported = sorted({m for row in rows for m in row["results"]["student"]})
    if metric not in reported:
        parser.exit(2, f"error: no run reports --metric {metric}; they report {', '.join(reported)}\n")
    table = markdown_table(rows, metric)
    if missing := unfinished(args.directory):
        table += (
            "\n\nnot in the table, without results.json (unfinished, failed or running): "
            f"{', '.join(missing)}"
        )
    out = Path(args.directory)
    (out / "summary.md").write_text(table + "\n")
    bar_chart(rows, out / "summary.png", metric)
    print(table)
    print(f"\nwrote {out / 'summary.md'} and {out / 'summary.png'}")


if __name__ == "__main__":
    main()
