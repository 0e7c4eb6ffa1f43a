"""The fused Triton kernels compiled for NVIDIA GPUs (Ampere sm_80, Hopper sm_90) on a machine without one.

The other kernel tests run the kernels under Triton's CPU interpreter, which executes their Python source and
forgives what the compiler refuses (a kernel reading a plain module global, for one, failed every CUDA
compile while every interpreted test passed). ``benchmarks/kernel_resources.py`` runs the launch wrappers on
``meta`` tensors with the launches recorded instead of made, so each kernel gets exactly the arguments, block
sizes and options a real call gives it, and compiles each launch with Triton's compiler and the ptxas shipped
with triton to a cubin for the target. Here every kernel must compile, and ask for no more shared memory than
one thread block has on that GPU. What only a GPU can tell (speed, run-to-run determinism, bf16 tiles) is
left to the GPU tests and the benchmark.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
from conftest import REPO_ROOT

pytest.importorskip("triton")

SCRIPT = REPO_ROOT / "benchmarks" / "kernel_resources.py"
KERNELS = {
    "kl": {"_kl_fwd", "_kl_bwd_dq", "_kl_bwd_dk"},
    "mse": {"_probs_fwd", "_probs_bwd_dq", "_probs_bwd_dk"},
    "cosine": {"_probs_fwd", "_probs_bwd_dq", "_probs_bwd_dk"},
}

# every kernel in bf16 as mixed-precision training runs it (GQA, causal) on both GPUs, with ptxas's report;
# then each tile shape that _meta picks for wider rows, on the tighter GPU: bf16 at head size 256 and float32
# at 128 (two stages), float32 at 256 (blocks of 32)
RUNS = {
    "bf16-128": ["--loss", "kl", "mse", "cosine", "--dtype", "bfloat16", "--head-dim", "128",
                 "--arch", "80", "90"],
    "bf16-256": ["--loss", "cosine", "--dtype", "bfloat16", "--head-dim", "256", "--arch", "80",
                 "--bidirectional", "--no-ptxas"],
    "fp32-128": ["--loss", "kl", "--dtype", "float32", "--head-dim", "128", "--arch", "80",
                 "--bidirectional", "--no-ptxas"],
    "fp32-256": ["--loss", "mse", "--dtype", "float32", "--head-dim", "256", "--arch", "80", "--no-ptxas"],
}  # fmt: skip
TILES = {
    "bf16-128": ([64, 64], 3),
    "bf16-256": ([64, 64], 2),
    "fp32-128": ([64, 64], 2),
    "fp32-256": ([32, 32], 2),
}


@pytest.mark.slow
@pytest.mark.parametrize("run", list(RUNS))
def test_every_fused_kernel_compiles_within_the_gpus_shared_memory(run):
    args = RUNS[run]
    done = subprocess.run(
        [sys.executable, str(SCRIPT), *args, "--json"], capture_output=True, text=True, timeout=1200
    )
    assert done.returncode == 0, done.stderr[-4000:]
    rows = json.loads(done.stdout.strip().splitlines()[-1])
    losses = args[args.index("--loss") + 1 : args.index("--dtype")]
    archs = {int(a) for a in args[args.index("--arch") + 1 :] if a.isdigit()}
    compiled = {(r["loss"], r["kernel"], r["arch"]) for r in rows}
    assert compiled == {(loss, kernel, arch) for loss in losses for kernel in KERNELS[loss] for arch in archs}
    assert all(r["cubin_bytes"] > 0 for r in rows)
    blocks, stages = TILES[run]
    assert all(r["blocks"] == blocks and r["num_stages"] == stages for r in rows)
    too_big = [r for r in rows if r["shared"] > r["shared_limit"]]
    assert not too_big, f"kernels that ask for more shared memory than a thread block has: {too_big}"
    if "--no-ptxas" not in args:  # ptxas -v read back: registers per thread, at most the 255 a thread has
        assert all(isinstance(r["registers"], int) and 0 < r["registers"] <= 255 for r in rows)


# the launches of a bf16 student beside a float32 teacher (head size 128, GQA, causal), compiled for sm_90:
# each kernel's launch options and TTIR. Triton's types do not depend on the sizes (a stride or size is an i32
# argument below 2^31), so the shapes of recorded_launches show the types of any real launch.
MIXED = """
import json, sys
sys.path.insert(0, sys.argv[1])
import kernel_resources as kr  # first: it unsets TRITON_INTERPRET before the kernels are defined
import torch

rows = []
for loss in ("kl", "cosine"):
    launches = kr.recorded_launches(loss, torch.bfloat16, 128, True, teacher_dtype=torch.float32)
    for kernel, args, kwargs in launches:
        compiled = kr.compile_launch(kernel, args, kwargs, 90)
        precision = {k: v for k, v in kwargs.items() if k.startswith("IEEE")}
        ttir = compiled.asm["ttir"]
        rows.append({"loss": loss, "kernel": kernel.__name__, "precision": precision, "ttir": ttir})
print(json.dumps(rows))
"""


@pytest.fixture(scope="module")
def mixed_precision_launches():
    done = subprocess.run(
        [sys.executable, "-c", MIXED, str(SCRIPT.parent)], capture_output=True, text=True, timeout=1200
    )
    assert done.returncode == 0, done.stderr[-4000:]
    rows = json.loads(done.stdout.strip().splitlines()[-1])
    assert {(r["loss"], r["kernel"]) for r in rows} == {
        (loss, k) for loss in ("kl", "cosine") for k in KERNELS[loss]
    }
    return rows


@pytest.mark.slow
def test_a_float32_teacher_gets_float32_dot_products_beside_a_bf16_student(mixed_precision_launches):
    """The wrapper asks for IEEE dot products on the float32 side only, and each kernel's float32 dot products
    (the teacher's scores) compile as IEEE, not TF32 (TTIR prints a dot's input precision unless it is
    IEEE)."""
    for r in mixed_precision_launches:
        assert r["precision"] == {"IEEE_S": False, "IEEE_T": True}, r["kernel"]
        dots = re.findall(r"tt\.dot (.*?) : tensor<(?:\d+x)+(\w+)> \* tensor<(?:\d+x)+(\w+)>", r["ttir"])
        operands = sorted({(a, b) for _, a, b in dots})
        assert operands == [("bf16", "bf16"), ("f32", "f32")], (r["kernel"], operands)
        rounded = [d for d, a, _ in dots if a == "f32" and "inputPrecision" in d]
        assert not rounded, f"{r['kernel']}: float32 dot products not in IEEE precision: {rounded}"


@pytest.mark.slow
def test_offsets_into_whole_tensors_are_64_bit(mixed_precision_launches):
    """Every offset from a tensor argument's start that the example, head or pair index scales (input tiles,
    row statistics, gradients) is 64-bit: in TTIR, each scalar pointer offset is an i64, except the pair's
    index into the head maps SH and TH. With 32-bit ones a tensor of 2^31 elements or more (B=16, 64 heads,
    L=32k, D=128) would be read and written at wrapped offsets; tests/test_kernels.py runs such offsets."""
    for r in mixed_precision_launches:
        scalar = re.findall(r"tt\.addptr %(\w+), %\w+ : !tt\.ptr<\w+>, (i\d+)", r["ttir"])
        narrow = sorted({arg for arg, width in scalar if width != "i64" and arg not in ("SH", "TH")})
        assert not narrow, f"{r['kernel']}: 32-bit offsets into {narrow}"
        wide = {arg for arg, width in scalar if width == "i64"}
        assert {"QS", "KS", "QT", "KT", "VALID", "LSE_S", "LSE_T"} <= wide, (r["kernel"], wide)


@pytest.mark.slow
def test_launches_are_compiled_as_the_launcher_specialises_them(mixed_precision_launches):
    """Triton's launcher marks 16-byte aligned pointers (every torch allocation) and integers divisible by 16
    (a head size's strides) as divisible by 16, which lets loads vectorise: compiled without that, a kernel
    gets other registers, spills and shared memory than on the GPU, and the figures in RESULTS.md would not be
    the GPU's. Every pointer argument carries the mark, as do the head-size strides."""
    for r in mixed_precision_launches:
        header = next(line for line in r["ttir"].splitlines() if "tt.func public" in line)
        pointers = re.findall(r"%(\w+): !tt\.ptr<\w+>( \{tt\.divisibility = 16 : i32\})?", header)
        assert pointers and all(mark for _, mark in pointers), (r["kernel"], pointers)
        assert re.search(r"%sqs_h: i32 \{tt\.divisibility = 16 : i32\}", header), r["kernel"]
