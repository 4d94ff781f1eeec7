"""The SLURM test cluster itself: two idle nodes, jobs run on both, and nothing outlives it."""
from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import pytest

from slurm_cluster import SlurmCluster, slurm_available

pytestmark = pytest.mark.skipif(not slurm_available(), reason="slurm-wlm and munge are not installed")


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_cluster_has_two_idle_nodes(slurm_cluster):
    assert slurm_cluster.node_states() == {"n1": "idle", "n2": "idle"}
    out = slurm_cluster.run("scontrol", "show", "partition", slurm_cluster.partition).stdout
    assert "Nodes=n1,n2" in out or "Nodes=n[1-2]" in out


def test_cluster_stops_every_process_even_with_a_running_job():
    # Its own cluster (short paths: slurmd's sockets live under it), not the session one.
    cluster = SlurmCluster(Path(tempfile.mkdtemp(prefix="lsp-slurm-")))
    try:
        cluster.start()
        out = cluster.root / "job.out"
        cluster.run("sbatch", "-N2", "-o", str(out), "--wrap", "srun sleep 300")
        deadline = time.monotonic() + 20
        while not cluster.stray_pids() and time.monotonic() < deadline:
            time.sleep(0.2)
        strays = cluster.stray_pids()
        assert strays, "the job's slurmstepd/sleep processes never appeared"
        daemons = [p.pid for p in cluster._procs]
    finally:
        cluster.stop()
    time.sleep(0.5)
    assert [pid for pid in daemons + strays if _alive(pid)] == []
    assert cluster.stray_pids() == []
    shutil.rmtree(cluster.root)
