"""Shared fixtures: tiny random transformers models, saved and loaded back by path.

A model is built from its config class with tiny sizes (hidden 32, 3 layers, 4 heads, intermediate 37, vocab
100), saved with ``save_pretrained`` and loaded back with the Auto class, the same code path a hub name takes
(never touching the network). All dropout probabilities default to 0 so train-mode runs are deterministic;
pass e.g. ``attention_probs_dropout_prob=0.5`` to turn one on.

Reuse from any test file::

    def test_something(tiny_model_factory):
        model = tiny_model_factory("llama", num_hidden_layers=2)   # eval mode, GQA 4 query / 2 key heads
        inputs = make_tiny_inputs("llama", model.config)            # padded batch: input_ids, attention_mask

Below them: tiny tasks on disk and the app's config for end-to-end runs, the environment of the app in a
subprocess (``app_env``), a run to its end that must succeed or fail (``run_to_end``) and a run in the
background that a test interrupts (``TrainRun``), and the isolation of the environment variables that an
in-process run sets.
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import itertools
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time

# Without an NVIDIA driver, Triton kernels run on CPU tensors in its interpreter. Triton reads this when it is
# first imported (torch and lightning import it), so it is set before anything else.
if not os.path.exists("/proc/driver/nvidia"):
    os.environ.setdefault("TRITON_INTERPRET", "1")
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForImageClassification,
    AutoModelForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    RobertaConfig,
    RobertaForSequenceClassification,
    ViTConfig,
    ViTForImageClassification,
)

# Under pytest-xdist (``-n N``) N worker processes share the machine's cores: each takes its share of torch's
# intra-op threads, so that N pools of spinning OpenMP threads do not oversubscribe the cores.
_XDIST_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _XDIST_WORKERS > 1:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // _XDIST_WORKERS))

FAMILIES = ("bert", "roberta", "gpt2", "llama", "vit")
TEXT_FAMILIES = ("bert", "roberta", "gpt2", "llama")
CAUSAL_FAMILIES = ("gpt2", "llama")
ENCODER_FAMILIES = ("bert", "roberta", "vit")

TINY_VOCAB = 100
TINY_LAYERS = 3
TINY_HEADS = 4

# family -> (config class, concrete model class, Auto class used to load it back, config kwargs)
_FAMILY_SPECS: dict[str, tuple[type, type, type, dict]] = {
    "bert": (
        BertConfig,
        BertForSequenceClassification,
        AutoModelForSequenceClassification,
        dict(
            hidden_size=32,
            num_hidden_layers=TINY_LAYERS,
            num_attention_heads=TINY_HEADS,
            intermediate_size=37,
            vocab_size=TINY_VOCAB,
            max_position_embeddings=64,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            pad_token_id=0,
            num_labels=3,
        ),
    ),
    "roberta": (
        RobertaConfig,
        RobertaForSequenceClassification,
        AutoModelForSequenceClassification,
        dict(
            hidden_size=32,
            num_hidden_layers=TINY_LAYERS,
            num_attention_heads=TINY_HEADS,
            intermediate_size=37,
            vocab_size=TINY_VOCAB,
            # positions start at pad_token_id + 1 = 2, so this allows sequences up to 62 tokens
            max_position_embeddings=64,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            pad_token_id=1,
            bos_token_id=0,
            eos_token_id=2,
            num_labels=3,
        ),
    ),
    "gpt2": (
        GPT2Config,
        GPT2LMHeadModel,
        AutoModelForCausalLM,
        dict(
            n_embd=32,
            n_layer=TINY_LAYERS,
            n_head=TINY_HEADS,
            n_inner=37,
            vocab_size=TINY_VOCAB,
            n_positions=64,
            attn_pdrop=0.0,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            bos_token_id=0,
            eos_token_id=0,
        ),
    ),
    "llama": (
        LlamaConfig,
        LlamaForCausalLM,
        AutoModelForCausalLM,
        dict(
            hidden_size=32,
            num_hidden_layers=TINY_LAYERS,
            num_attention_heads=TINY_HEADS,
            num_key_value_heads=2,  # grouped-query attention: 2 query heads per key head
            intermediate_size=37,
            vocab_size=TINY_VOCAB,
            max_position_embeddings=64,
            attention_dropout=0.0,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        ),
    ),
    "vit": (
        ViTConfig,
        ViTForImageClassification,
        AutoModelForImageClassification,
        dict(
            hidden_size=32,
            num_hidden_layers=TINY_LAYERS,
            num_attention_heads=TINY_HEADS,
            intermediate_size=37,
            image_size=16,
            patch_size=4,  # 16 patches + [CLS] = 17 tokens
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            num_labels=3,
        ),
    ),
}


def _spec(family: str) -> tuple[type, type, type, dict]:
    try:
        return _FAMILY_SPECS[family]
    except KeyError:
        raise ValueError(f"unknown tiny model family {family!r}; choose from {FAMILIES}") from None


def make_tiny_config(family: str, **config_overrides) -> PretrainedConfig:
    """The tiny config of ``family``; overrides may use the generic names (``num_hidden_layers`` also for
    GPT-2)."""
    config_class, _, _, defaults = _spec(family)
    attribute_map = getattr(config_class, "attribute_map", {}) or {}
    overrides = {attribute_map.get(key, key): value for key, value in config_overrides.items()}
    return config_class(**{**defaults, **overrides})


def make_tiny_model(family: str, path: str | Path, *, seed: int = 0, **config_overrides) -> PreTrainedModel:
    """Build a tiny random model of ``family``, ``save_pretrained`` it to ``path`` and load it back by path.

    Loading goes through ``AutoModelForSequenceClassification`` (bert, roberta), ``AutoModelForCausalLM``
    (gpt2, llama) or ``AutoModelForImageClassification`` (vit). The weights depend only on ``seed`` and the
    config. Returns the loaded model in eval mode, with transformers' default attention implementation (sdpa).
    """
    _, model_class, auto_class, _ = _spec(family)
    config = make_tiny_config(family, **config_overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(config)
    path = Path(path)
    model.save_pretrained(path)
    loaded = auto_class.from_pretrained(path)
    return loaded.eval()


def make_tiny_inputs(
    family: str,
    config: PretrainedConfig,
    *,
    batch_size: int = 2,
    seq_len: int = 8,
    num_padded: int = 3,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Model inputs for a tiny model of ``family``.

    Text families: ``input_ids`` (B, seq_len) drawn from ``3..vocab-1`` (clear of the special ids) and an
    ``attention_mask`` where the *last* example has ``num_padded`` trailing padding positions (their ids set
    to the pad token). Vision: ``pixel_values`` (B, channels, image_size, image_size).
    """
    generator = torch.Generator().manual_seed(seed)
    if family == "vit":
        shape = (batch_size, config.num_channels, config.image_size, config.image_size)
        return {"pixel_values": torch.randn(shape, generator=generator)}
    _spec(family)
    input_ids = torch.randint(3, config.vocab_size, (batch_size, seq_len), generator=generator)
    attention_mask = torch.ones(batch_size, seq_len, dtype=torch.long)
    if num_padded:
        attention_mask[-1, seq_len - num_padded :] = 0
        pad_id = config.pad_token_id if config.pad_token_id is not None else 0
        input_ids[-1, seq_len - num_padded :] = pad_id
    return {"input_ids": input_ids, "attention_mask": attention_mask}


@pytest.fixture
def tiny_model_factory(tmp_path: Path) -> Callable[..., PreTrainedModel]:
    """``factory(family, *, seed=0, **config_overrides) -> model``: ``make_tiny_model`` into a fresh subfolder
    of the test's ``tmp_path`` (so one test can build several models)."""
    counter = itertools.count()

    def factory(family: str, *, seed: int = 0, **config_overrides) -> PreTrainedModel:
        return make_tiny_model(family, tmp_path / f"{family}-{next(counter)}", seed=seed, **config_overrides)

    return factory


# ---------------------------------------------------------------------------------------------- app helpers
# A tiny text task for end-to-end runs of the app (``distill_lab.run.train``) and a Hydra composer for it.

REPO_ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = REPO_ROOT / "conf"


def make_text_task(
    tmp_path: str | Path,
    family: str = "bert",
    num_layers: int = 4,
    num_heads: int = 4,
    *,
    seed: int = 0,
    num_train: int = 64,
    num_validation: int = 32,
    task: str = "sequence_classification",
    **config_overrides,
) -> dict:
    """A tiny distillation task on disk: a random teacher sequence classifier and the data files.

    Writes into ``tmp_path``:

    - ``teacher/``: a random ``family`` model (bert, roberta, gpt2 or llama) with a sequence-classification
      head (``num_labels=2`` unless overridden), ``num_layers`` layers and ``num_heads`` heads, saved with
      ``save_pretrained`` together with ``distill_lab.data.build_word_tokenizer()`` (vocabulary
      ``SYNTHETIC_WORDS``; the model's ``vocab_size`` is ``len(tokenizer)`` and ``pad_token_id`` its [PAD], 0,
      which causal models need to classify padded batches);
    - ``train.csv`` and ``validation.csv`` (columns ``text``, ``label``) from ``synthetic_relations``.

    With ``task="masked_lm"`` or ``"causal_lm"`` the teacher gets that task's head (``AutoModelForMaskedLM``,
    ``AutoModelForCausalLM``) and the CSVs hold the same sentences as raw text (``data=lm_local``).

    Returns ``{"dir", "teacher", "train_file", "validation_file"}`` (strings) and ``"overrides"``: the Hydra
    overrides that point a run at them (``teacher=hf teacher.name_or_path=... data=local ...``,
    ``data.max_length``: 64, or fewer where the model's position table holds fewer).
    """
    from distill_lab.data import build_word_tokenizer, synthetic_relations
    from distill_lab.models import position_limit
    from distill_lab.tasks import get_task

    if family not in TEXT_FAMILIES:
        raise ValueError(
            f"make_text_task: family {family!r} is not a text family; choose from {TEXT_FAMILIES}"
        )
    root = Path(tmp_path)
    root.mkdir(parents=True, exist_ok=True)
    tokenizer = build_word_tokenizer()
    overrides = dict(
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        num_labels=2,
    )
    if family == "llama":  # keep the grouped-query attention: half as many key/value heads
        overrides["num_key_value_heads"] = max(num_heads // 2, 1)
    config = make_tiny_config(family, **{**overrides, **config_overrides})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = get_task(task).auto_class.from_config(config)
    teacher_dir = root / "teacher"
    model.save_pretrained(teacher_dir)
    tokenizer.save_pretrained(teacher_dir)
    max_length = min(64, position_limit(model) or 64)  # RoBERTa's positions start past its padding id

    splits = synthetic_relations(num_train=num_train, num_validation=num_validation, seed=seed)
    files = {}
    for split in ("train", "validation"):
        files[split] = root / f"{split}.csv"
        splits[split].to_pandas()[["text", "label"]].to_csv(files[split], index=False)
    return {
        "dir": str(root),
        "teacher": str(teacher_dir),
        "train_file": str(files["train"]),
        "validation_file": str(files["validation"]),
        "overrides": [
            *([] if task == "sequence_classification" else [f"task={task}"]),
            "teacher=hf",
            f"teacher.name_or_path='{teacher_dir}'",
            "data=local" if task == "sequence_classification" else "data=lm_local",
            f"data.dataset.train_file='{files['train']}'",
            f"data.dataset.validation_file='{files['validation']}'",
            # within the tiny models' position tables; the sentences are shorter
            f"data.max_length={max_length}",
        ],
    }


def compose_config(
    overrides: list[str],
    output_dir: str | Path,
    cache_dir: str | Path | None = None,
    return_hydra_config: bool = False,
):
    """The app's config (``conf/config.yaml``) composed with Hydra's compose API, as ``train.py`` would see
    it.

    ``paths.output_dir`` is set to ``output_dir`` (the default, ``${hydra:runtime.output_dir}``, only resolves
    under ``@hydra.main``) and ``paths.cache_dir`` to ``cache_dir`` (default ``<output_dir>/.cache``), so
    nothing is written outside the test's directories. Composition errors (an unknown option) are raised.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    output_dir = Path(output_dir)
    cache_dir = Path(cache_dir) if cache_dir is not None else output_dir / ".cache"
    paths = [f"paths.output_dir='{output_dir}'", f"paths.cache_dir='{cache_dir}'"]
    given = {o.split("=", 1)[0].lstrip("+~") for o in overrides}
    paths = [p for p in paths if p.split("=", 1)[0] not in given]
    GlobalHydra.instance().clear()  # a failed composition elsewhere must not leave Hydra initialised
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=[*paths, *overrides], return_hydra_config=return_hydra_config)


def make_image_task(
    tmp_path: str | Path, num_layers: int = 4, num_heads: int = 4, *, seed: int = 0, per_class: int = 12
) -> dict:
    """A tiny image task on disk: a random ViT classifier (32x32 images, 8x8 patches: 16 patches and a CLS
    token) with its image processor in ``teacher/``, and image folders ``train/`` and ``validation/`` with two
    classes, ``horizontal`` and ``vertical`` stripes (PNG). Returns the paths and the Hydra ``overrides``
    (``task=image_classification teacher=hf ... data.dataset.train_dir=...``)."""
    import numpy as np
    from PIL import Image
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    root = Path(tmp_path)
    config = ViTConfig(
        image_size=32,
        patch_size=8,
        num_channels=3,
        hidden_size=32,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        intermediate_size=37,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=2,
        id2label={0: "horizontal", 1: "vertical"},
        label2id={"horizontal": 0, "vertical": 1},
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ViTForImageClassification(config)
    teacher_dir = root / "teacher"
    model.save_pretrained(teacher_dir)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(teacher_dir)
    rng = np.random.default_rng(seed)
    for split, count in (("train", per_class), ("validation", per_class // 2)):
        for label in ("horizontal", "vertical"):
            folder = root / split / label
            folder.mkdir(parents=True)
            for i in range(count):
                stripes = (np.arange(32) // rng.integers(2, 6) % 2 * 200).astype(np.uint8)
                image = np.broadcast_to(
                    stripes[:, None] if label == "horizontal" else stripes[None, :], (32, 32)
                )
                pixels = np.stack(
                    [image, rng.integers(0, 60, (32, 32)).astype(np.uint8), image // 2], axis=-1
                )
                Image.fromarray(np.ascontiguousarray(pixels)).save(folder / f"{i}.png")
    return {
        "dir": str(root),
        "teacher": str(teacher_dir),
        "train_dir": str(root / "train"),
        "validation_dir": str(root / "validation"),
        "overrides": [
            "task=image_classification",
            "data=imagefolder",
            "teacher=hf",
            f"teacher.name_or_path='{teacher_dir}'",
            f"data.dataset.train_dir='{root / 'train'}'",
            f"data.dataset.validation_dir='{root / 'validation'}'",
        ],
    }


@pytest.fixture(scope="module")
def torch_single_thread():
    """One intra-op thread for tiny models (on a busy 2-core machine OpenMP's spinning threads make each tiny
    call many times slower); restored after the module. Opt in with ``pytestmark =
    pytest.mark.usefixtures("torch_single_thread")`` or by requesting it from a module-scoped fixture."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------- the app in a
# subprocess

TESTS_DIR = REPO_ROOT / "tests"

# Inherited by a subprocess, each of these would change what the app does there; see app_env.
SCRUBBED_VARIABLES = (
    "WANDB_API_KEY",
    "TRITON_INTERPRET",
    "DISTILL_LAB_RESUME",
    "PL_GLOBAL_SEED", "PL_SEED_WORKERS",
    "LOCAL_RANK", "RANK", "WORLD_SIZE", "NODE_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "TORCHELASTIC_RUN_ID",
    "MASTER_ADDR", "MASTER_PORT",
    "SLURM_NTASKS",
)  # fmt: skip


def app_env(tmp_dir: str | Path, **extra: str) -> dict[str, str]:
    """The environment of the app in a subprocess (``python train.py``, the DDP worker script): this process's
    own, with the variables below set or removed, then ``extra`` (e.g. ``PYTHONWARNINGS="ignore"``).

    Set:

    - ``WANDB_MODE=offline``: a run never reaches the network, and the tests read the offline run files.
    - ``HF_HUB_OFFLINE=1``, ``HF_DATASETS_OFFLINE=1``: models and data come from the test's directories.
    - ``HF_DATASETS_CACHE=<tmp_dir>/hf-datasets``, ``DISTILL_LAB_CACHE=<tmp_dir>/cache``: the datasets' Arrow
      caches and the built-in teacher stay in the test's directory (nothing read from or left in
      ``~/.cache``).
    - ``OMP_NUM_THREADS=1``: a machine with few cores runs a test's processes side by side, and two runs that
      must give the same numbers do the same operations on one thread.
    - ``PYTHONPATH``: ``tests/`` first, so that an override may name a class defined in a test module
      (``+callbacks.pace._target_=test_resume.Pace``, ``trainer.strategy._target_=test_ddp.CPUFSDPStrategy``).

    Removed:

    - ``WANDB_API_KEY``: with a key the app's wandb logger would go online; the runs stay offline.
    - ``TRITON_INTERPRET``: this conftest sets it for the in-process kernel tests where there is no NVIDIA
      driver; in a subprocess the app chooses its kernels as it would for a user.
    - ``DISTILL_LAB_RESUME``: rank 0's ``ckpt_path=auto`` choice, handed to the DDP ranks that Lightning
      launches (``distill_lab.resume``); an in-process run leaves it in this process, and a run inheriting it
      together with ``LOCAL_RANK`` > 0 would take another run's checkpoint and directory.
    - ``PL_GLOBAL_SEED``, ``PL_SEED_WORKERS``: Lightning's ``seed_everything`` in an in-process run leaves
      them here; in a subprocess Lightning's DDP set-up re-seeds every rank from them (and seeds its
      distributed sampler), so a run that does not seed itself (the DDP worker script) would depend on which
      test ran before.
    - ``LOCAL_RANK``, ``RANK``, ``WORLD_SIZE``, ``NODE_RANK``, ``LOCAL_WORLD_SIZE``, ``GROUP_RANK``,
      ``TORCHELASTIC_RUN_ID``: present when the tests themselves run under a launcher (torchrun, a CI's);
      Lightning would then take the subprocess for one rank of a job started outside and start no DDP
      processes of its own, and ``LOCAL_RANK`` > 0 makes the app read the hand-over above.
    - ``MASTER_ADDR``, ``MASTER_PORT``: a fixed address and port make two DDP runs collide (the second cannot
      bind the port); without them Lightning picks a free port for each run.
    - ``SLURM_NTASKS``: inside a SLURM job Lightning takes it to mean that ``srun`` started the processes and
      waits for ranks that never come.
    """
    tmp_dir = Path(tmp_dir)
    env = {name: value for name, value in os.environ.items() if name not in SCRUBBED_VARIABLES}
    env.update(
        WANDB_MODE="offline",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        HF_DATASETS_CACHE=str(tmp_dir / "hf-datasets"),
        DISTILL_LAB_CACHE=str(tmp_dir / "cache"),
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join(p for p in (str(TESTS_DIR), os.environ.get("PYTHONPATH")) if p),
    )
    env.update(extra)
    return env


# two gloo processes on CPU, also where a GPU is (trainer=ddp picks the accelerator, and one GPU is not two)
CPU_DDP = ("trainer=ddp", "trainer.accelerator=cpu")
# trainer=fsdp on two CPU processes (test_ddp.CPUFSDPStrategy: Lightning's FSDPStrategy with device_id=cpu)
FSDP_ON_CPU = (
    "trainer=fsdp", "trainer.strategy._target_=test_ddp.CPUFSDPStrategy", "trainer.accelerator=cpu",
    "trainer.devices=2", "trainer.precision=32-true",
)  # fmt: skip


def callback_overrides(name: str, cls: type, **options) -> list[str]:
    """Overrides that add ``cls(**options)`` to a run's callbacks as ``callbacks.<name>``, as a user adds
    their own callback (``cls`` is defined in a test module, which ``app_env`` puts on a subprocess's
    path)."""
    return [f"+callbacks.{name}._target_={cls.__module__}.{cls.__name__}"] + [
        f"+callbacks.{name}.{k}={json.dumps(v)}" for k, v in options.items()
    ]


def train_py(*overrides: str) -> list[str]:
    """The command ``python train.py *overrides`` (this interpreter, the repository's ``train.py``)."""
    return [sys.executable, str(REPO_ROOT / "train.py"), *overrides]


def run_to_end(
    command: list[str], env: dict[str, str], *, timeout: float = 600, fails: bool = False
) -> subprocess.CompletedProcess:
    """``command`` (``train_py``, the DDP worker script) run to its end in the repository, where a user runs
    ``python train.py`` (Hydra's default run directory and the config's relative paths depend on it), its
    output captured as text.

    The test fails unless the command succeeded, or with ``fails=True`` unless it failed (a wrong override, a
    crash: the test then checks the message); either way the assertion carries the end of its stdout and
    stderr, so that a failing test shows why. So does a command still going after ``timeout`` seconds, which
    is killed.
    """
    try:
        result = subprocess.run(
            command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired as expired:  # its output so far comes as bytes, or None
        stdout, stderr = (b.decode(errors="replace") if b else "" for b in (expired.stdout, expired.stderr))
        message = f"{shlex.join(command)}\ndid not end within {timeout} s\n{_output_tails(stdout, stderr)}"
        raise AssertionError(message) from None
    expected = "to fail" if fails else "to succeed"
    assert (result.returncode != 0) == fails, (
        f"{shlex.join(command)}\nexited with {result.returncode}, expected {expected}\n"
        f"{_output_tails(result.stdout, result.stderr)}"
    )
    return result


def _output_tails(stdout: str, stderr: str) -> str:
    """The end of each stream: enough for a traceback (stderr, where the app and Lightning log) and the last
    lines printed."""
    return f"--- end of stdout ---\n{stdout[-3000:]}\n--- end of stderr ---\n{stderr[-6000:]}"


class TrainRun:
    """``command`` (see ``train_py``) started in the background in ``cwd``, for a test to wait until its run
    reaches a step, then interrupt or kill it.

    The output (stdout and stderr together) is copied to ``log`` as it comes, by a thread: a pipe that nobody
    read would fill up and block the run while the test polls its checkpoints. The run gets a session of its
    own, so that :meth:`kill` ends every process of it (the other DDP ranks are children of rank 0), and
    :meth:`interrupt` (SIGINT) reaches rank 0 alone, as Ctrl-C reaches ``python train.py``'s process. A run
    still going when the tests end is killed then.
    """

    def __init__(
        self, command: list[str], *, env: dict[str, str], log: str | Path, cwd: str | Path = REPO_ROOT
    ) -> None:
        self.cwd, self.log = Path(cwd), Path(log)
        self.log.parent.mkdir(parents=True, exist_ok=True)
        # Where this process ignores SIGINT (pytest started as a background job of a shell script: `pytest
        # &`), the run would inherit that, and Python never turns an ignored SIGINT into KeyboardInterrupt. A
        # handler installed here instead is reset to the default by exec, so the run gets Ctrl-C as a user's
        # ``python train.py`` does.
        unignore = (
            signal.getsignal(signal.SIGINT) == signal.SIG_IGN
            and threading.current_thread() is threading.main_thread()
        )
        if unignore:
            signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            self.process = subprocess.Popen(
                command,
                cwd=self.cwd,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        finally:
            if unignore:
                signal.signal(signal.SIGINT, signal.SIG_IGN)
        self._copier = threading.Thread(target=self._copy_output, daemon=True)
        self._copier.start()
        _STARTED_RUNS.append(self)

    def _copy_output(self) -> None:
        with open(self.log, "wb") as out:
            for chunk in iter(lambda: self.process.stdout.read1(1 << 16), b""):
                out.write(chunk)
                out.flush()

    def output(self) -> str:
        """What the run printed so far (nothing before the copying thread has opened the log)."""
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def running(self) -> bool:
        """Whether a process of the run is still alive: rank 0, or another that holds its output open."""
        return self.process.poll() is None or self._copier.is_alive()

    def wait(self, timeout: float = 300) -> int:
        """The exit status of the process started (rank 0), once every process of the run has ended (their
        output is closed). A run still going after ``timeout`` seconds is killed and the test fails."""
        deadline = time.monotonic() + timeout
        try:
            returncode = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(
                f"the run did not end within {timeout} s:\n{self.output()[-3000:]}"
            ) from None
        self._copier.join(max(deadline - time.monotonic(), 0.0))
        if self._copier.is_alive():
            self.kill()
            raise AssertionError(
                f"the process started ended ({returncode}) but one it started (a DDP rank) was still going "
                f"after {timeout} s:\n{self.output()[-3000:]}"
            )
        return returncode

    def interrupt(self) -> None:
        """Ctrl-C: SIGINT to the process started (rank 0), not to the processes it started."""
        self.process.send_signal(signal.SIGINT)

    def kill(self) -> None:
        """SIGKILL to every process of the run (its process group), where one is still alive."""
        if self.running():  # while one lives, the group id is still the run's
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()
        self._copier.join(10)

    def run_dirs(self) -> list[Path]:
        """The run directories that Hydra made under ``cwd`` (its default ``outputs/DATE/TIME``)."""
        return sorted(self.cwd.glob("outputs/*/*"))

    def wait_for_checkpoint(
        self, min_step: int, last: str | Path = "outputs/*/*/checkpoints/last.ckpt", timeout: float = 240
    ) -> Path:
        """Polls the checkpoint ``last`` (a path or a glob pattern, relative to ``cwd``; by default the
        ``last.ckpt`` of a run in Hydra's default directories) until it holds step ``min_step`` or later;
        returns its path. The checkpoint loads as Lightning's resume loads it (``weights_only=True``). The
        test fails if the run ends first; a run that gets nowhere in ``timeout`` seconds is killed."""
        pattern = str(self.cwd / last)
        deadline, seen = time.monotonic() + timeout, {}
        while time.monotonic() < deadline:
            assert self.process.poll() is None, (
                f"the run ended before step {min_step}:\n{self.output()[-3000:]}"
            )
            for path in map(Path, glob.glob(pattern)):
                try:
                    stamp = path.stat().st_mtime_ns
                    if seen.get(path) == stamp:
                        continue
                    step = torch.load(path, map_location="cpu", weights_only=True)["global_step"]
                except (OSError, RuntimeError, ValueError, EOFError):  # being written: look again
                    continue
                seen[path] = stamp
                if step >= min_step:
                    return path
            time.sleep(0.02)
        self.kill()
        raise AssertionError(f"no checkpoint of step {min_step} after {timeout} s:\n{self.output()[-3000:]}")


_STARTED_RUNS: list[TrainRun] = []


@atexit.register
def _kill_runs_left_going() -> None:
    for run in _STARTED_RUNS:
        run.kill()


# ---------------------------------------------------------------------------------------------- in-process
# isolation

# What a run in this process (``distill_lab.run.train``) sets in ``os.environ``: the app's DDP hand-over
# (``distill_lab.resume``) and Lightning's ``seed_everything``; and, for an offline run, Lightning's wandb
# logger sets WANDB_MODE=dryrun.
APP_SET_VARIABLES = ("DISTILL_LAB_RESUME", "PL_GLOBAL_SEED", "PL_SEED_WORKERS")
RESTORED_VARIABLES = (*APP_SET_VARIABLES, "WANDB_MODE")


@pytest.fixture(autouse=True)
def isolated_app_variables(monkeypatch):
    """Every test starts without the variables that an in-process run sets (``APP_SET_VARIABLES``: an earlier
    test's ``DISTILL_LAB_RESUME`` would be a later one's DDP hand-over), and gets back, after it, the values
    of ``RESTORED_VARIABLES`` it started with (``WANDB_MODE`` is the user's choice, kept during the test)."""
    for name in RESTORED_VARIABLES:
        before = os.environ.get(name)
        # setenv records the value before the test, or its absence, for monkeypatch to restore (delenv records
        # nothing for a variable that is absent, so one that the test sets would stay)
        monkeypatch.setenv(name, "" if before is None else before)
        if before is None or name in APP_SET_VARIABLES:
            monkeypatch.delenv(name)


@pytest.fixture
def sdpa_calls(monkeypatch) -> list:
    """The attention modules that ran transformers' SDPA attention through the capture, in call order: a
    layer whose maps the capture keeps runs eager attention instead."""
    from distill_lab import capture

    calls, real_sdpa = [], capture.sdpa_attention_forward

    def counting_sdpa(module, *args, **kwargs):
        calls.append(module)
        return real_sdpa(module, *args, **kwargs)

    monkeypatch.setattr(capture, "sdpa_attention_forward", counting_sdpa)
    return calls
