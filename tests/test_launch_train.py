"""The real tiny recipe through launchers/submit.py on the real two-node SLURM test cluster."""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import submitit
import yaml

from slurm_cluster import slurm_available

pytestmark = pytest.mark.skipif(not slurm_available(), reason="slurm-wlm and munge are not installed")
pytest.importorskip("lspretrain.train")

REPO = Path(__file__).resolve().parents[1]
SUBMIT = REPO / "launchers" / "submit.py"
RECIPE = REPO / "recipes" / "tiny" / "classification_single.yaml"
# The shortest run that still has a checkpoint before its last step.
SHORT = ("strategy.name=ddp", "run.total_steps=12", "checkpoint.every=4", "log.every=1")
NASTY_NAME = """it's a "quoted" run"""


def _submit(*args: str) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, str(SUBMIT), *args], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 or "error:" in out.stderr, out.stderr
    return out


def _job(out: subprocess.CompletedProcess, run_dir: Path, nodes: int = 2) -> submitit.SlurmJob:
    job_id = out.stdout.split("submitted job ")[1].split()[0]
    return submitit.SlurmJob(folder=run_dir / "submitit", job_id=job_id, tasks=tuple(range(nodes)))


def _final_loss(run_dir: Path) -> float:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in rows if "train/loss" in r][-1]["train/loss"]


def _logs(job: submitit.SlurmJob, run_dir: Path) -> str:
    return "".join(p.read_text() for p in sorted((run_dir / "submitit").glob(f"{job.job_id}_*_log.*")))


@pytest.fixture(scope="module")
def reference(slurm_cluster, tmp_path_factory):
    """One uninterrupted 2-node x 1-task gloo run, named and placed with spaces and quotes."""
    run_dir = tmp_path_factory.mktemp("ref") / """run dir with 'single' and "double" quotes"""
    out = _submit(str(RECIPE), "--nodes", "2", "--name", NASTY_NAME, "--run-dir", str(run_dir), *SHORT)
    assert out.returncode == 0, out.stderr
    job = _job(out, run_dir)
    names = slurm_cluster.run("squeue", "-h", "-j", job.job_id, "-o", "%j").stdout.strip()
    results = job.results()
    return {"run_dir": run_dir, "job": job, "results": results, "squeue_name": names}


def test_two_node_gloo_run_writes_its_run_dir(reference):
    run_dir = reference["run_dir"]
    assert reference["results"] == [0, 0]
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["run"]["total_steps"] == 12
    assert (run_dir / "metrics.jsonl").is_file() and (run_dir / "checkpoints").is_dir()
    logs = _logs(reference["job"], run_dir)
    assert "global_rank=1(2)" in logs and "node=1(2)" in logs


def test_names_and_paths_with_spaces_and_quotes_arrive_intact(reference):
    assert reference["squeue_name"] == NASTY_NAME
    saved = yaml.safe_load((reference["run_dir"] / "config.yaml").read_text())
    assert saved["run"]["dir"] == str(reference["run_dir"])


def test_dry_run_prints_config_and_script_and_submits_nothing(slurm_cluster, tmp_path):
    run_dir = tmp_path / "dry"
    out = _submit(str(RECIPE), "--nodes", "2", "--partition", slurm_cluster.partition, "--name", NASTY_NAME,
                  "--run-dir", str(run_dir), "--dry-run", *SHORT)
    assert out.returncode == 0, out.stderr
    config_text = out.stdout.split("# resolved config\n")[1].split("# sbatch script\n")[0]
    config = yaml.safe_load(config_text)
    assert config["run"]["total_steps"] == 12 and config["run"]["dir"] == str(run_dir)
    script = out.stdout.split("# sbatch script\n")[1]
    assert script.startswith("#!/bin/bash")
    assert f"#SBATCH --job-name={shlex.quote(NASTY_NAME)}" in script
    assert "#SBATCH --nodes=2" in script and "#SBATCH --partition=debug" in script
    assert shlex.split(out.stdout.splitlines()[0][len("# trainer: "):])[-1] == f"run.dir={run_dir}"
    assert slurm_cluster.job_ids() == [] and not run_dir.exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["run.total_stepz=3"], "unknown config key 'run.total_stepz'; did you mean run.total_steps?"),
        (["--nodes", "2"], "strategy.name=single cannot use 2 tasks"),
    ],
)
def test_config_the_trainer_would_refuse_fails_before_submission(slurm_cluster, tmp_path, args, message):
    out = _submit(str(RECIPE), "--run-dir", str(tmp_path / "r"), *args)
    assert out.returncode == 2 and message in out.stderr
    assert slurm_cluster.job_ids() == [] and not (tmp_path / "r").exists()


def test_preempted_run_resumes_to_the_same_final_loss(slurm_cluster, reference, tmp_path):
    run_dir = tmp_path / "preempted"
    out = _submit(str(RECIPE), "--nodes", "2", "--run-dir", str(run_dir), *SHORT)
    job = _job(out, run_dir)
    deadline = time.monotonic() + 120
    while not any((run_dir / "checkpoints").glob("*")):  # the first periodic checkpoint: mid-run
        assert time.monotonic() < deadline, _logs(job, run_dir)
        time.sleep(0.1)
    slurm_cluster.run("scancel", "--signal=USR1", job.job_id)
    assert job.results() == [0, 0]
    logs = _logs(job, run_dir)
    # The trainer's own stop path (submitit's fallback would log "Requeued job ... remaining timeouts").
    assert f"requeued job {job.job_id} (requeue 1 of 3)" in logs
    assert 0 < _resumed_steps(logs)[0] < 12
    assert json.loads((run_dir / "result.json").read_text())["status"] == "completed"
    assert _final_loss(run_dir) == _final_loss(reference["run_dir"])


def test_time_limit_requeues_and_resumes(slurm_cluster, tmp_path, monkeypatch):
    # The site file sets the warning lead: with a 1 min limit, SLURM signals 10-40 s into each attempt.
    site = tmp_path / "site.yaml"
    site.write_text(f"partition: {slurm_cluster.partition}\nsignal_lead_s: 50\n")
    monkeypatch.setenv("LSPRETRAIN_SITE_CONFIG", str(site))
    run_dir = tmp_path / "timeout"
    out = _submit(str(RECIPE), "--nodes", "2", "--run-dir", str(run_dir), "--timeout-min", "1",
                  "--max-requeues", "1", *SHORT, "run.total_steps=100000")
    job = _job(out, run_dir)
    with pytest.raises(submitit.core.utils.FailedJobError, match="NotRequeued"):
        job.results()
    logs = _logs(job, run_dir)
    assert f"requeued job {job.job_id} (requeue 1 of 1)" in logs
    assert "#SBATCH --signal=USR1@50" in (run_dir / "submitit" / f"{job.job_id}_submission.sh").read_text()
    resumed = _resumed_steps(logs)[0]
    result = json.loads((run_dir / "result.json").read_text())
    assert result["status"] == "preempted" and result["step"] > resumed > 0


def test_one_cluster_serves_the_whole_session(slurm_cluster):
    """The launch modules share the conftest fixture: this session started one slurmctld (a
    fixture imported into each module would have started one per module and kept them all)."""
    ours = []
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text() if entry.name.isdigit() else ""
        except OSError:
            continue
        name, rest = stat[stat.find("(") + 1:].rsplit(")", 1) if stat else ("", "")
        if name == "slurmctld" and int(rest.split()[1]) == os.getpid():  # field 4: the parent pid
            ours.append(int(entry.name))
    assert ours == [p.pid for p in slurm_cluster._procs if Path(p.args[0]).name == "slurmctld"]


def _resumed_steps(logs: str) -> list[int]:
    return [int(m) for m in re.findall(r"resumed from .* at step (\d+)", logs)]
