"""Peak resident memory of each training-step variant of ``bench_distill.py``, each in a process of its own.

    python benchmarks/bench_memory.py --preset tiny --seq 512 2048 --batch 2 --out benchmarks/RESULTS.md

For each length, one process per variant builds the models and the batch and runs a few training steps of that
variant alone; a further process builds them and runs nothing, the baseline. Each process's peak resident set
size (``ru_maxrss``, read with ``os.wait4``) is what the variant asked of the machine's memory, which on a CPU
is all the memory there is; one process per variant, since a process's peak covers everything it ever ran. The
children run with glibc's mmap threshold fixed (``MALLOC_MMAP_THRESHOLD_``): otherwise glibc raises it as
large blocks are freed and serves later ones from its heap, and the peak then depends on the order of
allocations (by a few hundred MiB from run to run). Memory that grows with L x L per captured layer (eager
maps) shows against memory that grows with L (the ``qk`` capture's records beyond its memory budget). Imports
only torch, transformers and distill-lab's pure modules, as ``bench_distill.py``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_distill  # noqa: E402
import bench_setup  # noqa: E402

VARIANTS = {  # the key a child process is given -> the row's name (bench_distill.variants' keys)
    "models": "(0) models and batch only",
    "a": "(a) logit-only KD",
    "b": "(b) eager maps",
    "c": "(c) distill-lab qk",
}


def run_variant(args) -> None:
    """In a child process: build the models and the batch, and run ``args.variant``'s steps alone."""
    preset = bench_setup.PRESETS[args.preset]
    teacher, student = bench_setup.build_models(preset, args.seq, torch.float32, "cpu")
    batch = bench_setup.make_batch(preset, args.batch, args.seq, "cpu")
    if args.variant == "models":
        return
    pairs = bench_distill.layer_map(preset["layers"], preset["student_layers"], "uniform")
    variant = bench_distill.variants(teacher, student, pairs, batch)[VARIANTS[args.variant]]
    variant.enter()
    try:
        bench_distill.time_step(variant.step, list(student.parameters()), "cpu", 0, args.steps)
    finally:
        variant.leave()


def peak_mib(args, length: int, variant: str) -> float:
    """The peak resident memory, MiB, of a child process that runs ``variant`` at ``length``."""
    command = [
        sys.executable, __file__, "--variant", variant, "--preset", args.preset, "--seq", str(length),
        "--batch", str(args.batch), "--steps", str(args.steps), "--threads", str(torch.get_num_threads()),
    ]  # fmt: skip
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(2**16)}  # freed tensors leave the resident set
    with tempfile.TemporaryFile() as errors:
        child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=errors, env=env)
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait again
        if child.returncode:
            errors.seek(0)
            raise RuntimeError(f"{variant} at L = {length} failed:\n{errors.read().decode()[-3000:]}")
    return usage.ru_maxrss / (2**20 if sys.platform == "darwin" else 2**10)  # bytes on macOS, KiB on Linux


def run(args) -> list[str]:
    lines = [
        f"## Peak resident memory, preset `{args.preset}`, float32, batch {args.batch}, "
        f"{bench_setup.device_name('cpu')}, one process per variant",
        "",
        "| L | variant | peak MiB | over (0) MiB |",
        "|---|---|---|---|",
    ]
    for length in args.seq:
        keys = ["models", *(key for key in VARIANTS if key in args.variants and key != "models")]
        peaks = {key: peak_mib(args, length, key) for key in keys}
        for key in keys:
            name = VARIANTS[key]
            over = "" if key == "models" else f"{peaks[key] - peaks['models']:,.0f}"
            lines.append(f"| {length} | {name} | {peaks[key]:,.0f} | {over} |")
            if not args.quiet:
                print(lines[-1], file=sys.stderr)
    return lines


def main(argv: list[str] | None = None) -> list[str]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(bench_setup.PRESETS), default="tiny")
    parser.add_argument("--seq", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2, help="training steps each process runs")
    parser.add_argument("--threads", type=int, help="torch's intra-op threads (default: torch's)")
    parser.add_argument("--variants", nargs="+", choices=["a", "b", "c"], default=["a", "b", "c"])
    parser.add_argument("--variant", choices=sorted(VARIANTS), help=argparse.SUPPRESS)  # a child's
    parser.add_argument("--out", type=Path, help="append the markdown table to this file")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.variant is not None:
        args.seq = args.seq[0]
        run_variant(args)
        return []
    lines = run(args)
    return bench_setup.report(lines, "bench_memory.py", argv, "cpu", args.out)


if __name__ == "__main__":
    main()
