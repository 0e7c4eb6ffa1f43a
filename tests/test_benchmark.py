"""The benchmark script runs anywhere (tiny shapes on CPU) and reports the three variants side by side."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_distill.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_distill", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_training_benchmark_smoke(bench, tmp_path):
    out = tmp_path / "results.md"
    lines = bench.main(
        ["--preset", "tiny", "--seq", "32", "--batch", "2", "--device", "cpu", "--dtype", "float32",
         "--warmup", "1", "--steps", "1", "--quiet", "--out", str(out)]
    )  # fmt: skip
    rows = [line for line in lines if line.startswith("| 32 |")]
    assert [row.split(" | ")[1] for row in rows] == ["(a) logit-only KD", "(b) eager maps", "(c) distill-lab qk"]
    assert rows[0].split(" | ")[5] == "1.00x"  # (a) against itself
    assert rows[1].split(" | ")[6].rstrip(" |").endswith("x")  # (b)/(c) is reported
    assert "Device: CPU" in out.read_text() and "bench_distill.py --preset tiny" in out.read_text()


def test_kernel_benchmark_smoke(bench):
    """``--kernel`` times the three fused kernels and SDPA on one shape (under Triton's interpreter here)."""
    lines = bench.main(
        ["--kernel", "--seq", "16", "--head-dim", "16", "--kernel-heads", "2", "--batch", "1", "--device", "cpu",
         "--dtype", "float32", "--warmup", "0", "--steps", "1", "--quiet"]
    )  # fmt: skip
    (row,) = [line for line in lines if line.startswith("| 16 | 16 |")]
    cells = row.strip("| ").split(" | ")
    assert len(cells) == 9 and all(float(c.rstrip("x")) > 0 for c in cells[2:])
    sdpa_ms, kl_ms, kl_ratio = float(cells[2]), float(cells[3]), float(cells[4].rstrip("x"))
    assert kl_ratio == pytest.approx(kl_ms / sdpa_ms, rel=0.02, abs=0.01)  # fused / SDPA (from unrounded times)


def test_all_variants_optimise_the_same_student(bench):
    """Each variant's loss backpropagates into the student (and never into the teacher)."""
    import torch

    preset = bench.PRESETS["tiny"]
    teacher, student = bench.build_models(preset, 16, torch.float32, "cpu")
    pairs = bench.layer_map(preset["layers"], preset["student_layers"], "uniform")
    batch = bench.make_batch(preset, 2, 16, "cpu")
    losses = {}
    for name, variant in bench.variants(teacher, student, pairs, batch).items():
        variant.enter()
        try:
            loss = losses[name] = variant.step()
        finally:
            variant.leave()
        assert torch.isfinite(loss), name
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters()), name
        assert all(p.grad is None for p in teacher.parameters()), name
        student.zero_grad(set_to_none=True)
    assert teacher.config._attn_implementation == "sdpa" and student.config._attn_implementation == "sdpa"
    # (b) and (c) are one objective computed two ways; (a) lacks its attention term
    a, b, c = losses["(a) logit-only KD"], losses["(b) eager maps"], losses["(c) distill-lab qk"]
    torch.testing.assert_close(c.detach(), b.detach(), rtol=1e-4, atol=1e-6)
    assert not torch.allclose(a, b)
