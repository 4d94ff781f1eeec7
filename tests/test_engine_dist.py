"""Multi-process gloo runs of the tiny model: every strategy against a 1-rank reference on the
same global batch (fp32, fixed seed), exact resume after a SIGTERM, fsdp2 resharding 2 -> 1
and 2 -> 3 ranks, hybrid sharding on a 2 x 2 mesh, and the entry point launched as SLURM tasks.

Tests that compare runs on different world sizes keep drop path off: each rank draws its
stochastic depth from its own RNG stream, so 2 ranks x 6 samples cannot draw what 1 rank x 12
does. Same-world-size resume tests (here, test_dinov2_dist.py, test_deit3.py) run with it on."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from engine_helpers import ROOT, free_port, read_steps, run_worker, spawn, tiny_recipe

STEPS, GLOBAL_BATCH = 8, 12
TOL = 1e-5
DEEPSPEED = {"deepspeed-zero2": {"deepspeed": {"stage": 2}}, "deepspeed-zero3": {"deepspeed": {"stage": 3}}}


def recipe(run_dir, name: str, world_size: int, **sections) -> dict:
    return tiny_recipe(run_dir, name, steps=STEPS, batch=GLOBAL_BATCH // world_size, **sections)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[int, dict]:
    run_dir = tmp_path_factory.mktemp("ref")
    run_worker(recipe(run_dir, "single", 1))
    return read_steps(run_dir)


@pytest.fixture(scope="module")
def fsdp2_run(tmp_path_factory):
    """An uninterrupted 2-rank fsdp2 run whose intermediate checkpoints are saved asynchronously."""
    run_dir = tmp_path_factory.mktemp("fsdp2")
    out = spawn(2, recipe(run_dir, "fsdp2", 2, checkpoint={"async_save": True}))
    assert out["status"] == "completed"
    return run_dir


def assert_close(got: dict, want: dict, steps, tol=TOL):
    for s in steps:
        assert abs(got[s]["loss"] - want[s]["loss"]) <= tol, (s, got[s]["loss"], want[s]["loss"])
        assert abs(got[s]["opt/grad_norm"] - want[s]["opt/grad_norm"]) <= 10 * tol, s


def test_fsdp2_two_ranks_match_one(reference, fsdp2_run):
    steps = read_steps(fsdp2_run)
    assert sorted(steps) == list(range(1, STEPS + 1))
    assert_close(steps, reference, range(1, STEPS + 1))
    saved = sorted(p.name for p in (fsdp2_run / "checkpoints").iterdir())
    assert saved == ["step_00000002", "step_00000004", "step_00000006", "step_00000008"]  # async ones finalized


@pytest.mark.parametrize("name", ["single", "fsdp2", "ddp", *DEEPSPEED])
def test_exact_resume_after_sigterm_with_drop_path(tmp_path, name):
    """With drop path on, the resumed run's per-rank RNG streams continue exactly: every loss
    equals the uninterrupted run's, bit for bit, on every strategy (2 ranks; single: 1)."""
    model = {"overrides": {"img_size": 32, "embed_dim": 32, "depth": 2, "num_heads": 2, "layerscale_init": 0.1,
                           "drop_path_rate": 0.3}}
    strategy = {"name": name.split("-")[0], **DEEPSPEED.get(name, {})}
    ranks = 1 if name == "single" else 2
    full = spawn(ranks, recipe(tmp_path / "full", "x", ranks, model=model, strategy=strategy))
    assert full["status"] == "completed"
    r = recipe(tmp_path / "resumed", "x", ranks, model=model, strategy=strategy)
    out = spawn(ranks, r, signal_at=2)  # SIGTERM to rank 0 while it takes batch 2: stops after step 3
    assert out == {**out, "status": "preempted", "step": 3, "reason": "SIGTERM"}
    assert out["checkpoint"].endswith("step_00000003")
    out = spawn(ranks, r)
    assert out["status"] == "completed" and out["step"] == STEPS
    got, want = read_steps(tmp_path / "resumed"), read_steps(tmp_path / "full")
    for s in range(1, STEPS + 1):
        assert got[s]["loss"] == want[s]["loss"], s


@pytest.mark.parametrize("world_size", [1, 3])
def test_fsdp2_checkpoint_reshards(tmp_path, fsdp2_run, world_size):
    src = fsdp2_run / "checkpoints" / "step_00000004"
    shutil.copytree(src, tmp_path / "checkpoints" / src.name)
    out = spawn(world_size, recipe(tmp_path, "fsdp2", world_size))
    assert out["status"] == "completed" and out["world_size"] == world_size
    got = read_steps(tmp_path)
    assert sorted(got) == list(range(5, STEPS + 1))  # continued at step 5, no repeated data
    assert_close(got, read_steps(fsdp2_run), range(5, STEPS + 1))


@pytest.mark.parametrize("name", ["ddp", *DEEPSPEED])
def test_strategy_matches_reference_across_resume(tmp_path, reference, name):
    """Train on 2 ranks, stop by SIGTERM after step 3, resume: every step matches the 1-rank run."""
    strategy = {"name": name.split("-")[0], **DEEPSPEED.get(name, {})}
    r = recipe(tmp_path, "x", 2, strategy=strategy)
    out = spawn(2, r, signal_at=2)
    assert out["status"] == "preempted" and out["step"] == 3
    out = spawn(2, r)
    assert out["status"] == "completed" and out["step"] == STEPS
    assert_close(read_steps(tmp_path), reference, range(1, STEPS + 1))


def test_fsdp2_hybrid_sharding_matches_reference_across_resume(tmp_path, reference):
    """4 ranks as 2 "nodes" x 2: shard inside a node, replicate across (a 2-D mesh); stopped by
    SIGTERM after step 3 and resumed, every step matches the 1-rank run."""
    r = recipe(tmp_path, "fsdp2", 4, strategy={"fsdp": {"replicate_nodes": 2}})
    out = spawn(4, r, signal_at=2)
    assert out["status"] == "preempted" and out["step"] == 3 and out["world_size"] == 4
    out = spawn(4, r)
    assert out["status"] == "completed" and out["step"] == STEPS
    assert_close(read_steps(tmp_path), reference, range(1, STEPS + 1))


def test_entry_point_as_slurm_tasks(tmp_path, reference):
    """``python -m lspretrain.train`` as two SLURM tasks (no torchrun variables): the master
    host from the node list falls back to 127.0.0.1, the port comes from the job id."""
    run_dir = tmp_path / "run"
    recipe_file = tmp_path / "recipe.json"
    r = recipe(run_dir, "ddp", 2, log={"every": 1, "tensorboard": False})
    recipe_file.write_text(json.dumps(r))  # JSON is YAML
    job_id = free_port() - 20000 if free_port() > 20000 else free_port()
    procs = []
    for rank in range(2):
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
        env.update(SLURM_PROCID=str(rank), SLURM_NTASKS="2", SLURM_LOCALID=str(rank), SLURM_JOB_ID=str(job_id),
                   SLURM_JOB_NODELIST="simnode[1-2]", OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, "-m", "lspretrain.train", str(recipe_file)], cwd=ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-3000:]
    assert json.loads((run_dir / "result.json").read_text())["status"] == "completed"
    rows = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        rows[row["step"]] = row
    assert sorted(rows) == list(range(1, STEPS + 1))
    for s in rows:
        assert abs(rows[s]["train/loss"] - reference[s]["loss"]) <= TOL
    assert f"step {STEPS}/{STEPS}" in outputs[0]  # the console line, rank 0 only
    assert "step 1/" not in outputs[1]


@pytest.mark.parametrize("name", ["fsdp2", "deepspeed-zero3"])
def test_ema_update_on_sharded_parameters(tmp_path, name, ema_method):
    """Teacher EMA through ``strategy.ema_update`` on DTensor shards / ZeRO-3 partitions gives
    the teacher of a 1-rank run (its loss, logged every step, is the witness)."""
    ema = {"method": {"name": "classification_ema", "num_classes": 10}}
    run_worker(tiny_recipe(tmp_path / "ref", "single", steps=5, batch=GLOBAL_BATCH, **ema))
    strategy = {"name": name.split("-")[0], **DEEPSPEED.get(name, {})}
    out = spawn(2, tiny_recipe(tmp_path / "dist", "x", steps=5, batch=GLOBAL_BATCH // 2, strategy=strategy, **ema))
    assert out["status"] == "completed"
    got, want = read_steps(tmp_path / "dist"), read_steps(tmp_path / "ref")
    assert got[5]["teacher_loss"] != got[1]["teacher_loss"]  # the teacher moved
    for s in range(1, 6):
        assert abs(got[s]["teacher_loss"] - want[s]["teacher_loss"]) <= TOL, s
