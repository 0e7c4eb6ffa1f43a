"""What the benchmarks share: the model presets, the teacher and its derived student, a batch, and the
names of the device and the library versions a table states. Imports only torch, transformers and
distill-lab's pure modules.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import transformers
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from distill_lab.models import derive_student  # noqa: E402

PRESETS = {
    # BERT-base-sized teacher (12 layers, 12 heads, 768) into 6 layers, all six student layers matched
    "bert-base": dict(
        family="bert", hidden=768, layers=12, heads=12, kv_heads=12, ffn=3072, student_layers=6, vocab=30522
    ),
    # a LLaMA-style 1B-sized teacher (GQA, RoPE; random weights) into half its depth
    "llama-1b": dict(
        family="llama", hidden=2048, layers=16, heads=32, kv_heads=8, ffn=8192, student_layers=8, vocab=32000
    ),
    # tiny shapes for a CPU smoke run
    "tiny": dict(
        family="llama", hidden=64, layers=4, heads=4, kv_heads=2, ffn=128, student_layers=2, vocab=500
    ),
}


def build_models(preset: dict, max_len: int, dtype: torch.dtype, device: str):
    # initialised where they run: a 1B model's CPU initialisation takes half a minute
    with torch.device(device):
        teacher = _teacher(preset, max_len)
        student = derive_student(teacher, preset["student_layers"])
    teacher.to(dtype=dtype).eval().requires_grad_(False)
    student.to(dtype=dtype).train()
    for model in (teacher, student):  # no variant reuses a key/value cache: none builds one (nor distill-lab)
        model.config.use_cache = False
    return teacher, student


def _teacher(preset: dict, max_len: int):
    if preset["family"] == "bert":
        config = BertConfig(
            vocab_size=preset["vocab"], hidden_size=preset["hidden"], num_hidden_layers=preset["layers"],
            num_attention_heads=preset["heads"], intermediate_size=preset["ffn"],
            max_position_embeddings=max(512, max_len), num_labels=2, attention_probs_dropout_prob=0.0,
            hidden_dropout_prob=0.0,
        )  # fmt: skip
        teacher = BertForSequenceClassification(config)
    else:
        config = LlamaConfig(
            vocab_size=preset["vocab"], hidden_size=preset["hidden"], num_hidden_layers=preset["layers"],
            num_attention_heads=preset["heads"], num_key_value_heads=preset["kv_heads"],
            intermediate_size=preset["ffn"], max_position_embeddings=max(2048, max_len),
        )  # fmt: skip
        teacher = LlamaForCausalLM(config)
    return teacher


def make_batch(preset: dict, batch: int, length: int, device: str) -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, preset["vocab"], (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    if batch > 1:
        mask[-1, length * 3 // 4 :] = 0  # one padded example, so masks are exercised
    out = {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
    if preset["family"] == "bert":
        out["labels"] = torch.randint(0, 2, (batch,), generator=g).to(device)
    return out


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    threads = torch.get_num_threads()
    return f"CPU ({threads} thread{'' if threads == 1 else 's'})"


def versions() -> str:
    try:
        import triton

        kernels = f"triton {triton.__version__}"
    except ImportError:
        kernels = "no triton"
    return f"torch {torch.__version__}, transformers {transformers.__version__}, {kernels}"


def report(lines: list[str], script: str, argv: list[str] | None, device: str, out: Path | None) -> list[str]:
    """A table's ``lines`` with the device, the library versions and the command that made it (``python
    benchmarks/<script> <argv>``): printed, and appended to ``out`` where given."""
    command = f"python benchmarks/{script} {' '.join(argv if argv is not None else sys.argv[1:])}"
    lines = [*lines, "", f"Device: {device_name(device)}; {versions()}. Command: `{command}`", ""]
    print("\n".join(lines))
    if out:
        with out.open("a") as fh:
            fh.write("\n".join(lines) + "\n")
    return lines
