"""LoRA students (``distill_lab.lora``): the default adapter targets per family; the attention (and
hidden-state) loss's gradient on the adapters through the capture, in both capture modes, checked against the
gradient of the same loss on the plain model with the adapters merged in; the export of the adapter, its base
and the merged model, each reloaded with its own library's loader; the configuration errors before training;
and one tiny run end to end (checkpoint, optimizer, export, card, resume).
"""

from __future__ import annotations

import copy
import json
import sys

import pandas as pd
import pytest
import torch
import yaml
from conftest import compose_config, make_text_task, make_tiny_inputs
from hydra.utils import instantiate
from peft import (
    AutoPeftModel,
    AutoPeftModelForCausalLM,
    AutoPeftModelForSequenceClassification,
    PeftModel,
)
from transformers import (
    AutoModelForCausalLM,
    AutoModelForImageClassification,
    AutoModelForSequenceClassification,
    AutoTokenizer,
)

from distill_lab import apply_lora
from distill_lab.attention import AttentionDistillationLoss
from distill_lab.capture import AttentionCapture
from distill_lab.hidden import hidden_mse
from distill_lab.lora import attention_targets, lora_record, save_lora_student, task_head
from distill_lab.model_card import card_text
from distill_lab.models import derive_student
from distill_lab.run import train

pytestmark = pytest.mark.usefixtures("torch_single_thread")
AUTO = {"bert": AutoModelForSequenceClassification, "llama": AutoModelForCausalLM,
        "gpt2": AutoModelForCausalLM, "vit": AutoModelForImageClassification}  # fmt: skip
AUTO_PEFT = {"bert": AutoPeftModelForSequenceClassification, "llama": AutoPeftModelForCausalLM,
             "gpt2": AutoPeftModelForCausalLM, "vit": AutoPeftModel}  # fmt: skip
# each family's self-attention block's linear layers, as the default targets name them
TARGETS = {
    "bert": ["attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"],
    "roberta": [
        "attention.self.query",
        "attention.self.key",
        "attention.self.value",
        "attention.output.dense",
    ],
    "llama": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"],
    "gpt2": ["attn.c_attn", "attn.c_proj"],
    "vit": ["attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.o_proj"],
}
HEADS = {"bert": ["classifier"], "roberta": ["classifier"], "llama": [], "gpt2": [], "vit": ["classifier"]}
# the query and key projections of a layer (GPT-2's c_attn makes both) and the rest of its attention block
QK = {"bert": ("self.query", "self.key"), "llama": ("q_proj", "k_proj")}
VO = {"bert": ("self.value", "output.dense"), "llama": ("v_proj", "o_proj")}


def _randomise_adapters(model, seed: int = 0) -> None:
    """B = 0 at the start makes every adapter the identity (and A's gradient 0): random B, and a changed copy
    of each module trained in full, so that an adapter that is lost shows."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_B." in name or ".modules_to_save." in name:
                param.add_(0.2 * torch.randn(param.shape, generator=generator, dtype=param.dtype))


def _adapter_grads(model, layer: int, parts: tuple[str, ...]) -> dict[str, torch.Tensor | None]:
    """The gradients of the lora_A and lora_B weights of ``layer``'s projections named ``...<part>``."""
    return {
        name: param.grad
        for name, param in model.named_parameters()
        if ".lora_" in name and f".{layer}." in name and any(f".{p}.lora_" in name for p in parts)
    }


@pytest.mark.parametrize("family", ["bert", "roberta", "llama", "gpt2", "vit"])
def test_the_default_targets_are_the_attention_blocks_linear_layers(tiny_model_factory, family):
    """Found from the attention modules, not a table: the four projections (BERT's output projection sits in
    BertSelfOutput, beside BertSelfAttention, inside BertAttention), never GPT-2's MLP c_proj; the head
    trains."""
    model = tiny_model_factory(family, num_hidden_layers=2)
    assert attention_targets(model) == TARGETS[family]
    assert task_head(model) == HEADS[family]
    wrapped = apply_lora(model, r=4)
    adapted = sorted({n.split(".lora_A")[0] for n, _ in wrapped.named_parameters() if ".lora_A." in n})
    assert len(adapted) == 2 * len(TARGETS[family])  # every layer's block, and nothing else
    assert not any(".mlp." in name for name in adapted)
    trained = {n for n, p in wrapped.named_parameters() if p.requires_grad}
    assert all(".lora_" in n or ".modules_to_save." in n for n in trained)
    assert any(".modules_to_save." in n for n in trained) == bool(HEADS[family])


@pytest.mark.parametrize("backend", ["qk", "qk-sdpa", "probs"])
@pytest.mark.parametrize("family", ["bert", "llama"])
def test_the_attention_loss_gradient_reaches_the_adapters(tiny_model_factory, family, backend):
    """The KL attention loss on student layer 1 through the capture of a LoRA student (LLaMA: grouped-query
    attention): the gradient on layer 1's query and key adapters is that of the same loss on the plain model
    with the adapters merged in (dL/dB = s G A^T, dL/dA = s B^T G, G the merged weight's gradient), in
    float64; the value and output adapters of layer 1 get none (the map does not depend on them), the
    frozen weights no gradient at all."""
    teacher = tiny_model_factory(family, num_hidden_layers=3).double()
    student = apply_lora(tiny_model_factory(family, seed=1, num_hidden_layers=2), r=4, alpha=8).double()
    _randomise_adapters(student)
    student.train()
    inputs = make_tiny_inputs(family, teacher.config)
    loss_fn = AttentionDistillationLoss("kl", "layerwise", [(2, 1)])

    # qk-sdpa: the qk capture past its memory budget (as on CUDA): the loss from queries and keys in blocks
    mode, budget = ("qk", 0) if backend == "qk-sdpa" else (backend, None)

    def attention_loss(model):
        t, s = (AttentionCapture(m, [layer], mode, budget) for m, layer in ((teacher, 2), (model, 1)))
        with t, s:
            with torch.no_grad():
                teacher_maps = t(**inputs)[1]
            return loss_fn(s(**inputs)[1], teacher_maps, inputs["attention_mask"])[0]

    attention_loss(student).backward()
    assert all(p.grad is None for n, p in student.named_parameters() if ".lora_" not in n)
    assert all(g is None or not g.any() for g in _adapter_grads(student, 1, VO[family]).values())

    merged = copy.deepcopy(student).merge_and_unload()
    merged.requires_grad_(False)
    weights = {part: merged.get_submodule(_block(family, 1, part)).weight for part in QK[family]}
    for weight in weights.values():
        weight.requires_grad_(True)
    attention_loss(merged).backward()
    scale = 8 / 4
    for part, weight in weights.items():
        layer = student.get_base_model().get_submodule(_block(family, 1, part))
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        assert a.grad.abs().max() > 1e-6 and b.grad.abs().max() > 1e-6, part
        torch.testing.assert_close(b.grad, scale * weight.grad @ a.detach().T, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(a.grad, scale * b.detach().T @ weight.grad, rtol=1e-9, atol=1e-12)


def _block(family: str, layer: int, part: str) -> str:
    prefix = {"bert": f"bert.encoder.layer.{layer}.attention", "llama": f"model.layers.{layer}.self_attn"}
    return f"{prefix[family]}.{part}"


def test_the_hidden_state_loss_gradient_reaches_the_adapters(tiny_model_factory):
    """TinyBERT's hidden-state MSE on the last hidden state, through the capture: the value and output
    adapters of the last layer, which the attention map ignores, get a gradient; the frozen weights none."""
    teacher = tiny_model_factory("bert", num_hidden_layers=3)
    student = apply_lora(tiny_model_factory("bert", seed=1, num_hidden_layers=2), r=4)
    _randomise_adapters(student)
    inputs = {**make_tiny_inputs("bert", teacher.config), "output_hidden_states": True}
    with AttentionCapture(teacher, [2]) as t, AttentionCapture(student, [1]) as s:
        with torch.no_grad():
            teacher_hidden = t(**inputs)[0].hidden_states[-1]
        hidden_mse(s(**inputs)[0].hidden_states[-1], teacher_hidden, inputs["attention_mask"]).backward()
    grads = _adapter_grads(student, 1, VO["bert"])
    assert len(grads) == 4 and all(g is not None and g.abs().max() > 1e-6 for g in grads.values())
    assert all(p.grad is None for n, p in student.named_parameters() if not p.requires_grad)


@pytest.mark.parametrize("family", ["bert", "llama", "gpt2", "vit"])
def test_the_adapter_its_base_and_the_merged_model_reload_with_their_own_loaders(
    tiny_model_factory, tmp_path, family
):
    """``student/``: the adapter, reloaded by peft's AutoPeftModel class of the task (and onto ``base/`` by
    PeftModel); ``student/merged``: a plain transformers model. All give the adapted student's logits."""
    model = apply_lora(tiny_model_factory(family, num_hidden_layers=2), r=4)
    _randomise_adapters(model)
    model.eval()
    inputs = make_tiny_inputs(family, model.config)
    with torch.no_grad():
        expected = model(**inputs).logits
        plain = model.get_base_model()
        with model.disable_adapter():
            assert (plain(**inputs).logits - expected).abs().max() > 1e-3  # the adapters change the outputs
    record = save_lora_student(model, tmp_path / "student", merge=True)
    assert record["merged_dir"] == str(tmp_path / "student" / "merged") and record["r"] == 4
    files = {p.name for p in (tmp_path / "student").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "base", "merged"} <= files
    assert "model.safetensors" not in files  # the adapter alone: the base lies in base/
    config = json.loads((tmp_path / "student" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((tmp_path / "student" / "base").resolve())

    reloaded = {
        "adapter": AUTO_PEFT[family].from_pretrained(tmp_path / "student"),
        "onto base": PeftModel.from_pretrained(
            AUTO[family].from_pretrained(tmp_path / "student" / "base"), tmp_path / "student"
        ),
        "transformers": AUTO[family].from_pretrained(tmp_path / "student"),  # transformers' own peft loading
        "merged": AUTO[family].from_pretrained(tmp_path / "student" / "merged"),
    }
    assert not any(".lora_" in n for n, _ in reloaded["merged"].named_parameters())
    for name, loaded in reloaded.items():
        with torch.no_grad():
            logits = loaded.eval()(**inputs).logits
        tolerance = 1e-5 if name == "merged" else 1e-6  # merging rounds W + s B A once
        torch.testing.assert_close(logits, expected, rtol=0, atol=tolerance, msg=name)


def test_targets_that_match_nothing_name_the_layers_there_are(tiny_model_factory):
    model = tiny_model_factory("llama", num_hidden_layers=2)
    with pytest.raises(ValueError, match=r"target_modules=\['query'\] names no module .*q_proj.*v_proj"):
        apply_lora(model, r=4, target_modules=["query"])
    with pytest.raises(ValueError, match=r"modules_to_save names \['classifier'\].*model, lm_head"):
        apply_lora(model, r=4, modules_to_save=["classifier"])
    with pytest.raises(ValueError, match=r"r=0, but LoRA needs a rank above 0"):
        apply_lora(model, r=0)
    wrapped = apply_lora(
        model, r=2, target_modules=r".*\.1\.self_attn\.(q|k)_proj"
    )  # a regex over full names
    # q_proj: A 2 x 32, B 32 x 2; k_proj (2 of the 4 heads, grouped-query): A 2 x 32, B 16 x 2
    assert lora_record(wrapped)["trainable_parameters"] == (2 * 32 + 32 * 2) + (2 * 32 + 16 * 2)
    with pytest.raises(ValueError, match="already holds adapters"):
        apply_lora(wrapped, r=2)


# ------------------------------------------------------------------------------------------ the app

BASE = ["student.num_layers=2", "debug=fast", "logger=csv", "fused_kernel=false"]
LORA = ["student.lora.r=4", "student.lora.alpha=8", "export.merge_lora=true"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["student.lora.r=-1"], r"student\.lora\.r=-1 must be a whole number, 0 or more"),
        (
            ["student.lora.r=4", "student.lora.dropout=1.5"],
            r"student\.lora\.dropout=1\.5 must be in \[0, 1\)",
        ),
        (["student.lora.r=4", "student.lora.alpha=0"], r"student\.lora\.alpha=0 must be above 0"),
        (["export.merge_lora=true"], r"export\.merge_lora=true, but the student has no LoRA adapters"),
        (["student.lora.r=4", "trainer=fsdp"], r"student\.lora with trainer=fsdp is not supported"),
    ],
    ids=["negative-r", "dropout", "alpha", "merge-without-lora", "fsdp"],
)
def test_lora_settings_that_cannot_work_fail_before_anything_loads(tmp_path, overrides, message):
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=message):
        train(compose_config([*BASE, *overrides], out))
    assert not (out / "checkpoints").exists()


def test_without_peft_the_error_gives_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # import peft raises ImportError
    with pytest.raises(ImportError, match=r"needs peft: pip install 'peft>=0\.13'"):
        train(compose_config([*BASE, "student.lora.r=4"], tmp_path / "run"))


def test_the_config_student_instantiated_alone_is_wrapped_too(tmp_path):
    """``cfg.student`` instantiated on its own (as a script of one's own might, without ``train``) takes
    its ``lora`` node; the config's list of targets reaches peft as names."""
    task = make_text_task(tmp_path / "task", num_layers=2)
    teacher = AutoModelForSequenceClassification.from_pretrained(task["teacher"])
    for option in ("from_teacher", "hf"):
        overrides = [f"student={option}", "student.lora.r=2", "student.lora.target_modules=[query,value]"]
        if option == "hf":
            overrides.append(f"student.name_or_path='{task['teacher']}'")
        student = instantiate(compose_config(overrides, tmp_path / "out").student, teacher=teacher)
        assert isinstance(student, PeftModel) and lora_record(student)["target_modules"] == ["query", "value"]
        adapted = {
            n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, _ in student.named_parameters() if ".lora_A." in n
        }
        assert adapted == {"query", "value"}
    plain = instantiate(compose_config(["student.lora.r=0"], tmp_path / "out").student, teacher=teacher)
    assert not isinstance(plain, PeftModel)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """One tiny BERT run with a LoRA student (r=4, alpha=8) and the merged export, then its resume for a
    second epoch from its last checkpoint in a directory of its own."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        mp.setenv("WANDB_MODE", "offline")
        root = tmp_path_factory.mktemp("lora")
        task = make_text_task(root / "task")
        out = root / "run"
        train(compose_config([*task["overrides"], *BASE, *LORA], out))
        resumed = root / "resumed"
        last = out / "checkpoints" / "last.ckpt"
        resume = [f"ckpt_path='{last}'", "trainer.max_epochs=2"]
        train(compose_config([*task["overrides"], *BASE, *LORA, *resume], resumed))
        yield {"task": task, "out": out, "resumed": resumed}


def _student_from_checkpoint(task: dict, path: str):
    """The student the run trains, rebuilt as the run builds it, with the checkpoint's weights loaded
    strictly (every key of the checkpoint's student, and no other)."""
    teacher = AutoModelForSequenceClassification.from_pretrained(task["teacher"])
    plain = derive_student(teacher, 2)
    student = apply_lora(copy.deepcopy(plain), r=4, alpha=8, task="sequence_classification")
    state = torch.load(path, map_location="cpu", weights_only=False)
    student.load_state_dict({k.removeprefix("student."): v for k, v in state["state_dict"].items()})
    return plain, student.eval(), state


def test_a_lora_run_trains_only_the_adapters_and_the_head(lora_run):
    """The checkpoint's frozen weights are the derived student's as built; the optimizer holds one state per
    adapter and head tensor; the adapters moved; results.json records the settings and the merged size."""
    results = json.loads((lora_run["out"] / "results.json").read_text())
    plain, student, state = _student_from_checkpoint(lora_run["task"], results["best_checkpoint"])
    assert not any(k.startswith("teacher.") for k in state["state_dict"])
    frozen = {
        n.replace(".base_layer", "").replace(".original_module", ""): p
        for n, p in student.get_base_model().named_parameters()
        if ".lora_" not in n and ".modules_to_save." not in n
    }
    assert frozen.keys() == dict(plain.named_parameters()).keys()
    assert all(torch.equal(p, frozen[n]) for n, p in plain.named_parameters())
    trained = [n for n, p in student.named_parameters() if p.requires_grad]
    assert len(state["optimizer_states"][0]["state"]) == len(trained) == 2 * 4 * 2 + 2  # A, B x 4 x 2; head
    assert all(p.abs().max() > 0 for n, p in student.named_parameters() if ".lora_B." in n)
    record = results["lora"]
    assert record["r"] == 4 and record["alpha"] == 8 and record["target_modules"] == sorted(TARGETS["bert"])
    assert record["trainable_parameters"] == sum(
        p.numel() for n, p in student.named_parameters() if n in trained
    )
    assert results["parameters"]["student"] == sum(p.numel() for p in plain.parameters())


def test_the_exported_adapter_and_merged_student_give_the_trained_students_logits(lora_run):
    """The best checkpoint's student, and ``student/`` reloaded three ways (peft's AutoPeftModel class in
    place, PeftModel onto ``student/base`` as from a copy or the hub, transformers' class on
    ``student/merged``): the same logits on a batch of the validation texts."""
    results = json.loads((lora_run["out"] / "results.json").read_text())
    _, student, _ = _student_from_checkpoint(lora_run["task"], results["best_checkpoint"])
    directory = lora_run["out"] / "student"
    tokenizer = AutoTokenizer.from_pretrained(directory)
    texts = pd.read_csv(lora_run["task"]["validation_file"])["text"][:8].tolist()
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    loaded = {
        "adapter": AutoPeftModelForSequenceClassification.from_pretrained(directory),
        "onto base": PeftModel.from_pretrained(
            AutoModelForSequenceClassification.from_pretrained(directory / "base"), directory
        ),
        "transformers": AutoModelForSequenceClassification.from_pretrained(directory),
        "merged": AutoModelForSequenceClassification.from_pretrained(directory / "merged"),
    }
    with torch.no_grad():
        expected = student(**batch).logits
        for name, model in loaded.items():
            torch.testing.assert_close(
                model.eval()(**batch).logits, expected, rtol=0, atol=1e-5 if name == "merged" else 1e-6
            )
    assert AutoTokenizer.from_pretrained(directory / "merged").get_vocab() == tokenizer.get_vocab()


def test_the_card_of_a_lora_student_follows_the_hubs_peft_conventions(lora_run):
    text = (lora_run["out"] / "student" / "README.md").read_text()
    meta = yaml.safe_load(text.split("---\n")[1])
    assert meta["library_name"] == "peft" and "lora" in meta["tags"]
    assert "base_model" not in meta  # a derived student's base is no hub model: it lies in base/
    assert "- **LoRA:** r=4, alpha=8, dropout=0.0, on attention.output.dense, attention.self.key" in text
    assert 'path = "path/to/student"' in text
    assert 'base = AutoModelForSequenceClassification.from_pretrained(f"{path}/base")' in text
    assert "model = PeftModel.from_pretrained(base, path)" in text
    assert 'merged = AutoModelForSequenceClassification.from_pretrained(f"{path}/merged")' in text


def test_the_card_names_a_hub_student_as_the_adapters_base_and_the_download():
    """``student=hf`` with a hub name: that model is the adapter's ``base_model`` (not the teacher); with a
    hub repository the loading snippet downloads it first."""
    record = {
        "r": 8, "alpha": 16, "dropout": 0.1, "target_modules": ["query", "value"],
        "modules_to_save": ["classifier"], "trainable_parameters": 1234, "merged_dir": None,
    }  # fmt: skip
    results = {
        "task": "sequence_classification", "student": {"acc": 0.8}, "teacher": {"acc": 0.9},
        "parameters": {"teacher": 400, "student": 100, "compression": 4.0}, "layer_map": [[3, 1]],
        "trained_steps": 10, "lora": record,
    }  # fmt: skip
    config = {
        "teacher": {"name_or_path": "org/big-bert"},
        "student": {"name_or_path": "org/small-bert", "lora": {"r": 8}},
    }
    layers = {"teacher": 4, "student": 2}
    text = card_text(results, config, layers=layers, command=None, version="0", repo_id="me/student")
    meta = yaml.safe_load(text.split("---\n")[1])
    assert meta["library_name"] == "peft" and meta["base_model"] == "org/small-bert"
    assert (
        "- **LoRA:** r=8, alpha=16, dropout=0.1, on query, value; trained in full: classifier; 1,234" in text
    )
    assert 'path = snapshot_download("me/student")' in text and "merged" not in text
    plain = card_text(
        results | {"lora": None}, config | {"student": {}}, layers=layers, command=None, version="0"
    )
    assert yaml.safe_load(plain.split("---\n")[1])["base_model"] == "org/big-bert" and "peft" not in plain


def test_a_lora_run_resumes_from_its_checkpoint(lora_run):
    """The resumed run loads the LoRA student and its optimizer's state (one per trained tensor) and trains
    the second epoch's 4 steps on top of the first's: its last checkpoint's adapters moved on from the
    first run's, its frozen weights did not."""
    first = json.loads((lora_run["out"] / "results.json").read_text())
    resumed = json.loads((lora_run["resumed"] / "results.json").read_text())
    assert first["trained_steps"] == 4 and resumed["trained_steps"] == 8
    task = lora_run["task"]
    _, before, _ = _student_from_checkpoint(task, str(lora_run["out"] / "checkpoints" / "last.ckpt"))
    _, after, state = _student_from_checkpoint(task, str(lora_run["resumed"] / "checkpoints" / "last.ckpt"))
    assert state["global_step"] == 8
    pairs = list(zip(after.named_parameters(), before.named_parameters(), strict=True))
    assert all(torch.equal(a, b) for (n, a), (_, b) in pairs if not a.requires_grad)
    assert max((a - b).abs().max() for (n, a), (_, b) in pairs if ".lora_" in n) > 0
