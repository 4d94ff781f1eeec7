"""The README's main job, on a tiny budget: shards from Debian's Fashion-MNIST, accounting,
k-NN before/after, a real DINOv2 run with checkpoints and TensorBoard logs, PCA picture."""
import json
from pathlib import Path

import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lspretrain.data.shard_writer import find_fashion_mnist

pytestmark = pytest.mark.skipif(find_fashion_mnist(None) is None,
                                reason="needs Debian's dataset-fashion-mnist (.ci/run installs it)")


TINY_BUDGET = ["--steps", "6", "--knn-train", "500", "--knn-test", "500", "--dense-train", "40", "--dense-test", "20",
               "optim.warmup_steps=2", "method.warmup_teacher_temp_steps=3", "method.freeze_last_layer_steps=2",
               "checkpoint.every=3", "log.every=2", "data.batch_size=16", "method.n_local_crops=2"]


def test_demo_end_to_end(tmp_path, capsys):
    from lspretrain.demo import main

    assert main(TINY_BUDGET + ["--out", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    (run,) = summary["runs"]
    assert run["status"] == "completed" and run["steps"] == 6 and run["spec"] == "paper"
    assert 0.0 <= run["knn_top1_init"] <= 100.0 and 0.0 <= run["knn_top1_final"] <= 100.0
    assert 0.0 < run["dense_miou_init"] <= 100.0 and 0.0 < run["dense_miou_final"] <= 100.0
    assert run["extra_params"] > 0 and set(run["forward_macs_delta_vs_plain"].values()) == {0}
    run_dir = Path(run["run_dir"])
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_00000003", "step_00000006"]
    assert "extra: qkv" in (run_dir / "accounting.md").read_text()
    acc = EventAccumulator(str(run_dir / "tb"))
    acc.Reload()
    assert {"loss/dino", "loss/ibot", "loss/koleo", "train/loss", "opt/lr"} <= set(acc.Tags()["scalars"])
    pca = Image.open(run["pca"])
    # input + (PCA, norm) x (init, trained) columns; 6 test images, titles and colour bars above and below
    assert pca.size[0] == 112 * 5 and pca.size[1] > 112 * 6
    assert Image.open(run["curves"]).size == (1000, 600)
    out = capsys.readouterr().out
    assert "k-NN top-1" in out and "dense mIoU" in out and str(run_dir) in out


def test_a_stopped_demo_says_so_and_reports_no_trained_figures(tmp_path, capsys, monkeypatch):
    from lspretrain.demo import main
    from lspretrain.engine.trainer import Trainer

    train_step = Trainer._train_step

    def stop_at_step_2(self, batches):  # what Ctrl-C does: the flag the signal handler sets
        if self.step == 1:
            self.request_stop()
        return train_step(self, batches)

    monkeypatch.setattr(Trainer, "_train_step", stop_at_step_2)
    assert main(TINY_BUDGET + ["--out", str(tmp_path)]) == 75
    out = capsys.readouterr().out
    assert "[paper] stopped at step 2" in out and "run the same command again to resume" in out
    assert "trained" not in out and not (tmp_path / "summary.json").exists()
    assert (tmp_path / "dinov2_tiny_paper" / "checkpoints" / "step_00000002").is_dir()
    monkeypatch.setattr(Trainer, "_train_step", train_step)
    assert main(TINY_BUDGET + ["--out", str(tmp_path)]) == 0  # the same command resumes and finishes
    (run,) = json.loads((tmp_path / "summary.json").read_text())["runs"]
    assert run["status"] == "completed" and run["steps"] == 6
