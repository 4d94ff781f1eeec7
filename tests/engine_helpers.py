"""Helpers for the engine tests: tiny recipes, multi-process gloo runs, loader wrappers that
inject faults (a signal at step k, NaN images), a logger that records every step, and test-only
methods registered for the duration of a fixture (``ema_method`` in conftest.py)."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]


def tiny_recipe(run_dir, name: str = "single", steps: int = 6, batch: int = 8, **sections) -> dict:
    """A 2-block, width-32 specialized ViT on 32 px synthetic data, fp32, logged every step."""
    recipe = {
        "run": {"dir": str(run_dir), "seed": 0, "total_steps": steps},
        "model": {"arch": "vit_tiny_patch16", "spec": "paper",
                  "overrides": {"img_size": 32, "embed_dim": 32, "depth": 2, "num_heads": 2, "layerscale_init": 0.1}},
        "method": {"name": "classification", "num_classes": 10},
        "optim": {"name": "adamw", "lr": 2e-3, "warmup_steps": 2, "weight_decay": 0.05, "clip_grad": 1.0},
        "strategy": {"name": name, "precision": "fp32"},
        "checkpoint": {"every": 2, "keep_last": 10},
        "log": {"every": 1, "tensorboard": False},
        "data_source": "synthetic",
        "synthetic": {"batch_size": batch, "img_size": 32, "num_classes": 10},
    }
    for name, values in sections.items():
        recipe.setdefault(name, {}).update(values)
    return recipe


class Recorder:
    """MetricLogger stand-in: every logged step's scalars into ``steps.jsonl`` (rank 0)."""

    def __init__(self, run_dir, rank: int):
        self.path = Path(run_dir) / "steps.jsonl" if rank == 0 else None

    def log(self, step: int, scalars: dict, images=None, tokens=None, console=None) -> None:
        if self.path:
            with self.path.open("a") as f:
                f.write(json.dumps({"step": step, **scalars}) + "\n")

    def close(self) -> None:
        pass


def read_steps(run_dir) -> dict[int, dict]:
    """step -> scalars; a resumed run's later lines replace the earlier ones."""
    rows = [json.loads(line) for line in (Path(run_dir) / "steps.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows}


def read_merged(run_dir) -> dict[int, dict]:
    """step -> every scalar logged at that step (training and evaluation rows merged; a resumed
    run's values replace the earlier ones)."""
    rows: dict[int, dict] = {}
    for line in (Path(run_dir) / "steps.jsonl").read_text().splitlines():
        row = json.loads(line)
        rows.setdefault(row["step"], {}).update(row)
    return rows


class LoaderWrapper:
    """Delegates the StatefulLoader protocol; subclasses act on batch ``index``."""

    def __init__(self, loader):
        self.loader = loader

    def __iter__(self):
        for i, batch in enumerate(self.loader):
            yield self.on_batch(i, batch)

    def on_batch(self, i: int, batch: dict) -> dict:
        return batch

    def state_dict(self):
        return self.loader.state_dict()

    def load_state_dict(self, state):
        self.loader.load_state_dict(state)

    def stats(self):
        return self.loader.stats()


class SignalAt(LoaderWrapper):
    """Sends ``sig`` to this process when handing out batch ``at`` (counted from the start
    of this process's iteration)."""

    def __init__(self, loader, at: int, sig=signal.SIGTERM):
        super().__init__(loader)
        self.at, self.sig = at, sig

    def on_batch(self, i, batch):
        if i == self.at:
            os.kill(os.getpid(), self.sig)
        return batch


class NaNAt(LoaderWrapper):
    """Replaces the images of the batches in ``steps`` by NaNs."""

    def __init__(self, loader, steps):
        super().__init__(loader)
        self.steps = set(steps)

    def on_batch(self, i, batch):
        if i in self.steps:
            batch = dict(batch, images=torch.full_like(batch["images"], float("nan")))
        return batch


def run_worker(recipe: dict, overrides=(), signal_at: int | None = None, nan_at=(), exit_hard: bool = False) -> dict:
    """Build and fit a trainer in this process (one rank); returns the result as a dict and
    writes it to ``RUN/result_rank{r}.json``."""
    from lspretrain.engine.config import load_config
    from lspretrain.engine.fault import NonFiniteAbort
    from lspretrain.train import build

    torch.set_num_threads(1)
    cfg = load_config(recipe, list(overrides))
    trainer, env = build(cfg)
    trainer.logger = Recorder(cfg.run.dir, env.rank)
    if signal_at is not None and env.rank == 0:
        trainer.loader = SignalAt(trainer.loader, signal_at)
    if nan_at:
        trainer.loader = NaNAt(trainer.loader, nan_at)
    try:
        r = trainer.fit()
        out = {"status": r.status, "step": r.step, "checkpoint": r.checkpoint, "skipped": r.skipped_steps, "reason": r.reason}
    except NonFiniteAbort as err:
        out = {"status": "aborted", "step": trainer.step, "error": str(err), "skipped": trainer.guard.total}
    out["world_size"] = env.world_size
    Path(cfg.run.dir, f"result_rank{env.rank}.json").write_text(json.dumps(out))
    if exit_hard:
        from lspretrain.engine.dist import shutdown

        sys.stdout.flush()
        shutdown(0)  # DeepSpeed: leave before its C++ teardown can abort
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(rank: int, world_size: int, port: int, recipe: dict, kwargs: dict, test_methods: list[str]) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    with registered_methods(*test_methods):
        run_worker(recipe, exit_hard=True, **kwargs)


def spawn(world_size: int, recipe: dict, **kwargs) -> dict:
    """Run ``recipe`` on ``world_size`` gloo ranks (torch.multiprocessing spawn); rank 0's result.
    The ranks see the test methods registered here (a spawned process starts from a fresh registry)."""
    from lspretrain.methods import METHODS

    test_methods = [name for name in TEST_METHODS if name in METHODS]
    mp.spawn(_child, args=(world_size, free_port(), recipe, kwargs, test_methods), nprocs=world_size, join=True)
    return json.loads(Path(recipe["run"]["dir"], "result_rank0.json").read_text())


def _classification_ema():
    """``classification_ema``: the classifier plus an EMA teacher backbone (momentum 0.5) whose
    loss is logged as ``teacher_loss``, so a test sees whether ``strategy.ema_update`` on
    sharded parameters gives the 1-rank result."""
    import copy

    import torch.nn.functional as F

    from lspretrain.methods.classification import Classification

    class ClassificationEMA(Classification):
        def __init__(self, cfg, model_cfg, total_steps):
            super().__init__(cfg, model_cfg, total_steps)
            self.teacher = copy.deepcopy(self.backbone).requires_grad_(False)

        def sharded_modules(self):
            return [self.backbone, self.teacher]

        def optimized_module(self):
            return torch.nn.ModuleDict({"backbone": self.backbone, "head": self.head})

        def get_teacher_output(self, batch, step):
            return self.head(self.teacher(batch["images"]))

        def compute_losses(self, teacher, logits, batch, step):
            loss, metrics = super().compute_losses(teacher, logits, batch, step)
            return loss, {**metrics, "teacher_loss": F.cross_entropy(teacher.float(), batch["labels"]).detach()}

        def after_step(self, step, strategy):
            strategy.ema_update(self.teacher, self.backbone, 0.5)

    return ClassificationEMA


# Methods that exist for tests only: name -> builder of the class. Registered in the global
# METHODS registry only inside ``registered_methods`` (the ``ema_method`` fixture), never on import.
TEST_METHODS = {"classification_ema": _classification_ema}


@contextlib.contextmanager
def registered_methods(*names: str) -> Iterator[None]:
    """``names`` (from ``TEST_METHODS``) in ``METHODS`` for the duration of the block (with the
    classifier's config section); afterwards the registry holds exactly what it held before."""
    from lspretrain.methods import METHODS, ClassificationConfig, RegisteredMethod

    saved = {name: METHODS.get(name) for name in names}
    for name in names:
        METHODS[name] = RegisteredMethod(ClassificationConfig, TEST_METHODS[name]())
    try:
        yield
    finally:
        for name, old in saved.items():
            if old is None:
                METHODS.pop(name, None)
            else:
                METHODS[name] = old
