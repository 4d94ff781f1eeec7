"""DCP checkpoints are read without running code a crafted file carries: a ``.metadata`` pickle
whose ``__reduce__`` would create a file is refused, naming the file, on every path that reads
DCP (resume, ``method.init_from`` / ``init_head``, tools/convert_checkpoint.py), and so is a
non-tensor value that is not weights-only; a real checkpoint still loads."""
from __future__ import annotations

import os
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from engine_helpers import ROOT, run_worker, tiny_recipe
from lspretrain.engine.safe_load import UnsafeCheckpointError, dcp_load, read_dcp_metadata


class Payload:
    """Unpickling this runs ``touch MARKER``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A run directory with one complete DCP checkpoint (step 2)."""
    run = tmp_path_factory.mktemp("trained") / "run"
    assert run_worker(tiny_recipe(run, steps=2))["status"] == "completed"
    return run


@pytest.fixture
def poisoned(trained, tmp_path) -> tuple[Path, Path, Path]:
    """(run directory, its checkpoint's .metadata holding the payload, the payload's marker file)."""
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    metadata = run / "checkpoints" / "step_00000002" / "state" / ".metadata"
    marker = tmp_path / "code-ran"
    metadata.write_bytes(pickle.dumps(Payload(marker)))
    return run, metadata, marker


def test_real_checkpoint_metadata_reads_and_loads(trained, tmp_path):
    state = trained / "checkpoints" / "step_00000002" / "state"
    meta = read_dcp_metadata(state).state_dict_metadata
    key = "model.backbone.blocks.0.attn.qkv.weight"
    assert tuple(meta[key].size) == (96, 32) and meta[key].properties.dtype == torch.float32
    sd = {key: torch.zeros(96, 32)}
    dcp_load(sd, state, no_dist=True)
    assert sd[key].abs().sum() > 0  # the trained weights arrived
    # Non-tensor values (python numbers, strings) pass the weights-only check and come back intact.
    plain = tmp_path / "plain"
    dcp.save({"t": torch.arange(3.0), "n": 7, "name": "x", "groups": [{"lr": 0.5, "betas": (0.9, 0.99)}]},
             checkpoint_id=str(plain), no_dist=True)
    back = {"t": torch.zeros(3), "n": 0, "name": "", "groups": [{"lr": 0.0, "betas": (0.0, 0.0)}]}
    dcp_load(back, plain, no_dist=True)
    assert back["t"].tolist() == [0.0, 1.0, 2.0] and (back["n"], back["name"]) == (7, "x")
    assert back["groups"] == [{"lr": 0.5, "betas": (0.9, 0.99)}]


def test_resume_refuses_code_carrying_metadata(poisoned):
    run, metadata, marker = poisoned
    with pytest.raises(UnsafeCheckpointError, match=re.escape(f"{metadata}: refused to unpickle posix.system")):
        run_worker(tiny_recipe(run, steps=4))
    assert not marker.exists()


def test_init_from_and_init_head_refuse_code_carrying_metadata(poisoned, tmp_path):
    from lspretrain.methods.classification import _read_head

    run, metadata, marker = poisoned
    recipe = tiny_recipe(tmp_path / "finetune", steps=2, method={"init_from": str(run)})
    with pytest.raises(ValueError, match=re.escape(f"{metadata}: refused to unpickle posix.system")):
        run_worker(recipe)
    with pytest.raises(UnsafeCheckpointError, match=re.escape(f"{metadata}: refused")):
        _read_head(run, "")
    assert not marker.exists() and not (tmp_path / "finetune" / "checkpoints").exists()


def test_converter_refuses_code_carrying_metadata_in_one_line(poisoned, tmp_path):
    run, metadata, marker = poisoned
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "convert_checkpoint.py"), str(run), "--to", "torch",
                          "--out", str(tmp_path / "out.pt")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {metadata}: refused to unpickle posix.system: DCP metadata holds only "
                      "torch.distributed.checkpoint's metadata classes and plain data, and this global could run code"]
    assert "Traceback" not in out.stderr
    assert not marker.exists() and not (tmp_path / "out.pt").exists()


def test_code_carrying_value_in_the_data_files_is_refused(tmp_path):
    marker = tmp_path / "code-ran"
    dcp.save({"t": torch.ones(2), "evil": Payload(marker)}, checkpoint_id=str(tmp_path / "ckpt"), no_dist=True)
    read_dcp_metadata(tmp_path / "ckpt")  # the metadata itself is clean
    refusal = r"ckpt/__0_0\.distcp: refused to unpickle the value of 'evil': .* GLOBAL posix\.system"
    with pytest.raises(UnsafeCheckpointError, match=refusal):
        dcp_load({"t": torch.zeros(2), "evil": None}, tmp_path / "ckpt", no_dist=True)
    assert not marker.exists()
