"""What each fused Triton kernel asks of a GPU, found by compiling it, on any machine (no GPU needed).

The launch wrappers (``attention_kl_rows``, ``attention_probs_rows``) run forward and backward on ``meta``
tensors with Triton's launches recorded instead of made, so every kernel gets exactly the arguments, block
sizes and launch options a real call gives it. Each launch is then specialised as Triton's launcher
specialises a real call (16-byte aligned pointers and integers divisible by 16 marked so, integers equal to 1
made constants: without it loads compile unvectorised, with other registers, spills and shared memory) and
compiled by Triton's compiler and the ptxas that ships with triton into a cubin for the target GPU, and the
table reports per kernel: the shared memory one thread block needs (against the GPU's per-block limit), and
ptxas's registers per thread and spilled bytes. Compiler facts, not timings: whether a spill costs time is for
``bench_distill.py --kernel``.

    python benchmarks/kernel_resources.py                                  # bf16, head sizes 64 and 128, H100
    python benchmarks/kernel_resources.py --dtype float32 --head-dim 128 256 --arch 80 90
    python benchmarks/kernel_resources.py --head-dim 128 --num-warps 8            # another launch option
    python benchmarks/kernel_resources.py --json                           # one JSON list (tests read it)

Triton reads ``TRITON_INTERPRET`` when the kernels are defined; it is removed here before they are imported.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # compile the kernels, do not interpret them

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

# the shared memory one thread block may use (the opt-in maximum): A100 163 KB, H100 227 KB
SHARED_MEMORY_PER_BLOCK = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
LOSSES = ("kl", "mse", "cosine")
_TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int32: "i32"}
_OPTIONS = ("num_warps", "num_stages")


def recorded_launches(
    loss: str, dtype: torch.dtype, head_dim: int, causal: bool, teacher_dtype: torch.dtype | None = None
) -> list[tuple]:
    """``[(kernel, args, kwargs), ...]``: the launches of one forward and backward of ``loss``'s fused kernels
    (8 student query heads over 2 key heads, 12 teacher heads, L = 300), as the wrappers make them; the
    teacher's tensors in ``teacher_dtype`` where given (a float32 teacher beside a bf16 student)."""
    from triton.runtime.jit import JITFunction

    from distill_lab.kernels.attention_kl import attention_kl_rows
    from distill_lab.kernels.attention_probs import attention_probs_rows

    launches = []
    run = JITFunction.run
    JITFunction.run = lambda self, *args, grid, warmup, **kwargs: launches.append((self, args, kwargs))
    try:
        meta = lambda *shape, dtype=dtype: torch.empty(*shape, device="meta", dtype=dtype)  # noqa: E731
        qs, ks = meta(2, 8, 300, head_dim).requires_grad_(), meta(2, 2, 300, head_dim).requires_grad_()
        qt, kt = (meta(2, 12, 300, head_dim, dtype=teacher_dtype or dtype) for _ in range(2))
        heads, valid = meta(8, dtype=torch.int32), meta(2, 300, dtype=torch.int32)
        scale = head_dim**-0.5
        if loss == "kl":
            rows = attention_kl_rows(qs, ks, qt, kt, heads, heads, valid, scale, scale, 2.0, causal)
        else:
            rows = attention_probs_rows(loss, qs, ks, qt, kt, heads, heads, valid, scale, scale, causal)
        rows.sum().backward()
    finally:
        JITFunction.run = run
    return launches


def _signature(kernel, args: tuple, kwargs: dict) -> tuple[dict, dict, dict, dict]:
    """Triton's ``signature``, ``constexprs`` and ``attrs`` for one recorded launch, as the launcher
    specialises a real call (``triton.runtime.jit``): a pointer aligned to 16 bytes (as torch allocates)
    and an integer divisible by 16 are marked so (``tt.divisibility``, which lets loads vectorise), an
    integer equal to 1 becomes a constant; and its launch options."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.nvidia.compiler import CUDABackend

    signature, constexprs, attrs = {}, {}, {}
    values = dict(zip(kernel.arg_names, args, strict=False)) | {
        k: v for k, v in kwargs.items() if k not in _OPTIONS
    }
    for i, param in enumerate(kernel.params):
        value = values[param.name]
        if param.is_constexpr:
            kind, spec = "constexpr", None
        else:
            kind, spec = native_specialize_impl(
                CUDABackend,
                value,
                param.is_const,
                not param.do_not_specialize,
                not param.do_not_specialize_on_alignment,
            )
        signature[param.name] = kind
        if kind == "constexpr":
            constexprs[(i,)] = value
        elif isinstance(spec, str):
            attrs[(i,)] = CUDABackend.parse_attr(spec)
    return signature, constexprs, attrs, {k: v for k, v in kwargs.items() if k in _OPTIONS}


def compile_launch(kernel, args: tuple, kwargs: dict, arch: int, num_warps: int | None = None):
    """One recorded launch compiled by Triton for the GPU architecture ``arch`` (``compiled.asm`` holds its
    TTIR, PTX and cubin); ``num_warps`` replaces the launch's own."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, constexprs, attrs, options = _signature(kernel, args, kwargs)
    if num_warps is not None:
        options["num_warps"] = num_warps
    return triton.compile(
        ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs),
        target=GPUTarget("cuda", arch, 32),
        options=options,
    )


def _ptxas_report(ptx: str, arch: int) -> dict:
    """Registers per thread and spilled bytes, from ``ptxas -v`` on the kernel's PTX (None where the bundled
    ptxas cannot read it)."""
    import triton.backends.nvidia as nvidia

    binaries = sorted((Path(nvidia.__file__).parent / "bin").glob("ptxas*"), reverse=True)  # the newest first
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "kernel.ptx"
        source.write_text(ptx)
        for ptxas in binaries:
            done = subprocess.run(
                [str(ptxas), "-v", f"--gpu-name=sm_{arch}{'a' if arch >= 90 else ''}", str(source),
                 "-o", os.devnull],
                capture_output=True, text=True,
            )  # fmt: skip
            if done.returncode == 0:
                text = done.stderr
                registers = re.search(r"Used (\d+) registers", text)
                spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
                return {
                    "registers": int(registers.group(1)) if registers else None,
                    "spill_stores": int(spills.group(1)) if spills else None,
                    "spill_loads": int(spills.group(2)) if spills else None,
                }
    return {"registers": None, "spill_stores": None, "spill_loads": None}


def kernel_resources(
    losses=LOSSES,
    dtypes=(torch.bfloat16,),
    head_dims=(64, 128),
    archs=(90,),
    causal: bool = True,
    ptxas: bool = True,
    num_warps: int | None = None,
) -> list[dict]:
    """One row per (loss, dtype, head size, kernel, GPU architecture): the launch's block sizes and options,
    the shared memory it needs and the GPU's per-block limit, and (``ptxas``) registers and spills.
    ``num_warps`` replaces the launches' own (Triton's default, 4) to see what another choice would ask."""
    rows = []
    for dtype in dtypes:
        for head_dim in head_dims:
            for loss in losses:
                for kernel, args, kwargs in recorded_launches(loss, dtype, head_dim, causal):
                    for arch in archs:
                        compiled = compile_launch(kernel, args, kwargs, arch, num_warps)
                        row = {
                            "loss": loss, "dtype": str(dtype).removeprefix("torch."), "head_dim": head_dim,
                            "causal": causal, "kernel": kernel.__name__, "arch": arch,
                            "blocks": [kwargs["BLOCK_M"], kwargs["BLOCK_N"]],
                            "num_warps": compiled.metadata.num_warps,
                            "num_stages": compiled.metadata.num_stages, "shared": compiled.metadata.shared,
                            "shared_limit": SHARED_MEMORY_PER_BLOCK.get(arch),
                            "cubin_bytes": len(compiled.asm["cubin"]),
                        }  # fmt: skip
                        if ptxas:
                            row |= _ptxas_report(compiled.asm["ptx"], arch)
                        rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = [
        "| loss | dtype | head dim | kernel | sm | blocks | warps | stages | shared KB (limit) | registers | "
        "spill stores B |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        limit = f"{r['shared_limit'] / 1024:.0f}" if r["shared_limit"] else "?"
        lines.append(
            f"| {r['loss']} | {r['dtype']} | {r['head_dim']} | `{r['kernel']}` | {r['arch']} | "
            f"{r['blocks'][0]}x{r['blocks'][1]} | {r['num_warps']} | {r['num_stages']} | "
            f"{r['shared'] / 1024:.0f} ({limit}) | {r.get('registers', '')} | {r.get('spill_stores', '')} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--loss", nargs="+", default=list(LOSSES), choices=LOSSES)
    parser.add_argument(
        "--dtype", nargs="+", default=["bfloat16"], choices=["bfloat16", "float16", "float32"]
    )
    parser.add_argument("--head-dim", type=int, nargs="+", default=[64, 128])
    parser.add_argument(
        "--arch", type=int, nargs="+", default=[90], help="compute capability: 80 (A100), 90 (H100)"
    )
    parser.add_argument("--bidirectional", action="store_true", help="no causal mask (the default is causal)")
    parser.add_argument(
        "--num-warps", type=int, help="compile with this many warps instead of the launches' own"
    )
    parser.add_argument("--no-ptxas", action="store_true", help="skip the registers and spills report")
    parser.add_argument("--json", action="store_true", help="print the rows as one JSON list")
    args = parser.parse_args(argv)
    rows = kernel_resources(
        args.loss, [getattr(torch, d) for d in args.dtype], args.head_dim, args.arch, not args.bidirectional,
        ptxas=not args.no_ptxas, num_warps=args.num_warps,
    )  # fmt: skip
    print(json.dumps(rows) if args.json else markdown(rows))
    return rows


if __name__ == "__main__":
    main()
