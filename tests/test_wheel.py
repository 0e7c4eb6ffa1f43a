"""The package as a user installs it: a wheel built from this checkout, installed without ``-e`` into a fresh
virtual environment, its console scripts run from an empty directory.

``distill-lab`` must then find its configs inside the installed package (the wheel carries ``conf/``), and
nothing of the checkout may be on the path: the environment has no ``PYTHONPATH``, and the test asserts that
``distill_lab`` is imported from the fresh environment.

The wheel is installed with ``--no-deps``, and the fresh environment reads its dependencies (torch,
transformers, Lightning, Hydra...) from this interpreter's site-packages through a ``.pth`` file: installing
them afresh would download gigabytes and take many minutes, while what this test checks is the wheel's own
content (the package, ``conf/``, the entry points) and that it runs outside the checkout. Directories named in
a ``.pth`` file are added to the path as they are: the ``.pth`` files inside them (an editable install's path
to a checkout's ``src/``) are not read. The wheel is built without build isolation where the build backend
(hatchling, in the dev extra) is installed, so that no package is fetched; elsewhere pip fetches it.

One run (``debug=fast`` on a tiny random teacher and a small CSV task, ``conftest.make_text_task``) and one
summary take well under a minute after the interpreter has started.
"""

from __future__ import annotations

import importlib.util
import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO_ROOT, app_env, make_text_task

pytestmark = pytest.mark.slow


def _site_packages() -> list[str]:
    """The site-packages directories on this interpreter's path, where the dependencies are installed (also
    those that a ``.pth`` file of this environment adds); not ``PYTHONPATH`` nor an editable install's
    ``src/``."""
    paths = [p for p in sys.path if Path(p).name in ("site-packages", "dist-packages") and Path(p).is_dir()]
    return list(dict.fromkeys(paths))


def _run(command: list, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``command`` run to its end in ``cwd``; the test fails, showing the end of its output, unless it
    succeeds."""
    command = [str(c) for c in command]
    result = subprocess.run(
        command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600, check=False
    )
    assert result.returncode == 0, (
        f"{shlex.join(command)}\nexited with {result.returncode}\n--- end of stdout ---\n"
        f"{result.stdout[-3000:]}\n--- end of stderr ---\n{result.stderr[-6000:]}"
    )
    return result


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> tuple[Path, Path]:
    """A fresh virtual environment with the wheel of this checkout installed (not editable): its directory
    and its site-packages."""
    root = tmp_path_factory.mktemp("wheel")
    dist, env_dir = root / "dist", root / "venv"
    isolation = ["--no-build-isolation"] if importlib.util.find_spec("hatchling") else []
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--quiet"]
    _run([*pip, "wheel", "--no-deps", *isolation, "--wheel-dir", dist, REPO_ROOT], root)
    (wheel,) = dist.glob("distill_lab-*.whl")
    _run([sys.executable, "-m", "venv", "--without-pip", env_dir], root)
    python = env_dir / "bin" / "python"
    purelib = _run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], root)
    site_packages = Path(purelib.stdout.strip())
    (site_packages / "dependencies.pth").write_text("\n".join(_site_packages()) + "\n")
    _run([*pip, "--python", python, "install", "--no-deps", "--no-index", wheel], root)
    return env_dir, site_packages


def test_the_installed_wheel_trains_and_summarises_from_an_empty_directory(venv, tmp_path):
    env_dir, site_packages = venv
    task = make_text_task(tmp_path / "task")
    workdir = tmp_path / "empty"
    workdir.mkdir()
    env = app_env(tmp_path)
    env.pop("PYTHONPATH")  # neither the checkout's src/ nor tests/

    where = _run(
        [env_dir / "bin" / "python", "-c", "import distill_lab; print(distill_lab.__file__)"], workdir, env
    )
    assert Path(where.stdout.strip()).resolve() == (site_packages / "distill_lab" / "__init__.py").resolve()

    overrides = [*task["overrides"], "debug=fast", "student=from_teacher", "student.num_layers=2"]
    overrides += ["loss=kl", "matching=headwise", "logger=csv", "callbacks.attention_maps=null"]
    _run([env_dir / "bin" / "distill-lab", *overrides], workdir, env)

    (run_dir,) = workdir.glob("outputs/*/*")  # Hydra's default run directory, below the working directory
    hydra = yaml.safe_load((run_dir / ".hydra" / "hydra.yaml").read_text())["hydra"]
    (main,) = [s for s in hydra["runtime"]["config_sources"] if s["provider"] == "main"]
    assert Path(main["path"]).resolve() == (site_packages / "distill_lab" / "conf").resolve()  # the wheel's
    assert hydra["job"]["name"] == "train" and (run_dir / "train.log").is_file()
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["loss"]["name"] == "kl" and config["matching"]["_target_"].endswith("Headwise")
    results = json.loads((run_dir / "results.json").read_text())
    assert {"acc", "f1"} <= set(results["student"]) and {"acc", "f1"} <= set(results["teacher"])
    assert Path(results["best_checkpoint"]).is_file() and (run_dir / "student" / "config.json").is_file()
    assert (run_dir / "csv" / "version_0" / "metrics.csv").is_file()

    summary = _run([env_dir / "bin" / "distill-lab-summarize", "outputs"], workdir, env)
    table = [line for line in summary.stdout.splitlines() if line.startswith("|")]
    assert table[0].startswith("| run |") and "| student acc |" in table[0] and len(table) == 3
    cells = [c.strip() for c in table[2].strip("|").split("|")]
    assert cells[0] == run_dir.relative_to(workdir / "outputs").as_posix()
    assert float(cells[-4]) == pytest.approx(results["student"]["acc"], abs=1e-4)
    written = (workdir / "outputs" / "summary.md").read_text().splitlines()
    assert [line for line in written if line.startswith("|")] == table
    assert (workdir / "outputs" / "summary.png").stat().st_size > 1000
