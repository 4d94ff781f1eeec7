"""The paths without SLURM: torchrun through launchers/train_local.sh, and submit.py --local."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
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


def _descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (the wrapper -> torchrun -> workers), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) if entry.name.isdigit() else None
        except OSError:
            continue
        if ppid is not None:
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


@pytest.mark.parametrize("target, sig", [("wrapper", signal.SIGTERM), ("wrapper", signal.SIGINT),
                                         ("workers", signal.SIGUSR1)])
def test_torchrun_wrapper_exits_75_when_the_run_is_preempted(tmp_path, target, sig):
    """SIGTERM or Ctrl-C to the wrapper (forwarded once through torchrun), or SIGUSR1 to the
    workers themselves: they save a checkpoint and exit 75, torchrun exits 1, the wrapper 75."""
    run_dir = tmp_path / "run"
    cmd = [str(REPO / "launchers" / "train_local.sh"), "2", str(RECIPE), "strategy.name=ddp", "run.total_steps=100000",
           "checkpoint.every=5", "log.every=100", f"run.dir={run_dir}"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 120
        while not list((run_dir / "checkpoints").glob("step_*")):  # training, past its first checkpoint
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
            time.sleep(0.2)
        if target == "wrapper":
            proc.send_signal(sig)
        else:
            workers = [p for p in _descendants(proc.pid) if "lspretrain.train" in Path(f"/proc/{p}/cmdline").read_text()
                       and "torch.distributed.run" not in Path(f"/proc/{p}/cmdline").read_text()]
            assert len(workers) == 2
            for pid in workers:
                os.kill(pid, sig)
        _, err = proc.communicate(timeout=120)
    finally:
        for pid in [proc.pid, *_descendants(proc.pid)] if proc.poll() is None else ():
            os.kill(pid, signal.SIGKILL)
    result = json.loads((run_dir / "result.json").read_text())
    assert proc.returncode == 75, err[-3000:]
    assert (result["status"], result["reason"]) == ("preempted", sig.name) and result["step"] >= 5
    assert result["checkpoint"] == str(run_dir / "checkpoints" / f"step_{result['step']:08d}")
    assert err.splitlines()[-1] == (f"train_local.sh: the run ended 'preempted' at step {result['step']}, newest "
                                    f"checkpoint {result['checkpoint']}; exit 75 instead of torchrun's 1 (its failure "
                                    "report above is expected); run the same command to resume")


def test_submit_local_runs_the_trainer_through_submitit(tmp_path):
    run_dir = tmp_path / NASTY_DIR
    out = _run([sys.executable, str(REPO / "launchers" / "submit.py"), str(RECIPE), "--local", "--run-dir",
                str(run_dir), "run.total_steps=2"], cwd=tmp_path)
    assert "finished" in out.stdout
    result = json.loads((run_dir / "result.json").read_text())
    assert (result["status"], result["step"]) == ("completed", 2)
    assert list((run_dir / "submitit").glob("*_0_log.out"))
