"""The fused Triton kernels compiled for NVIDIA GPUs (Ampere sm_80, Hopper sm_90) on a machine without one.

The other kernel tests run the kernels under Triton's CPU interpreter, which executes their Python source and
forgives what the compiler refuses (a kernel reading a plain module global, for one, failed every CUDA
compile while every interpreted test passed). Here the launch wrappers run on ``meta`` tensors with the
launches recorded instead of made, so each kernel gets exactly the arguments and block sizes a real call
gives it; each launch is then compiled by Triton's compiler and ptxas (shipped with triton) to a cubin for the
target, and the shared memory it asks for is checked against what one thread block may use there. What only
a GPU can tell (speed, run-to-run determinism, bf16 tiles) is left to the GPU tests and the benchmark.

The compile runs in a subprocess: the test session sets ``TRITON_INTERPRET=1``, which Triton reads when the
kernels are defined.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO_ROOT

triton = pytest.importorskip("triton")

# the shared memory one thread block may use (the opt-in maximum): A100 163 KB, H100 227 KB
SHARED_MEMORY_PER_BLOCK = {80: 166912, 90: 232448}

# (loss, dtype, head size, causal, targets): every kernel in bf16 as mixed-precision training runs it, with GQA
# and a causal mask, on both GPUs; then each of the tile sizes that _meta picks for wider rows (bf16 at head
# size 256 and float32 at 128: two stages; float32 at 256: blocks of 32) on the tighter one
CASES = [
    ("kl", "bfloat16", 128, True, (80, 90)),
    ("mse", "bfloat16", 128, True, (80, 90)),
    ("cosine", "bfloat16", 256, False, (80,)),
    ("kl", "float32", 128, False, (80,)),
    ("cosine", "float32", 256, True, (80,)),
]

COMPILE = r"""
import json, sys
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

from distill_lab.kernels.attention_kl import attention_kl_rows
from distill_lab.kernels.attention_probs import attention_probs_rows

launches = []
JITFunction.run = lambda self, *args, grid, warmup, **kwargs: launches.append((self, args, kwargs))
TYPES = {torch.bfloat16: "bf16", torch.float32: "fp32", torch.int32: "i32"}
OPTIONS = ("num_warps", "num_stages")

def signature(fn, args, kwargs):
    sig = {}
    for name, value in zip(fn.arg_names, args):
        if isinstance(value, torch.Tensor):
            sig[name] = "*" + TYPES[value.dtype]
        elif isinstance(value, float):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    const = {(fn.arg_names.index(k),): v for k, v in kwargs.items() if k not in OPTIONS}
    sig.update({fn.arg_names[i]: "constexpr" for (i,) in const})
    return sig, const, {k: v for k, v in kwargs.items() if k in OPTIONS}

results = []
for loss, dtype, d, causal, targets in json.loads(sys.argv[1]):
    launches.clear()
    meta = lambda *shape, dtype=getattr(torch, dtype): torch.empty(*shape, device="meta", dtype=dtype)
    qs, ks = meta(2, 8, 300, d).requires_grad_(), meta(2, 2, 300, d).requires_grad_()  # GQA: 4 queries per key
    qt, kt = meta(2, 12, 300, d), meta(2, 12, 300, d)
    heads, valid = torch.empty(8, dtype=torch.int32, device="meta"), meta(2, 300, dtype=torch.int32)
    if loss == "kl":
        rows = attention_kl_rows(qs, ks, qt, kt, heads, heads, valid, d**-0.5, d**-0.5, 2.0, causal)
    else:
        rows = attention_probs_rows(loss, qs, ks, qt, kt, heads, heads, valid, d**-0.5, d**-0.5, causal)
    rows.sum().backward()
    for fn, args, kwargs in launches:
        sig, const, options = signature(fn, args, kwargs)
        for cap in targets:
            kernel = triton.compile(
                ASTSource(fn=fn, signature=sig, constexprs=const), target=GPUTarget("cuda", cap, 32), options=options
            )
            results.append({"case": [loss, dtype, d, causal], "kernel": fn.__name__, "target": cap,
                            "shared": kernel.metadata.shared, "cubin": len(kernel.asm["cubin"])})
print(json.dumps(results))
"""


@pytest.mark.slow
def test_every_fused_kernel_compiles_for_ampere_and_hopper_within_their_shared_memory():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT / "src"), env.get("PYTHONPATH", "")])
    done = subprocess.run(
        [sys.executable, "-c", COMPILE, json.dumps(CASES)], env=env, capture_output=True, text=True, timeout=1200
    )
    assert done.returncode == 0, done.stderr[-4000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    compiled = {(tuple(r["case"]), r["kernel"], r["target"]) for r in results}
    kernels = {"kl": ("_kl_fwd", "_kl_bwd_dq", "_kl_bwd_dk"), "probs": ("_probs_fwd", "_probs_bwd_dq", "_probs_bwd_dk")}
    expected = {
        ((loss, dtype, d, causal), kernel, cap)
        for loss, dtype, d, causal, targets in CASES
        for kernel in kernels["kl" if loss == "kl" else "probs"]
        for cap in targets
    }
    assert compiled == expected
    assert all(r["cubin"] > 0 for r in results)
    too_big = [r for r in results if r["shared"] > SHARED_MEMORY_PER_BLOCK[r["target"]]]
    assert not too_big, f"kernels that ask for more shared memory than a thread block has: {too_big}"
