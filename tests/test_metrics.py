"""MetricLogger (TensorBoard, JSON lines, console), timers, memory, MFU and PNG curves."""
from __future__ import annotations

import json
import time
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lspretrain.engine import metrics as M
from lspretrain.engine.metrics import MetricLogger, StepTimer, memory_stats, mfu, plot_curves, read_metrics, rss_bytes


def fake_clock(monkeypatch, readings: list[float]) -> None:
    """Replace the time module *as metrics sees it* (not the global one TensorBoard uses)."""
    clock = iter(readings)
    monkeypatch.setattr(M, "time", SimpleNamespace(perf_counter=lambda: next(clock), time=time.time))


def tb_scalars(run_dir) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(run_dir / "tb"))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_logger_writes_tensorboard_jsonl_and_console(tmp_path, capsys, monkeypatch) -> None:
    fake_clock(monkeypatch, [100.0, 100.5, 101.0, 101.5, 102.5])  # perf_counter at each log call
    with MetricLogger(tmp_path, total_steps=100, log_every=2) as logger:
        for step in range(5):
            logger.log(step, {"loss": torch.tensor(2.0 - 0.25 * step), "loss/dino": 1.0, "opt/lr": 1e-3 * step,
                              "data/bad_samples": 3}, images=64, tokens=64 * 5)
    tb = tb_scalars(tmp_path)
    assert {"train/loss", "loss/dino", "opt/lr", "data/bad_samples", "perf/step_time_s", "perf/images_per_s",
            "perf/tokens_per_s"} == set(tb)
    assert tb["train/loss"] == [(s, pytest.approx(2.0 - 0.25 * s)) for s in range(5)]
    assert tb["perf/images_per_s"] == [(1, 128.0), (2, 128.0), (3, 128.0), (4, 64.0)]  # 64 images / 0.5 s, then / 1 s
    assert tb["perf/tokens_per_s"][0] == (1, 640.0)
    assert tb["data/bad_samples"][-1] == (4, 3.0)
    lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines] == [0, 1, 2, 3, 4]
    assert lines[3]["train/loss"] == 1.25 and lines[3]["opt/lr"] == pytest.approx(3e-3)
    assert "perf/step_time_s" not in lines[0] and lines[4]["perf/step_time_s"] == 1.0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 3  # steps 0, 2, 4
    assert out[0].startswith("step 0/100 | loss 2 | loss/dino 1 | lr 0.000e+00")
    # step 4: median over the last 2 calls of 128 and 64 img/s = 96; ETA = 96 steps x median(0.5, 1.0) s = 72 s
    assert out[2] == "step 4/100 | loss 1 | loss/dino 1 | lr 4.000e-03 | 96.0 img/s | eta 0:01:12"


def test_logger_sparse_calls_resume_append_and_nonzero_rank(tmp_path, capsys, monkeypatch) -> None:
    fake_clock(monkeypatch, [0.0, 20.0, 50.0])
    with MetricLogger(tmp_path, total_steps=1000, log_every=10) as logger:
        logger.log(10, {"loss": 1.0})
        values = logger.log(20, {"loss": 0.5}, images=32)  # 10 steps in 20 s: 2 s per step
    assert values["perf/step_time_s"] == 2.0 and values["perf/images_per_s"] == 16.0
    assert "eta 0:32:40" in capsys.readouterr().out  # 980 steps x 2 s
    with MetricLogger(tmp_path, tensorboard=False) as logger:  # resumed run: same file, appended
        logger.log(15, {"loss": 0.7})
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 3
    assert read_metrics(tmp_path / "metrics.jsonl")["train/loss"] == ([10, 15, 20], [1.0, 0.7, 0.5])

    other = tmp_path / "rank1"
    with MetricLogger(other, rank=1, total_steps=10, log_every=1) as logger:
        assert logger.log(0, {"loss": torch.tensor(1.0)}, images=8) == {}
    assert not other.exists()
    assert capsys.readouterr().out == ""


def test_logger_rejects_non_scalar_tensor(tmp_path) -> None:
    with MetricLogger(tmp_path, tensorboard=False) as logger, pytest.raises(ValueError, match="'loss'.*shape \\(2,\\)"):
        logger.log(0, {"loss": torch.ones(2)})


def test_step_timer_and_memory_and_mfu(monkeypatch) -> None:
    fake_clock(monkeypatch, [0.0, 0.25, 0.25, 1.0, 1.0, 1.25, 1.25, 2.0])
    timer = StepTimer("cpu")
    for _ in range(2):
        with timer("data"):
            pass
        with timer("compute"):
            pass
    assert timer.pop() == {"perf/data_s": 0.25, "perf/compute_s": 0.75, "perf/data_wait_frac": 0.25}
    assert timer.pop() == {}
    monkeypatch.undo()

    before = rss_bytes()
    block = torch.ones(64 << 20, dtype=torch.uint8)  # touch 64 MiB
    assert rss_bytes() - before >= 60 << 20
    del block
    stats = memory_stats("cpu")
    assert list(stats) == ["rss_gib"] and 0.01 < stats["rss_gib"] < 64
    assert mfu(2.5e12, 1e13) == 0.25
    with pytest.raises(ValueError, match="peak_flops=0"):
        mfu(1.0, 0)


def _jsonl(path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_plot_curves_png(tmp_path) -> None:
    log = tmp_path / "metrics.jsonl"
    _jsonl(log, [{"step": s, "time": 0, "train/loss": 10.0 - 0.09 * s, "opt/lr": min(s, 20) * 1e-4,
                  "loss/dino": float("nan") if s == 50 else 5.0 - 0.02 * s} for s in range(100)])
    out = plot_curves(log, tmp_path / "png" / "curves.png", keys=["loss"], size=(640, 360))
    img = Image.open(out).convert("RGB")
    assert img.size == (640, 360)
    px = img.load()
    non_white = sum(1 for x in range(640) for y in range(360) if px[x, y] != (255, 255, 255))
    assert non_white > 2000
    blue = [(x, y) for x in range(640) for y in range(360) if px[x, y] == M._PALETTE[0]]
    assert len(blue) > 500  # the line, 2 px wide across the plot
    left = [y for x, y in blue if x < 200]
    right = [y for x, y in blue if x > 440]
    assert sum(left) / len(left) < sum(right) / len(right) - 100  # loss decreases: line runs down to the right

    out = plot_curves(log, tmp_path / "default.png", size=(500, 400))  # default: loss panel + lr panel
    img = Image.open(out).convert("RGB")
    colors = {img.getpixel((x, y)) for x in range(500) for y in range(400)}
    assert img.size == (500, 400) and {M._PALETTE[0], M._PALETTE[1]} <= colors
    with pytest.raises(ValueError, match=r"\['train/acc'\].*available"):
        plot_curves(log, tmp_path / "x.png", keys=["acc"])
