"""One-process runs: training numbers, logging read back, checkpoint policy, non-finite
steps, a SIGKILL in the middle of a save."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from engine_helpers import ROOT, read_steps, run_worker, tiny_recipe
from lspretrain.engine.config import load_config
from lspretrain.train import build


def test_trains_checkpoints_and_prunes(tmp_path):
    recipe = tiny_recipe(tmp_path, steps=12, optim={"lr": 1e-2}, checkpoint={"every": 2, "keep_last": 2, "keep_every": 4})
    out = run_worker(recipe)
    assert out["status"] == "completed" and out["step"] == 12
    steps = read_steps(tmp_path)
    assert sorted(steps) == list(range(1, 13))
    first, last = steps[1], steps[12]
    assert last["loss"] < 0.85 * first["loss"]  # the synthetic classes are learnable
    assert steps[1]["opt/lr"] == 0.0 and steps[3]["opt/lr"] == pytest.approx(1e-2)  # linear warmup over 2 steps
    assert steps[4]["opt/lr"] == pytest.approx(1e-2 * 0.5 * (1 + math.cos(math.pi * 0.1)), rel=1e-6)  # then cosine
    kept = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert kept == ["step_00000004", "step_00000008", "step_00000010", "step_00000012"]
    meta = json.loads((tmp_path / "checkpoints" / "step_00000012" / "COMPLETE.json").read_text())
    assert meta["step"] == 12 and meta["world_size"] == 1 and meta["samples_seen"] == 12 * 8
    assert (tmp_path / "config.yaml").is_file()


def test_tensorboard_and_jsonl(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = load_config(tiny_recipe(tmp_path, steps=4, log={"every": 1, "tensorboard": True, "peak_flops": 1e12}))
    trainer, _ = build(cfg)
    trainer.fit()
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in ("train/loss", "train/loss_cls", "train/acc1", "opt/lr", "opt/wd", "opt/grad_norm", "perf/images_per_s",
                "perf/tokens_per_s", "perf/flops_per_s", "perf/mfu", "perf/data_time_s", "perf/compute_time_s",
                "memory/rss_gib", "fault/skipped_steps", "data/bad_samples"):
        assert tag in tags, tag
    losses = [e.value for e in acc.Scalars("train/loss")]
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [r["train/loss"] for r in rows] == pytest.approx(losses)
    flops = trainer.flops_per_sample
    rate = rows[-1]["perf/flops_per_s"] / flops  # images/s implied by the FLOP rate
    assert rate > 0 and rows[-1]["perf/mfu"] == pytest.approx(rows[-1]["perf/flops_per_s"] / 1e12)


def test_non_finite_step_is_skipped(tmp_path):
    out = run_worker(tiny_recipe(tmp_path, steps=5), nan_at=[2])
    assert out["status"] == "completed" and out["skipped"] == 1
    steps = read_steps(tmp_path)
    assert math.isnan(steps[3]["loss"]) and math.isnan(steps[3]["opt/grad_norm"])
    assert steps[3]["fault/skipped_steps"] == 1 and steps[2]["fault/skipped_steps"] == 0
    assert all(math.isfinite(steps[s]["loss"]) for s in (1, 2, 4, 5))


def test_abort_after_consecutive_non_finite(tmp_path):
    out = run_worker(tiny_recipe(tmp_path, steps=10, fault={"max_consecutive_skips": 3}), nan_at=[2, 3, 4])
    assert out["status"] == "aborted" and out["step"] == 4 and out["skipped"] == 3
    assert "3 consecutive steps with a non-finite loss" in out["error"]
    kept = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert kept == ["step_00000002", "step_00000004"]  # skipped steps leave the weights as they were


KILL_SCRIPT = """
import os, signal, sys
sys.path.insert(0, {tests!r})
import torch.distributed.checkpoint as dcp
import engine_helpers
real, calls = dcp.save, []
def dying_save(*args, **kwargs):
    calls.append(1)
    real(*args, **kwargs)
    if len(calls) == 2:  # the second save: shards written, not finalized
        os.kill(os.getpid(), signal.SIGKILL)
dcp.save = dying_save
engine_helpers.run_worker({recipe!r})
"""


def test_sigkill_mid_save_keeps_previous_checkpoint(tmp_path):
    recipe = tiny_recipe(tmp_path / "run", steps=6, checkpoint={"every": 2})
    script = KILL_SCRIPT.format(tests=str(ROOT / "tests"), recipe=recipe)
    p = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == -9, p.stderr[-2000:]
    ckpts = tmp_path / "run" / "checkpoints"
    assert sorted(d.name for d in ckpts.iterdir()) == [".tmp-step_00000004", "step_00000002"]
    out = run_worker(recipe)  # auto-resume: from step 2, the half-written step 4 removed first
    assert out["status"] == "completed" and out["step"] == 6
    assert not (ckpts / ".tmp-step_00000004").exists()
    ref = run_worker(tiny_recipe(tmp_path / "ref", steps=6, checkpoint={"every": 2}))
    got, want = read_steps(tmp_path / "run"), read_steps(tmp_path / "ref")
    assert ref["step"] == 6
    for step in range(3, 7):
        assert got[step]["loss"] == pytest.approx(want[step]["loss"], abs=1e-6)
