"""How a run behaves for the person who started it: precision chosen for the hardware, a
console line at least every ``log.console_every_s``, per-phase times, time-based checkpoints,
Ctrl-C that stops like SIGTERM, and one clean line and a documented exit code for bad data and
missing shards."""
from __future__ import annotations

import io
import json
import logging
import os
import signal
import subprocess
import sys
import tarfile
import time

import pytest
import torch

from data_fixtures import make_shards
from engine_helpers import ROOT, run_worker, tiny_recipe
from lspretrain.engine import precision
from lspretrain.engine.config import load_config
from lspretrain.train import EXIT_BAD_DATA, EXIT_CONFIG, EXIT_PREEMPTED, build


# -- precision: auto ---------------------------------------------------------------------------
@pytest.fixture
def cpu(monkeypatch):
    """Pretend to be a CPU with the given /proc/cpuinfo flags (None: unreadable) and bf16/fp32
    matmul time ratio."""

    def pretend(flags: set[str] | None, slowdown: float = 1.0):
        precision.cpu_native_bf16.cache_clear()
        monkeypatch.setattr(precision, "_cpu_flags", lambda: flags)
        monkeypatch.setattr(precision, "cpu_bf16_slowdown", lambda: slowdown)

    yield pretend
    precision.cpu_native_bf16.cache_clear()


def test_auto_precision_follows_the_cpu_flags(cpu):
    cpu({"avx2", "avx512f", "avx512_bf16"})
    assert precision.resolve_precision("auto", torch.device("cpu")) == ("bf16", "CPU flags avx512_bf16")
    cpu({"avx2", "fma"})
    assert precision.resolve_precision("auto", torch.device("cpu"))[0] == "fp32"
    cpu({"fp", "asimd", "bf16"})  # Arm with FEAT_BF16
    assert precision.resolve_precision("auto", torch.device("cpu"))[0] == "bf16"
    cpu(None, slowdown=33.0)  # no /proc/cpuinfo: the matmul probe decides
    assert precision.resolve_precision("auto", torch.device("cpu")) == ("fp32", "bf16 matmul probe: 33.0x the fp32 time")
    cpu(None, slowdown=0.5)
    assert precision.resolve_precision("auto", torch.device("cpu"))[0] == "bf16"
    assert precision.resolve_precision("fp32", torch.device("cpu")) == ("fp32", "as configured")


def test_explicit_bf16_on_a_cpu_without_it_warns_with_the_slowdown(cpu, caplog):
    cpu({"avx2"}, slowdown=33.0)
    with caplog.at_level(logging.WARNING, logger="lspretrain.engine.precision"):
        assert precision.resolve_precision("bf16", torch.device("cpu"))[0] == "bf16"
    assert "33x the fp32 time" in caplog.text and "strategy.precision=auto" in caplog.text


def test_auto_precision_on_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert precision.resolve_precision("auto", torch.device("cuda", 0))[0] == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert precision.resolve_precision("auto", torch.device("cuda", 0))[0] == "fp32"


def test_the_strategy_gets_the_resolved_precision_and_the_log_says_why(tmp_path, cpu, caplog):
    cpu({"avx2"})
    cfg = load_config(tiny_recipe(tmp_path, strategy={"name": "single", "precision": "auto"}))
    assert cfg.strategy.precision == "auto"
    with caplog.at_level(logging.INFO, logger="lspretrain.engine.strategies"):
        trainer, _ = build(cfg)
    assert trainer.strategy.cfg.precision == "fp32"
    assert "precision: fp32 (auto: no avx512_bf16 / amx_bf16 / bf16 among the CPU flags)" in caplog.text


def test_cpu_recipes_default_to_auto(tmp_path):
    (tmp_path / "x.tar").touch()
    for recipe in ("recipes/dinov2/tiny_cpu.yaml", "recipes/deit3/tiny_fashion_mnist.yaml"):
        cfg = load_config(ROOT / recipe, [f"data.shards={tmp_path / 'x.tar'}", "eval.every=0"])
        assert cfg.strategy.precision == "auto", recipe


# -- the console, phase times, time-based checkpoints ------------------------------------------
def test_a_console_line_at_least_every_console_every_s(tmp_path, capsys):
    from lspretrain.engine.metrics import MetricLogger

    cfg = load_config(tiny_recipe(tmp_path, steps=5, log={"every": 100, "console_every_s": 0.0, "tensorboard": False}))
    trainer, _ = build(cfg)
    trainer.logger = MetricLogger(tmp_path, total_steps=5, log_every=100, tensorboard=False)
    trainer.fit()
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in lines] == ["1/5", "2/5", "3/5", "4/5", "5/5"]
    assert all("loss" in line and "img/s" in line and "eta" in line for line in lines[1:])


def test_first_and_last_steps_are_always_logged(tmp_path, capsys):
    cfg = load_config(tiny_recipe(tmp_path, steps=5, log={"every": 100, "tensorboard": False}))
    trainer, _ = build(cfg)
    trainer.fit()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 5]
    # Steps 2-5 in one window: the means over them, and per-phase times per step on the CPU.
    for key in ("perf/data_s", "perf/forward_s", "perf/backward_s", "perf/collective_s", "perf/optimizer_s"):
        assert rows[-1][key] > 0, key
    assert rows[-1]["perf/compute_time_s"] >= rows[-1]["perf/forward_s"] + rows[-1]["perf/backward_s"] - 1e-3


def test_time_based_checkpoints(tmp_path):
    out = run_worker(tiny_recipe(tmp_path, steps=6, checkpoint={"every": 0, "every_minutes": 1e-9, "keep_last": 10}))
    assert out["status"] == "completed"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [f"step_{s:08d}" for s in range(1, 7)]


# -- Ctrl-C ------------------------------------------------------------------------------------
def _start_train(run_dir, *overrides: str) -> subprocess.Popen:
    recipe = run_dir / "recipe.json"
    recipe.write_text(json.dumps(tiny_recipe(run_dir, steps=400, log={"every": 1, "tensorboard": False},
                                             checkpoint={"every": 0})))
    return subprocess.Popen([sys.executable, "-m", "lspretrain.train", str(recipe), *overrides], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def _wait_for_step(run_dir, step: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    metrics = run_dir / "metrics.jsonl"
    while time.monotonic() < deadline:
        if metrics.exists() and any(json.loads(line)["step"] >= step for line in metrics.read_text().splitlines()):
            return
        time.sleep(0.05)
    raise TimeoutError(f"no step {step} in {metrics}")


def test_ctrl_c_saves_says_how_to_resume_and_the_same_command_resumes(tmp_path):
    proc = _start_train(tmp_path)
    _wait_for_step(tmp_path, 3)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_PREEMPTED, err[-2000:]
    assert "Traceback" not in err
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["status"] == "preempted" and result["reason"] == "SIGINT"
    stopped = result["step"]
    assert f"stopped at step {stopped} (SIGINT); run the same command again to resume" in out
    assert (tmp_path / "checkpoints" / f"step_{stopped:08d}").is_dir()
    proc = _start_train(tmp_path, "run.total_steps=" + str(stopped + 2))
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    assert f"resumed from {tmp_path / 'checkpoints' / f'step_{stopped:08d}'} at step {stopped}" in err


# -- refusals ----------------------------------------------------------------------------------
def _train(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lspretrain.train", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.parametrize("override, message", [
    ("data.shards=/nope/x-{000000..000003}.tar", "data.shards='/nope/x-{000000..000003}.tar': none of its 4 shards "
                                                 "exists (first: /nope/x-000000.tar)"),
    ("data.index=/nope.json", "data.index='/nope.json': no such file"),
    ("data.shards=/nope/*.tar", "data.shards='/nope/*.tar': shard spec '/nope/*.tar' matched no shards"),
])
def test_missing_shards_or_index_are_refused_in_one_line(override, message):
    r = _train(str(ROOT / "recipes/dinov2/tiny_cpu.yaml"), override)
    assert r.returncode == EXIT_CONFIG
    assert r.stderr.strip() == f"lspretrain-train: {message}"


def test_bad_data_exits_with_its_code_naming_the_worst_shard(tmp_path):
    good = make_shards(str(tmp_path / "good"), n=8, per_shard=8, size=16)
    bad = tmp_path / "good" / "s-000001.tar"
    with tarfile.open(bad, "w") as t:
        for i in range(40):
            for ext, data in (("jpg", b"\xff\xd8junk"), ("cls", b"0")):
                info = tarfile.TarInfo(f"bad{i}.{ext}")
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
    recipe = tiny_recipe(tmp_path / "run", steps=20, model={"overrides": {"img_size": 16, "patch_size": 4,
                                                                           "embed_dim": 32, "depth": 2, "num_heads": 2,
                                                                           "layerscale_init": 0.1}})
    recipe.update(data_source="webdataset", data={"shards": good.replace("000000}", "000001}"), "batch_size": 4,
                                                  "num_workers": 0, "max_bad_fraction": 0.1, "bad_check_min_samples": 16})
    (tmp_path / "recipe.json").write_text(json.dumps(recipe))
    r = _train(str(tmp_path / "recipe.json"))
    assert r.returncode == EXIT_BAD_DATA
    assert "Traceback" not in r.stderr
    (line,) = [x for x in r.stderr.splitlines() if x.startswith("lspretrain-train: stopped on bad data")]
    assert f"worst shards: {bad} (" in line and "> data.max_bad_fraction 10.0%" in line
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert result["status"] == "bad_data" and "corrupt_image" in result["error"]
