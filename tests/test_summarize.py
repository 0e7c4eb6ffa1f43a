"""``python -m distill_lab.summarize DIR`` on hand-made multirun directories (no training)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from distill_lab.summarize import collect, main, markdown_table, shared_overrides, varying_overrides


def fake_run(root: Path, name: str, overrides: list[str], student: float, teacher: float = 0.9) -> None:
    run = root / name
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    results = {
        "student": {"acc": student},
        "teacher": {"acc": teacher},
        "parameters": {"compression": 2.0},
        "gap": {"acc": teacher - student},
    }
    (run / "results.json").write_text(json.dumps(results))


@pytest.fixture
def sweep(tmp_path):
    shared = ["data=local", "data.dataset.train_file='/data/a|b.csv'"]
    values = [("mse", "layerwise", 0.70), ("kl", "layerwise", 0.80), ("mse", "global", math.nan)]
    values += [(f"kl{i}", "global", 0.1 * i) for i in range(8)]  # runs 3..10: numbered beyond 9
    for i, (loss, matching, acc) in enumerate(values):
        fake_run(tmp_path, str(i), [f"loss={loss}", f"+matching={matching}", *shared], acc)
    return tmp_path


def test_collect_reads_runs_in_numeric_order_with_plain_override_keys(sweep):
    rows = collect(sweep)
    assert [r["run"] for r in rows] == [str(i) for i in range(11)]  # 10 after 9, not after 1
    assert rows[0]["overrides"] == {
        "loss": "mse",
        "matching": "layerwise",
        "data": "local",
        "data.dataset.train_file": "'/data/a|b.csv'",
    }


def test_table_columns_are_what_varies_and_rows_are_best_first(sweep):
    rows = collect(sweep)
    assert varying_overrides(rows) == ["loss", "matching"]
    assert shared_overrides(rows) == {"data": "local", "data.dataset.train_file": "'/data/a|b.csv'"}
    lines = markdown_table(rows).splitlines()
    assert lines[0].startswith("shared overrides: `data=local`") and "a|b.csv" in lines[0]
    header, body = lines[2], lines[4:]
    assert header == "| run | loss | matching | student acc | teacher acc | gap | compression |"
    assert len(body) == 11
    assert body[0] == "| 1 | kl | layerwise | 0.8000 | 0.9000 | +0.1000 | 2.00x |"
    assert body[1].startswith("| 10 | kl7 | global | 0.7000 |") and body[2].startswith("| 0 | mse |")
    assert body[-1].startswith("| 2 | mse | global | nan |")  # NaN ranks last


def test_pipes_in_values_are_escaped(tmp_path):
    fake_run(tmp_path, "0", ["data.text_column=a|b"], 0.5)
    fake_run(tmp_path, "1", ["data.text_column=c"], 0.6)
    table = markdown_table(collect(tmp_path))
    assert "| a\\|b |" in table


def test_main_writes_markdown_and_chart(sweep, capsys):
    main([str(sweep)])
    assert (sweep / "summary.md").read_text().strip() == markdown_table(collect(sweep))
    assert (sweep / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "wrote" in capsys.readouterr().out


def test_empty_directory_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="no results.json below"):
        collect(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path)])
    assert exit_info.value.code == 2 and "is it a finished multirun directory?" in capsys.readouterr().err


def test_perplexity_sorts_lowest_first_and_is_the_default_metric_of_lm_runs(tmp_path, capsys):
    for i, ppl in enumerate([12.0, 9.5, 30.0]):
        run = tmp_path / str(i)
        (run / ".hydra").mkdir(parents=True)
        (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"loss=l{i}"]))
        results = {
            "student": {"perplexity": ppl},
            "teacher": {"perplexity": 8.0},
            "parameters": {"compression": 2.0},
        }
        (run / "results.json").write_text(json.dumps(results))
    main([str(tmp_path)])
    body = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")][1:]
    assert [line.split("|")[1].strip() for line in body] == ["1", "0", "2"]
    assert "student perplexity" in (tmp_path / "summary.md").read_text()
    assert body[0].endswith("| 9.5000 | 8.0000 | +1.5000 | 2.00x |")  # the student is 1.5 behind: positive


def test_the_direction_recorded_in_results_decides_order_and_gap(tmp_path, capsys):
    """A metric recorded as lower-is-better in results.json (whatever its name) ranks lowest first, and its
    gap is student minus teacher: positive when the student is behind."""
    for i, error in enumerate([0.30, 0.20]):
        run = tmp_path / str(i)
        (run / ".hydra").mkdir(parents=True)
        (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"loss=l{i}"]))
        results = {
            "student": {"error": error},
            "teacher": {"error": 0.1},
            "parameters": {"compression": 2.0},
            "higher_is_better": {"error": False},
            "optimized_metric": "error",
        }
        (run / "results.json").write_text(json.dumps(results))
    main([str(tmp_path)])
    assert _run_order(capsys.readouterr().out) == ["1", "0"]
    assert "| 1 | l1 | 0.2000 | 0.1000 | +0.1000 | 2.00x |" in (tmp_path / "summary.md").read_text()


def test_a_metric_no_run_reports_is_an_error_listing_those_they_do(sweep, capsys):
    with pytest.raises(SystemExit) as info:
        main([str(sweep), "--metric", "perplexity"])
    assert info.value.code == 2
    assert "error: no run reports --metric perplexity; they report acc" in capsys.readouterr().err
    assert not (sweep / "summary.md").exists()


def test_runs_without_results_are_named_not_dropped(sweep, tmp_path, capsys):
    """A sweep job that wrote no results.json (killed, failed, still running) is listed under the table, with
    its overrides, which tell what to rerun."""
    for name in ("11", "12"):
        (sweep / name / ".hydra").mkdir(parents=True)
        (sweep / name / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(["loss=cosine"]))
    main([str(sweep)])
    note = (
        "not in the table, without results.json (unfinished, failed or running): "
        "11 (loss=cosine), 12 (loss=cosine)"
    )
    assert note in capsys.readouterr().out and (sweep / "summary.md").read_text().strip().endswith(note)
    empty = tmp_path / "empty-sweep"
    (empty / "0" / ".hydra").mkdir(parents=True)
    with pytest.raises(
        FileNotFoundError, match=r"no results.json below .*empty-sweep \(1 runs without one: 0\)"
    ):
        collect(empty)


@pytest.fixture
def masked_lm_sweep(tmp_path):
    """A masked-LM multirun as ``train.py`` writes it: the student's first metric is masked_acc, the task
    optimises perplexity; the run with the best accuracy (1) is not the one with the lowest perplexity (2)."""
    for i, (acc, ppl) in enumerate([(0.40, 12.0), (0.55, 11.0), (0.50, 9.5)]):
        run = tmp_path / str(i)
        (run / ".hydra").mkdir(parents=True)
        (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(["task=masked_lm", f"loss=l{i}"]))
        results = {
            "task": "masked_lm",
            "student": {"masked_acc": acc, "perplexity": ppl},
            "teacher": {"masked_acc": 0.6, "perplexity": 8.0},
            "parameters": {"compression": 2.0},
        }
        (run / "results.json").write_text(json.dumps(results))
    return tmp_path


def _run_order(output: str) -> list[str]:
    return [line.split("|")[1].strip() for line in output.splitlines() if line.startswith("| ")][1:]


def test_default_metric_is_the_one_the_task_optimises(masked_lm_sweep, capsys):
    main([str(masked_lm_sweep)])
    assert _run_order(capsys.readouterr().out) == ["2", "1", "0"]  # perplexity, lowest first
    header = (masked_lm_sweep / "summary.md").read_text().splitlines()[2]  # below the shared task=masked_lm
    assert header == "| run | loss | student perplexity | teacher perplexity | gap | compression |"


def test_explicit_metric_wins_over_the_tasks(masked_lm_sweep, capsys):
    main([str(masked_lm_sweep), "--metric", "masked_acc"])
    assert _run_order(capsys.readouterr().out) == ["1", "2", "0"]  # accuracy, highest first
    assert "| 1 | l1 | 0.5500 | 0.6000 | +0.0500 | 2.00x |" in (masked_lm_sweep / "summary.md").read_text()


def test_default_metric_is_the_one_the_runs_optimised(masked_lm_sweep, capsys):
    """Runs given ``optimized_metric=val/masked_acc`` are ranked by it, not by their task's perplexity."""
    for results_file in masked_lm_sweep.rglob("results.json"):
        results = json.loads(results_file.read_text())
        results_file.write_text(json.dumps({**results, "optimized_metric": "masked_acc"}))
    main([str(masked_lm_sweep)])
    assert _run_order(capsys.readouterr().out) == ["1", "2", "0"]  # accuracy, highest first
    assert "student masked_acc" in (masked_lm_sweep / "summary.md").read_text()
