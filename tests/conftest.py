"""Fixtures shared by several test modules.

Defined here, not imported into each module: a fixture imported by name into a module is a
separate fixture per module, so a session-scoped one would start once per module and every
instance would stay alive until the session ends.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine_helpers import registered_methods
from slurm_cluster import SlurmCluster, slurm_available


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    """One two-node SLURM cluster for the whole session; SLURM_CONF points at it while it runs."""
    if not slurm_available():
        pytest.skip("SLURM (slurm-wlm) and munge are not installed")
    root = Path(tempfile.mkdtemp(prefix="lsp-slurm-"))
    cluster = SlurmCluster(root)
    previous = os.environ.get("SLURM_CONF")
    try:
        cluster.start()
        os.environ["SLURM_CONF"] = str(cluster.conf)
        yield cluster
    finally:
        cluster.stop()
        if previous is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = previous
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def ema_method() -> Iterator[str]:
    """The test-only method ``classification_ema`` registered in ``lspretrain.methods.METHODS``
    for one test (and the ranks it spawns); the registry is restored afterwards."""
    with registered_methods("classification_ema"):
        yield "classification_ema"
