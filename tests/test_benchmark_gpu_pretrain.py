"""benchmarks/gpu_pretrain.py --tiny: the GPU benchmark's CPU mode, so a machine without a GPU
checks that the one device call it is written for will work (real trainer, real shards)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_pretrain_tiny_reports_every_figure(tmp_path):
    out = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_pretrain.py"), "--tiny",
                           "--configs", "dinov2:none", "dinov2:paper", "deit3:paper_lora", "--json", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    results = data["results"]
    assert set(results) == {"dinov2:none", "dinov2:paper", "deit3:paper_lora"}
    for name, r in results.items():
        assert r["loss_finite"], name
        assert r["images_per_s"] > 0 and r["step_time_s"] > 0 and 0 < r["mfu"] < 1, (name, r)
        assert r["batch"] == (4 if name.startswith("dinov2") else 6)
        assert r["spec"] == name.split(":")[1]
        # the phases are measured on the same trainer and account for the step they split
        total = sum(r["phases_s"].values())
        assert 0.5 * r["phased_step_s"] < total <= 1.05 * r["phased_step_s"], (name, r["phases_s"], r["phased_step_s"])
        assert r["phases_s"]["forward"] > 0 and r["phases_s"]["backward"] > 0 and r["phases_s"]["optimizer"] > 0
    assert results["dinov2:paper"]["flops_per_sample"] > results["dinov2:none"]["flops_per_sample"] * 0.99
    assert results["dinov2:none"]["phases_s"]["ema"] > 0  # DINOv2 has a teacher; DeiT-III keeps none by default
    assert set(data["inference"]["ratio"]) == {"none", "paper", "paper_lora merged"}
    report = data["report"]
    assert "| dinov2:paper |" in report and "vs none" in report and "Where a step goes" in report
    assert "dinov2:paper:" in proc.stdout and "images/s" in proc.stdout  # one progress line per config
