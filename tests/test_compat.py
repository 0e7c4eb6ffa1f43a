"""``distill_lab._compat`` is the one door to Lightning's internals.

Two guards keep it so:

- every private attribute (and internal object) it reaches (``_compat.REACHED``) and every path of the saved
  loop state it rewrites (``_compat.SAVED_LOOP_STATE``) exists on real objects of the installed Lightning,
  and each compat function still means what the callers rely on, checked in a small real ``fit``; a release
  that renames or drops one fails here, naming it;
- no other module of ``src/distill_lab`` touches a private Lightning attribute, the loops' progress objects
  or a checkpoint's ``"loops"`` state (a scan of the source).
"""

from __future__ import annotations

import ast
import contextlib
import copy
import functools
import importlib
import inspect
import re
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from distill_lab import _compat
from distill_lab.resume import restart_validation, rewind_to_batch

PACKAGE = Path(_compat.__file__).parent
LIGHTNING = Path(L.__file__).parent
VERSION = L.__version__
BATCHES, VAL_BATCHES, VAL_EVERY = 4, 2, 2  # batches of an epoch, of a validation; validate every 2 batches


# ------------------------------------------------------------------------------------------ a real fit


class Tiny(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(3, 1)

    def double(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * self.layer(x)

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.layer(batch[0]).pow(2).mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return DataLoader(TensorDataset(torch.randn(2 * BATCHES, 3)), batch_size=2)

    def val_dataloader(self):
        return DataLoader(TensorDataset(torch.randn(2 * VAL_BATCHES, 3)), batch_size=2)


class Probe(L.Callback):
    """Records what the compat functions say at each training batch's end, and exercises the ModelCheckpoint
    ones on the second batch."""

    def __init__(self, checkpoint: ModelCheckpoint, dump_at: int | None = None) -> None:
        self.checkpoint, self.dump_at = checkpoint, dump_at
        self.seen: list[dict] = []
        self.validations: list[tuple[int, int]] = []  # (global step, logging step) as a validation starts
        self.first_batch: tuple[int, int] | None = None  # (batch_idx, global step) of the first batch trained
        self.dump: dict | None = None
        self.saving: dict = {}

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if self.first_batch is None:
            self.first_batch = (batch_idx, trainer.global_step)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.seen.append(
            {
                "batch_idx": batch_idx,
                "epoch": _compat.epoch_counts(trainer),
                "batches": _compat.batch_counts(trainer),
                "is_last_batch": _compat.is_last_batch(trainer),
                "validation_follows": _compat.validation_follows_batch(trainer),
                "logging_step": _compat.logging_step(trainer),
                "global_step": trainer.global_step,
            }
        )
        if batch_idx == self.dump_at and trainer.current_epoch == 0:
            self.dump = _compat.dump_checkpoint(trainer)
        if batch_idx == 1 and trainer.current_epoch == 0:
            step = trainer.global_step
            self.saving["before"] = (
                _compat.saved_last_at(self.checkpoint, step),
                _compat.should_skip_saving(self.checkpoint, trainer),
            )
            _compat.save_last_checkpoint(self.checkpoint, trainer)
            self.saving["after"] = (
                _compat.saved_last_at(self.checkpoint, step),
                _compat.should_skip_saving(self.checkpoint, trainer),
                self.checkpoint.last_model_path,
            )

    def on_validation_start(self, trainer, module) -> None:
        if not trainer.sanity_checking:
            self.validations.append((trainer.global_step, _compat.logging_step(trainer)))


def fit(directory: Path, max_epochs: int = 1, dump_at: int | None = None, ckpt_path: str | None = None):
    checkpoint = ModelCheckpoint(dirpath=directory, save_last=True, save_top_k=0)
    probe = Probe(checkpoint, dump_at)
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=max_epochs,
        val_check_interval=VAL_EVERY,
        num_sanity_val_steps=0,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[probe, checkpoint],
        default_root_dir=directory,
    )
    module = Tiny()
    trainer.fit(module, ckpt_path=ckpt_path)
    return trainer, module, checkpoint, probe


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return fit(tmp_path_factory.mktemp("compat"), dump_at=1)


def lightning_objects(trainer: L.Trainer, checkpoint: ModelCheckpoint, module: L.LightningModule) -> dict:
    """The real Lightning objects that ``REACHED`` names, by class name (None where the way to one is
    gone)."""
    fit_loop = trainer.fit_loop
    epoch_loop = getattr(fit_loop, "epoch_loop", None)
    epoch_progress = getattr(fit_loop, "epoch_progress", None)
    return {
        "Trainer": trainer,
        "_CheckpointConnector": getattr(trainer, "_checkpoint_connector", None),
        "_AcceleratorConnector": getattr(trainer, "_accelerator_connector", None),
        "_FitLoop": fit_loop,
        "_TrainingEpochLoop": epoch_loop,
        "_Progress": epoch_progress,
        "_BatchProgress": getattr(epoch_loop, "batch_progress", None),
        "_ProcessedTracker": getattr(epoch_progress, "current", None),
        "ModelCheckpoint": checkpoint,
        "Strategy": trainer.strategy,
        "LightningModule": module,
    }


def users(attribute: str) -> list[str]:
    """The compat functions that reach ``attribute``."""
    tree = ast.parse(Path(_compat.__file__).read_text())
    return [
        f.name
        for f in tree.body
        if isinstance(f, ast.FunctionDef)
        and any(isinstance(n, ast.Attribute) and n.attr == attribute for n in ast.walk(f))
    ]


@pytest.mark.parametrize(("owner", "attribute"), _compat.REACHED, ids=[".".join(r) for r in _compat.REACHED])
def test_what_compat_reaches_exists_in_the_installed_lightning(run, owner, attribute):
    trainer, module, checkpoint, _ = run
    obj = lightning_objects(trainer, checkpoint, module)[owner]
    assert obj is not None, (
        f"lightning {VERSION}: no {owner} is reachable any more (the attribute leading to it moved)"
    )
    assert owner in [c.__name__ for c in type(obj).__mro__], (
        f"lightning {VERSION}: the object _compat takes for a {owner} is a {type(obj).__name__}"
    )
    assert hasattr(obj, attribute), (
        f"lightning {VERSION}: {owner}.{attribute} is gone; distill_lab._compat reaches it in "
        f"{', '.join(users(attribute)) or '?'}: adapt those functions to where it went"
    )


def test_reached_lists_every_private_attribute_compat_touches():
    tree = ast.parse(Path(_compat.__file__).read_text())
    touched = {
        n.attr
        for n in ast.walk(tree)
        if isinstance(n, ast.Attribute) and n.attr.startswith("_") and not n.attr.startswith("__")
    }
    assert touched <= {attribute for _, attribute in _compat.REACHED}


def test_the_saved_loop_state_has_the_layout_compat_rewrites(run):
    dump = run[3].dump
    assert dump is not None and dump["global_step"] == 2
    loops = dump.get("loops", {}).get("fit_loop")
    assert loops is not None, f"lightning {VERSION}: a checkpoint has no ['loops']['fit_loop'] state"
    for loop, key in _compat.SAVED_LOOP_STATE.items():
        assert key in loops, f"lightning {VERSION}: a checkpoint's fit_loop state has no {key!r} ({loop})"
        if loop == "optimizer":
            zero_grad = loops[key].get("optimizer", {}).get("zero_grad", {})
            for part in ("total", "current"):
                assert {"ready", "started", "completed"} <= set(zero_grad.get(part, {})), (
                    f"lightning {VERSION}: {key}['optimizer']['zero_grad'][{part!r}] lacks counts"
                )
            continue
        assert "is_last_batch" in loops[key], f"lightning {VERSION}: {key} has no 'is_last_batch'"
        for part in ("total", "current"):
            assert set(_compat.COUNTS) <= set(loops[key].get(part, {})), (
                f"lightning {VERSION}: {key}[{part!r}] lacks one of {_compat.COUNTS}"
            )


# ------------------------------------------------------------------------------------------ what they mean


def test_loop_counts_at_a_training_batchs_end(run):
    """At ``on_train_batch_end`` a batch is processed, not completed; the epoch is started, not processed."""
    seen = run[3].seen
    assert [s["batch_idx"] for s in seen] == list(range(BATCHES))
    for s in seen:
        i = s["batch_idx"]
        assert s["batches"] == _compat.Counts(ready=i + 1, started=i + 1, processed=i + 1, completed=i)
        assert s["epoch"].started == 1 and s["epoch"].processed == 0
        assert s["is_last_batch"] == (i == BATCHES - 1)


def test_validation_follows_batch_as_the_training_loop_decides(run):
    _, _, _, probe = run
    assert [s["validation_follows"] for s in probe.seen] == [(i + 1) % VAL_EVERY == 0 for i in range(BATCHES)]
    assert [step for step, _ in probe.validations] == [
        i + 1 for i in range(BATCHES) if (i + 1) % VAL_EVERY == 0
    ]


def test_the_logging_step_trails_the_global_step_until_the_batch_is_done(run):
    """Lightning raises the loggers' step after the batch's validation, one behind ``global_step`` there."""
    _, _, _, probe = run
    assert all(s["logging_step"] == s["global_step"] - 1 for s in probe.seen)
    assert all(logged == step - 1 for step, logged in probe.validations)
    trainer = run[0]
    _compat.set_logging_step(trainer, 7)
    assert _compat.logging_step(trainer) == 7


def test_model_checkpoint_writes_last_on_demand(run):
    _, _, checkpoint, probe = run
    assert probe.saving["before"] == (False, False)
    saved, skip, path = probe.saving["after"]
    assert saved and skip and Path(path).name == "last.ckpt" and Path(path).is_file()
    assert Path(path).parent == Path(checkpoint.dirpath)


def test_distributed_sampler_decision():
    def trainer(**kwargs):
        return L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, **kwargs)

    assert not _compat.uses_distributed_sampler(trainer(devices=1))
    assert _compat.uses_distributed_sampler(trainer(devices=2, strategy="ddp"))
    assert not _compat.uses_distributed_sampler(
        trainer(devices=2, strategy="ddp", use_distributed_sampler=False)
    )


def test_attached_trainer_and_forward_redirection(run):
    trainer, module, _, _ = run
    assert _compat.attached_trainer(Tiny()) is None
    assert _compat.attached_trainer(module) is trainer

    class Wrapper(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, *args):
            return self.inner(*args)

    x = torch.randn(2, 3)
    forward = module.forward
    out = _compat.forward_redirection(trainer.strategy, Wrapper(module), module, "double", x)
    assert torch.equal(out, module.double(x)) and module.forward == forward


def test_a_rewound_checkpoint_resumes_at_the_batch_it_names(run, tmp_path):
    """``rewind_to_batch`` on a checkpoint dumped after batch 1 makes Lightning resume at batch 1 with the
    steps taken unchanged: the saved loop layout still means what it did."""
    dump = run[3].dump
    checkpoint = {**dump, "loops": copy.deepcopy(dump["loops"])}
    rewind_to_batch(checkpoint, 1)
    path = tmp_path / "rewound.ckpt"
    torch.save(checkpoint, path)
    _, _, _, probe = fit(tmp_path / "resumed", ckpt_path=str(path))
    assert probe.first_batch == (1, dump["global_step"])

    restart = {**dump, "loops": copy.deepcopy(dump["loops"])}
    restart_validation(restart)
    progress = restart["loops"]["fit_loop"][_compat.SAVED_LOOP_STATE["validation"]]
    assert progress["current"] == {"ready": 1, "started": 1, "processed": 0, "completed": 0}


# ------------------------------------------------------------------------------------------ the only door

# internal objects of Lightning's loops, public in name only: reached through _compat as well
LOOP_INTERNALS = {"fit_loop", "epoch_loop", "val_loop", "batch_progress", "epoch_progress", "optim_progress"}
SAVED_KEYS = {"loops", *_compat.SAVED_LOOP_STATE.values()}


@functools.cache
def lightning_private_names() -> frozenset[str]:
    """Every private name Lightning's source gives an attribute (``self._x = ...``) or a method."""
    names = set()
    for path in LIGHTNING.rglob("*.py"):
        names |= set(re.findall(r"self\.(_[A-Za-z]\w*)", path.read_text(errors="replace")))
        names |= set(re.findall(r"^\s+def (_[A-Za-z]\w*)", path.read_text(errors="replace"), re.MULTILINE))
    return frozenset(n for n in names if not n.startswith("__"))


def private_names_of(cls: type) -> set[str]:
    """The private names of the Lightning classes ``cls`` derives from."""
    names = set()
    for base in cls.__mro__:
        if base.__module__.split(".")[0] not in ("lightning", "pytorch_lightning", "lightning_fabric"):
            continue
        names |= {n for n in vars(base) if n.startswith("_") and not n.startswith("__")}
        with contextlib.suppress(OSError, TypeError):  # a class without source (built-in) sets no attribute
            names |= set(re.findall(r"self\.(_[A-Za-z]\w*)", inspect.getsource(base)))
    return names


def lightning_reaches(source: str, namespace: dict, where: str = "") -> list[str]:
    """Where ``source`` touches a private Lightning attribute (on any object, or on ``self`` in a class
    derived from a Lightning class, looked up in ``namespace``), a loop's internals, or a checkpoint's saved
    loop state."""
    found = []

    def visit(node: ast.AST, cls: type | None) -> None:
        if isinstance(node, ast.ClassDef):
            cls = namespace.get(node.name) if isinstance(namespace.get(node.name), type) else None
        own = isinstance(node, ast.Attribute) and (
            (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))
            or (isinstance(node.value, ast.Call) and getattr(node.value.func, "id", None) == "super")
        )
        hit = None
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            if own:
                hit = cls is not None and node.attr in private_names_of(cls)
            else:
                hit = node.attr in lightning_private_names()
        elif isinstance(node, ast.Attribute):
            hit = node.attr in LOOP_INTERNALS
        elif isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant):
            hit = node.slice.value in SAVED_KEYS
        if hit:
            found.append(f"{where}:{node.lineno}: {ast.unparse(node)}")
        for child in ast.iter_child_nodes(node):
            visit(child, cls)

    visit(ast.parse(source), None)
    return found


def test_the_scan_finds_what_it_looks_for():
    source = """
import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint

class Last(ModelCheckpoint):
    def go(self, trainer, checkpoint, capture):
        self._save_last_checkpoint(trainer, {})
        self._mine = trainer.fit_loop.epoch_loop._batches_that_stepped
        checkpoint["loops"]["fit_loop"]["epoch_loop.batch_progress"]
        capture._record, self.dirpath, trainer.global_step

class Plain:
    def go(self):
        return self._save_last_checkpoint
"""
    namespace: dict = {}
    exec(compile(source, "<scan>", "exec"), namespace)
    found = [hit.split(": ", 1)[1] for hit in lightning_reaches(source, namespace)]
    assert found == [
        "self._save_last_checkpoint",
        "trainer.fit_loop.epoch_loop._batches_that_stepped",
        "trainer.fit_loop.epoch_loop",
        "trainer.fit_loop",
        "checkpoint['loops']['fit_loop']['epoch_loop.batch_progress']",
        "checkpoint['loops']",
    ]


def test_no_module_but_compat_touches_lightning_internals():
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "_compat.py":
            continue
        relative = path.relative_to(PACKAGE.parent)
        source = path.read_text()
        namespace = {}
        if "class " in source:
            name = ".".join(relative.with_suffix("").parts).removesuffix(".__init__")
            namespace = vars(importlib.import_module(name))
        found += lightning_reaches(source, namespace, str(relative))
    assert not found, (
        "Lightning internals reached outside distill_lab._compat (add a function there):\n" + "\n".join(found)
    )
