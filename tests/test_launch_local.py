"""The paths without SLURM: torchrun through launchers/train_local.sh, and submit.py --local."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "tiny" / "classification_single.yaml"
NASTY_DIR = """dir with 'single' and "double" quotes $HOME"""


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def test_torchrun_wrapper_trains_two_gloo_processes(tmp_path):
    run_dir = tmp_path / NASTY_DIR
    _run([str(REPO / "launchers" / "train_local.sh"), "2", str(RECIPE), "strategy.name=ddp", "run.total_steps=2",
          "log.every=1", f"run.dir={run_dir}"], cwd=tmp_path)
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["run"]["dir"] == str(run_dir)
    assert json.loads((run_dir / "result.json").read_text())["status"] == "completed"


def test_torchrun_wrapper_refuses_a_bad_process_count(tmp_path):
    out = subprocess.run([str(REPO / "launchers" / "train_local.sh"), "two", str(RECIPE)], capture_output=True,
                         text=True)
    assert out.returncode == 2 and "usage:" in out.stderr


def test_submit_local_runs_the_trainer_through_submitit(tmp_path):
    run_dir = tmp_path / NASTY_DIR
    out = _run([sys.executable, str(REPO / "launchers" / "submit.py"), str(RECIPE), "--local", "--run-dir",
                str(run_dir), "run.total_steps=2"], cwd=tmp_path)
    assert "finished" in out.stdout
    result = json.loads((run_dir / "result.json").read_text())
    assert (result["status"], result["step"]) == ("completed", 2)
    assert list((run_dir / "submitit").glob("*_0_log.out"))
