"""Teachers and students: loading by path through from_pretrained, deriving a student, the built-in
teacher."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import app_env, make_image_task, make_tiny_model, run_to_end, train_py
from transformers import AutoConfig

from distill_lab.builtin import evaluate, train_builtin_teacher
from distill_lab.capture import attention_modules
from distill_lab.data import TextClassificationData, build_word_tokenizer, synthetic_relations
from distill_lab.models import count_parameters, derive_student, load_student, load_teacher, load_tokenizer


def _layer_params(model, index: int) -> dict[str, torch.Tensor]:
    """The parameters of attention layer ``index``'s enclosing block, keyed by their name inside the block."""
    name = attention_modules(model)[index][0]
    prefix = name.split(f".{index}.")[0] + f".{index}."
    return {k[len(prefix) :]: v for k, v in model.state_dict().items() if k.startswith(prefix)}


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
def test_derived_student_copies_the_mapped_teacher_layers(tmp_path, family):
    teacher = make_tiny_model(family, tmp_path, num_hidden_layers=4)
    student = derive_student(teacher, num_layers=2)
    assert type(student) is type(teacher)
    assert student.config.num_hidden_layers == 2 and teacher.config.num_hidden_layers == 4
    for s_layer, t_layer in ((0, 1), (1, 3)):  # uniform map 4 -> 2
        s_params, t_params = _layer_params(student, s_layer), _layer_params(teacher, t_layer)
        assert s_params.keys() == t_params.keys()
        for key in s_params:
            torch.testing.assert_close(s_params[key], t_params[key], rtol=0, atol=0)
    # everything outside the layers (embeddings, head) is copied too
    t_state = teacher.state_dict()
    outside = [
        k for k in student.state_dict() if ".layer." not in k and ".layers." not in k and ".h." not in k
    ]
    assert outside
    for key in outside:
        torch.testing.assert_close(student.state_dict()[key], t_state[key], rtol=0, atol=0)
    assert student.training and count_parameters(student) < count_parameters(teacher)


def test_random_init_and_narrower_student(tmp_path):
    teacher = make_tiny_model("bert", tmp_path, num_hidden_layers=4)
    random_student = derive_student(teacher, num_layers=2, init="random")
    assert not torch.equal(
        _layer_params(random_student, 0)["attention.self.query.weight"],
        _layer_params(teacher, 1)["attention.self.query.weight"],
    )
    narrow = derive_student(teacher, num_layers=2, num_heads=2, hidden_size=16, intermediate_size=20)
    assert (
        narrow.config.hidden_size,
        narrow.config.num_attention_heads,
        narrow.config.intermediate_size,
    ) == (16, 2, 20)
    # shapes differ, so those tensors keep their random initialisation; the model still runs
    assert narrow.bert.embeddings.word_embeddings.weight.shape == (teacher.config.vocab_size, 16)
    logits = narrow(input_ids=torch.tensor([[5, 6, 7]])).logits
    assert logits.shape == (1, teacher.config.num_labels)


def test_gqa_student_with_fewer_heads_keeps_a_valid_key_value_grouping(tmp_path):
    teacher = make_tiny_model("llama", tmp_path, num_hidden_layers=4)  # 4 heads, 2 key/value heads
    student = derive_student(teacher, num_layers=2, num_heads=2)
    assert student.config.num_attention_heads == 2 and student.config.num_key_value_heads == 2
    assert student.config.head_dim == teacher.config.hidden_size // 2
    out = student(input_ids=torch.tensor([[5, 6, 7, 8]]))
    assert torch.isfinite(out.logits).all()


@pytest.mark.parametrize("family", ["qwen2", "gemma2"])
def test_a_student_attends_per_layer_as_the_teacher_layer_it_starts_from(tmp_path, family):
    """Per-layer settings (``layer_types``: sliding or full attention) follow the teacher layer each student
    layer is copied from, and the student saves and loads (transformers refuses a config whose layer_types
    has another length than its layers)."""
    from transformers import AutoModelForCausalLM, Gemma2Config, Qwen2Config

    shape = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    if family == "qwen2":  # full attention in layers 0-1, a sliding window from layer 2 on
        config = Qwen2Config(**shape, use_sliding_window=True, sliding_window=6, max_window_layers=2)
    else:  # sliding and full attention alternate
        config = Gemma2Config(**shape, head_dim=8, sliding_window=6)
    teacher = AutoModelForCausalLM.from_config(config)
    types = teacher.config.layer_types
    assert len(set(types)) == 2
    for layers, sources in ((2, [1, 3]), (3, [0, 2, 3])):  # layer_map(4, n, "uniform")
        student = derive_student(teacher, num_layers=layers)
        assert student.config.layer_types == [types[t] for t in sources]
        student.save_pretrained(tmp_path / f"{family}-{layers}")
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path / f"{family}-{layers}")
        assert loaded.config.layer_types == student.config.layer_types
        ids = torch.randint(0, 64, (1, 12))
        torch.testing.assert_close(loaded(input_ids=ids).logits, student.eval()(input_ids=ids).logits)


def test_a_tensor_only_the_first_teacher_layer_has_is_copied_from_there():
    """T5 keeps its relative-position bias in block 0 only; student block 0 starts from teacher block 1, which
    has none, so the bias comes from teacher block 0 instead of staying random."""
    from transformers import T5Config, T5EncoderModel

    teacher = T5EncoderModel(T5Config(vocab_size=50, d_model=16, d_kv=4, d_ff=16, num_layers=4, num_heads=2))
    student = derive_student(teacher, num_layers=2)
    bias = "block.0.layer.0.SelfAttention.relative_attention_bias.weight"
    torch.testing.assert_close(
        student.encoder.state_dict()[bias], teacher.encoder.state_dict()[bias], rtol=0, atol=0
    )
    q = "block.0.layer.0.SelfAttention.q.weight"  # the rest of block 0 from teacher block 1
    torch.testing.assert_close(
        student.encoder.state_dict()[q],
        teacher.encoder.state_dict()[q.replace("block.0", "block.1")],
        rtol=0,
        atol=0,
    )


def test_the_feed_forward_width_is_set_under_each_configs_own_name(tmp_path):
    """student.intermediate_size reaches DistilBERT's hidden_dim as it reaches BERT's intermediate_size; a
    config without a width distill-lab knows is an error rather than a silently wider student."""
    from transformers import (
        BloomConfig,
        BloomForCausalLM,
        DistilBertConfig,
        DistilBertForSequenceClassification,
        ViTConfig,
        ViTForImageClassification,
    )

    teacher = DistilBertForSequenceClassification(
        DistilBertConfig(vocab_size=64, dim=32, hidden_dim=64, n_layers=4, n_heads=4)
    )
    student = derive_student(teacher, num_layers=2, intermediate_size=16)
    assert (
        student.config.hidden_dim == 16
        and student.distilbert.transformer.layer[0].ffn.lin1.out_features == 16
    )
    vit = ViTForImageClassification(
        ViTConfig(
            image_size=8,
            patch_size=4,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=37,
        )
    )
    assert derive_student(vit, num_layers=1, intermediate_size=16).config.intermediate_size == 16
    bloom = BloomForCausalLM(
        BloomConfig(vocab_size=64, hidden_size=32, n_layer=2, n_head=4)
    )  # 4 x hidden, fixed
    with pytest.raises(
        ValueError,
        match="student.intermediate_size=16: the teacher's BloomConfig names its feed-forward width",
    ):
        derive_student(bloom, num_layers=1, intermediate_size=16)


def test_a_head_size_of_its_own_stays_and_a_derived_one_follows_the_width(tmp_path):
    """Gemma's head size is its own (256 at any width): a student with fewer heads keeps it. LLaMA's is the
    width over the heads: a narrower student gets its own (it kept the teacher's 8 at width 16)."""
    from transformers import AutoModelForCausalLM, Gemma2Config

    gemma = AutoModelForCausalLM.from_config(Gemma2Config(
        vocab_size=64, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16,
    ))  # fmt: skip
    student = derive_student(
        gemma, num_layers=1, num_heads=3
    )  # 32 is no multiple of 3: fine with its own size
    assert student.config.head_dim == 16 and student.config.num_key_value_heads == 1
    assert student.model.layers[0].self_attn.q_proj.out_features == 3 * 16
    assert torch.isfinite(student(input_ids=torch.tensor([[5, 6, 7]])).logits).all()
    llama = make_tiny_model("llama", tmp_path, num_hidden_layers=2)  # width 32, 4 heads of 8
    narrow = derive_student(llama, num_layers=1, hidden_size=16)
    assert narrow.config.head_dim == 4 and narrow.model.layers[0].self_attn.q_proj.out_features == 16
    assert derive_student(llama, num_layers=1, num_heads=2).config.head_dim == 16


def test_derive_student_errors(tmp_path):
    teacher = make_tiny_model("bert", tmp_path, num_hidden_layers=4)
    with pytest.raises(ValueError, match="num_layers=5 must be between 1 and the teacher's 4"):
        derive_student(teacher, num_layers=5)
    with pytest.raises(ValueError, match="num_layers=0"):
        derive_student(teacher, num_layers=0)
    with pytest.raises(ValueError, match="not divisible"):
        derive_student(teacher, num_layers=2, num_heads=3)
    with pytest.raises(ValueError, match="student.init"):
        derive_student(teacher, num_layers=2, init="magic")


def test_image_teacher_without_its_image_processor_is_named(tmp_path):
    from distill_lab.models import load_preprocessor

    teacher = Path(make_image_task(tmp_path, num_layers=1, per_class=2)["teacher"])
    assert load_preprocessor(str(teacher), "image_classification").size == {"height": 32, "width": 32}
    (teacher / "preprocessor_config.json").unlink()
    with pytest.raises(
        ValueError, match=r"cannot load an image processor from .*teacher.*preprocessor_config\.json"
    ):
        load_preprocessor(str(teacher), "image_classification")


def test_teacher_loads_by_path_frozen_and_in_eval_mode(tmp_path):
    saved = make_tiny_model("bert", tmp_path / "t")
    teacher = load_teacher(str(tmp_path / "t"))
    assert not teacher.training
    assert not any(p.requires_grad for p in teacher.parameters())
    for key, value in saved.state_dict().items():
        torch.testing.assert_close(teacher.state_dict()[key], value)
    student = load_student(str(tmp_path / "t"), teacher=teacher)
    assert student.config.num_labels == teacher.config.num_labels


def test_a_student_by_name_reads_its_classes_as_the_teacher_does(tmp_path):
    """load_student gives the student the teacher's id2label and label2id, not transformers' LABEL_0, LABEL_1:
    the exported student names its predictions as the teacher does."""
    names = {0: "NEGATIVE", 1: "POSITIVE"}
    make_tiny_model(
        "bert", tmp_path / "t", num_labels=2, id2label=names, label2id={v: k for k, v in names.items()}
    )
    assert load_teacher(str(tmp_path / "t")).config.id2label == names
    make_tiny_model("bert", tmp_path / "s", num_labels=2, num_hidden_layers=1)
    teacher = load_teacher(str(tmp_path / "t"))
    student = load_student(str(tmp_path / "s"), teacher=teacher)
    assert student.config.id2label == names and student.config.label2id == {"NEGATIVE": 0, "POSITIVE": 1}
    student.save_pretrained(tmp_path / "exported")
    assert AutoConfig.from_pretrained(tmp_path / "exported").id2label == names


def test_the_tokenizer_and_image_processor_load_at_the_teachers_revision(tmp_path, monkeypatch):
    """teacher.revision pins the hub version of the teacher's preprocessor too, not only of its weights (a
    local directory has no revisions, so the call is recorded)."""
    from types import SimpleNamespace

    import transformers

    from distill_lab import models
    from distill_lab.models import load_preprocessor

    make_tiny_model("bert", tmp_path / "t")
    build_word_tokenizer().save_pretrained(tmp_path / "t")
    calls = []

    def from_pretrained(name, **kwargs):
        calls.append(kwargs)
        return SimpleNamespace(pad_token="[PAD]")

    for auto in (transformers.AutoTokenizer, transformers.AutoImageProcessor):
        monkeypatch.setattr(getattr(models, auto.__name__), "from_pretrained", from_pretrained)
    load_preprocessor(str(tmp_path / "t"), "sequence_classification", revision="v1.2")
    load_preprocessor(str(tmp_path / "t"), "image_classification", revision="abc123")
    load_preprocessor(str(tmp_path / "t"), "sequence_classification")
    assert [call.get("revision") for call in calls] == ["v1.2", "abc123", None]


def test_unloadable_teacher_and_tokenizer_are_clear_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=r"cannot load the teacher teacher.name_or_path=.*no loadable model"):
        load_teacher(str(empty))
    with pytest.raises(ValueError, match="neither a local directory"):
        load_teacher(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match=r"holds no tokenizer .*tokenizer.save_pretrained\(directory\)"):
        load_tokenizer(str(empty))
    model_only = (
        tmp_path / "model-only"
    )  # model.save_pretrained alone: transformers would make up a tokenizer
    make_tiny_model("bert", model_only)
    with pytest.raises(ValueError, match="holds no tokenizer"):
        load_tokenizer(str(model_only))
    with pytest.raises(ValueError, match="cannot load a tokenizer"):
        load_tokenizer(str(tmp_path / "not-a-directory"))
    with pytest.raises(ValueError, match="unknown task"):
        load_teacher(str(empty), task="translation")


def test_builtin_teacher_is_trained_saved_and_loaded_through_from_pretrained(tmp_path):
    out = tmp_path / "teacher"
    accuracy = train_builtin_teacher("relations", out, max_epochs=1, attempts=1)
    assert (out / "config.json").exists() and (out / "teacher_metrics.txt").exists()
    assert (
        (out / "teacher_metrics.txt").read_text().startswith(f"validation_acc={accuracy:.4f}\nvalidation_f1=")
    )
    teacher = load_teacher(str(out), builtin="relations")  # cached: loads, does not retrain
    tokenizer = load_tokenizer(str(out))
    data = TextClassificationData(synthetic_relations(seed=0), tokenizer=tokenizer, batch_size=64)
    data.setup()
    assert evaluate(teacher, data.val_dataloader(), "sequence_classification")["acc"] == pytest.approx(
        accuracy
    )
    assert tokenizer("good not bad")["input_ids"] == build_word_tokenizer()("good not bad")["input_ids"]
    with pytest.raises(ValueError, match="unknown built-in teacher"):
        train_builtin_teacher("chess", tmp_path / "x")


@pytest.mark.slow
def test_readme_default_command_runs_offline_end_to_end(tmp_path):
    """`python train.py` with no arguments: trains the built-in teacher, distils, exports, reports."""
    env = app_env(tmp_path)
    del env["OMP_NUM_THREADS"]  # the threads a newcomer's run gets, not the one of the side-by-side test runs
    env.update({k: v for k, v in os.environ.items() if k == "OMP_NUM_THREADS"})
    run_dir = tmp_path / "run"
    proc = run_to_end(train_py(f"hydra.run.dir={run_dir}"), env, timeout=900)
    results = json.loads((run_dir / "results.json").read_text())
    assert results["teacher"]["acc"] >= 0.9  # the built-in teacher learned the negation relation
    assert results["student"]["acc"] > 0.75  # beyond what a bag of words can reach
    assert results["parameters"]["compression"] > 1.5
    assert "inference speed-up" in proc.stdout and "wandb sync" in proc.stdout + proc.stderr
    assert (tmp_path / "cache" / "builtin-sequence_classification-v2" / "config.json").exists()
    assert (run_dir / "student" / "config.json").exists()
