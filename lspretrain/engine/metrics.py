"""Training metrics: TensorBoard + JSON lines + a console line, timing, memory, MFU, PNG curves.

Tag convention (TensorBoard tags and metrics.jsonl keys): a key that contains "/" is used as
is (``loss/dino``, ``opt/lr``, ``perf/images_per_s``, ``data/bad_samples``, ``memory/rss_gib``);
any other key goes under ``train/`` (``loss`` -> ``train/loss``). The logger adds ``perf/*``
tags itself from the wall time between ``log`` calls.

Only rank 0 writes (files, events, console); on other ranks ``log`` returns at once without
reading any tensor, so it costs no device synchronization there.
"""
from __future__ import annotations

import json
import math
import os
import statistics
import sys
import time
from collections import deque
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import torch

__all__ = [
    "MetricLogger", "StepTimer", "rss_bytes", "memory_stats", "mfu", "read_metrics", "plot_curves", "tag_for",
]

GIB = float(1 << 30)


def tag_for(key: str) -> str:
    """The TensorBoard tag of a scalar key: keys with a "/" as is, others under ``train/``."""
    return key if "/" in key else f"train/{key}"


def _to_float(key: str, value: float | int | torch.Tensor) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"metric {key!r}: expected a scalar, got a tensor of shape {tuple(value.shape)}")
        return float(value.detach().float().item())
    return float(value)


def _hms(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class MetricLogger:
    """Writes scalars to ``run_dir/tb`` (TensorBoard) and ``run_dir/metrics.jsonl`` (one JSON
    object per ``log`` call: ``step``, ``time``, then tags), and prints a console line when
    ``step % log_every == 0`` or ``step == total_steps``.

    ``log`` may be called every step or every N steps: the step time is the wall time since
    the previous call divided by the steps in between, and ``images`` / ``tokens`` are the
    counts of ONE optimizer step (global batch). Rates and the ETA use the median over the last
    ``log_every`` calls, robust to a slow step (checkpoint, eval).

    metrics.jsonl is opened in append mode, so a resumed run continues the same file; steps
    logged after the last checkpoint by the interrupted run then appear twice and
    ``read_metrics`` keeps the latest record. ``purge_step`` (the resume step) makes
    TensorBoard drop those stale events too (SummaryWriter's purge_step).
    """

    def __init__(
        self,
        run_dir: str | os.PathLike,
        rank: int = 0,
        total_steps: int | None = None,
        log_every: int = 10,
        tensorboard: bool = True,
        purge_step: int | None = None,
    ):
        if log_every < 1:
            raise ValueError(f"log_every={log_every}: expected >= 1")
        self.run_dir = Path(run_dir)
        self.enabled = rank == 0
        self.total_steps = total_steps
        self.log_every = log_every
        self._step_times: deque[float] = deque(maxlen=log_every)
        self._image_rates: deque[float] = deque(maxlen=log_every)
        self._last: tuple[int, float] | None = None  # (step, perf_counter) of the previous call
        self._jsonl = None
        self._tb = None
        if not self.enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.run_dir / "tb"), purge_step=purge_step, flush_secs=30)

    def log(
        self,
        step: int,
        scalars: dict[str, float | int | torch.Tensor],
        images: int | None = None,
        tokens: int | None = None,
        console: bool | None = None,
    ) -> dict[str, float]:
        """Record ``scalars`` at ``step``; returns the tag -> value dict written (empty on
        ranks other than 0). ``console``: print the console line (default: on every
        ``log_every``-th step and the last)."""
        if not self.enabled:
            return {}
        now = time.perf_counter()
        values = {tag_for(k): _to_float(k, v) for k, v in scalars.items()}
        if self._last is not None and step > self._last[0]:
            step_time = (now - self._last[1]) / (step - self._last[0])
            self._step_times.append(step_time)
            values["perf/step_time_s"] = step_time
            if images is not None:
                values["perf/images_per_s"] = images / step_time
                self._image_rates.append(values["perf/images_per_s"])
            if tokens is not None:
                values["perf/tokens_per_s"] = tokens / step_time
        self._last = (step, now)
        if self._tb is not None:
            for tag, value in values.items():
                self._tb.add_scalar(tag, value, step)
        # NaN / inf are written as Python's json does (NaN, Infinity): a diverging loss is data.
        self._jsonl.write(json.dumps({"step": step, "time": time.time(), **values}) + "\n")
        self._jsonl.flush()
        if console if console is not None else (step % self.log_every == 0 or step == self.total_steps):
            print(self._console_line(step, values), file=sys.stdout, flush=True)
        return values

    def _console_line(self, step: int, values: dict[str, float]) -> str:
        parts = [f"step {step}/{self.total_steps}" if self.total_steps else f"step {step}"]
        losses = [t for t in values if t.startswith("loss/") or t.rsplit("/", 1)[-1] == "loss"]
        for tag in sorted(losses, key=lambda t: (t != "train/loss", t)) + [t for t in values if t.rsplit("/", 1)[-1] == "lr"]:
            name = tag.removeprefix("train/").removeprefix("opt/")
            parts.append(f"{name} {values[tag]:.4g}" if name != "lr" else f"lr {values[tag]:.3e}")
        if self._image_rates:
            parts.append(f"{statistics.median(self._image_rates):.1f} img/s")
        if self._step_times and self.total_steps:
            parts.append(f"eta {_hms(max(self.total_steps - step, 0) * statistics.median(self._step_times))}")
        return " | ".join(parts)

    def flush(self) -> None:
        if self._jsonl is not None:
            self._jsonl.flush()
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> "MetricLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class StepTimer:
    """Wall time per named phase (the trainer's data / forward / backward / collective /
    optimizer / ema)::

        timer = StepTimer(device)
        with timer("data"): batch = next(it)
        with timer("compute"): loss = step(batch)
        logger.log(step, {..., **timer.pop()})

    A CUDA device runs asynchronously, so its host times are only launch times. With ``sync``
    each phase boundary synchronizes it, so kernels queued in a phase are charged to that
    phase; that costs some throughput, hence opt-in (``log.phase_times``). ``exact`` says
    whether the times are real: always on the CPU, on CUDA only with ``sync``.
    """

    def __init__(self, device: torch.device | str | None = None, sync: bool = True):
        device = torch.device(device) if device is not None else torch.device("cpu")
        self._sync = device if device.type == "cuda" and sync else None
        self.exact = device.type != "cuda" or sync
        self._total: dict[str, float] = {}
        self._count: dict[str, int] = {}

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        if self._sync is not None:
            torch.cuda.synchronize(self._sync)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self._sync is not None:
                torch.cuda.synchronize(self._sync)
            self._total[phase] = self._total.get(phase, 0.0) + time.perf_counter() - t0
            self._count[phase] = self._count.get(phase, 0) + 1

    def pop(self, steps: int | None = None) -> dict[str, float]:
        """Seconds of each phase since the last pop (``perf/<phase>_s``), per entry or, given
        ``steps``, per step (a phase entered once per micro-batch sums over them), and, with
        both ``data`` and ``compute`` timed, ``perf/data_wait_frac`` = data share of their sum;
        then reset."""
        out = {f"perf/{k}_s": self._total[k] / (steps or self._count[k]) for k in self._total}
        if "data" in self._total and "compute" in self._total:
            out["perf/data_wait_frac"] = self._total["data"] / max(self._total["data"] + self._total["compute"], 1e-12)
        self._total.clear()
        self._count.clear()
        return out


def rss_bytes() -> int:
    """Resident set size of this process now (Linux /proc; elsewhere the peak from getrusage)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024  # macOS: bytes, Linux: KiB


def memory_stats(device: torch.device | str | None = None) -> dict[str, float]:
    """Memory in GiB, keys without a group (the caller picks one, e.g. ``memory/``):
    ``rss_gib`` always; on CUDA also ``cuda_max_allocated_gib`` / ``cuda_max_reserved_gib``
    (peaks since the last ``torch.cuda.reset_peak_memory_stats``). ``device`` None: the
    current CUDA device when CUDA is available, else CPU."""
    if device is None:
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    stats = {"rss_gib": rss_bytes() / GIB}
    if device.type == "cuda":
        stats["cuda_max_allocated_gib"] = torch.cuda.max_memory_allocated(device) / GIB
        stats["cuda_max_reserved_gib"] = torch.cuda.max_memory_reserved(device) / GIB
    return stats


def mfu(flops_per_s: float, peak_flops: float) -> float:
    """Model FLOPs utilization: achieved / peak FLOP/s, both over the same devices. Count
    FLOPs, not multiply-adds (fvcore and ``lspretrain.accounting`` MAC counts are x2)."""
    if not peak_flops > 0:
        raise ValueError(f"peak_flops={peak_flops}: expected a positive FLOP/s figure")
    return flops_per_s / peak_flops


def read_metrics(metrics_jsonl: str | os.PathLike) -> dict[str, tuple[list[int], list[float]]]:
    """tag -> (steps, values) from a metrics.jsonl, sorted by step. When a step appears more
    than once (a resumed run re-logging steps after its last checkpoint) the last record wins."""
    records: dict[int, dict] = {}
    with open(metrics_jsonl, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                rec = json.loads(line)
                records[int(rec["step"])] = rec
    series: dict[str, tuple[list[int], list[float]]] = {}
    for step in sorted(records):
        for tag, value in records[step].items():
            if tag not in ("step", "time"):
                steps, values = series.setdefault(tag, ([], []))
                steps.append(step)
                values.append(float(value))
    return series


# -- PNG curves with PIL only (matplotlib is not a dependency) ----------------------------
_PALETTE = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
            (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207))
_MARGIN = dict(left=72, right=16, top=26, bottom=34)


def _nice_ticks(lo: float, hi: float, target: int = 5) -> list[float]:
    """About ``target`` round tick values (1, 2, 5 x 10^k steps) covering [lo, hi]."""
    raw = (hi - lo) / max(target, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def _span(values: Sequence[float]) -> tuple[float, float]:
    lo, hi = min(values), max(values)
    if lo == hi:
        pad = abs(lo) * 0.05 or 1.0
        return lo - pad, hi + pad
    pad = (hi - lo) * 0.05
    return lo - pad, hi + pad


def _draw_panel(draw, font, box: tuple[int, int, int, int], series: list[tuple[str, list[int], list[float]]], colors) -> None:
    x0, y0, x1, y1 = box[0] + _MARGIN["left"], box[1] + _MARGIN["top"], box[2] - _MARGIN["right"], box[3] - _MARGIN["bottom"]
    finite = [(s, v) for _, steps, vals in series for s, v in zip(steps, vals) if math.isfinite(v)]
    if not finite:
        draw.text((x0 + 8, y0 + 8), "no finite values", fill="black", font=font)
        return
    (sx0, sx1), (vy0, vy1) = _span([s for s, _ in finite]), _span([v for _, v in finite])

    def px(step: float, value: float) -> tuple[float, float]:
        return x0 + (step - sx0) / (sx1 - sx0) * (x1 - x0), y1 - (value - vy0) / (vy1 - vy0) * (y1 - y0)

    for t in _nice_ticks(vy0, vy1):
        y = px(sx0, t)[1]
        draw.line([(x0, y), (x1, y)], fill=(230, 230, 230))
        label = f"{t:.3g}"
        draw.text((x0 - 6 - draw.textlength(label, font=font), y - 6), label, fill="black", font=font)
    for t in _nice_ticks(sx0, sx1):
        x = px(t, vy0)[0]
        draw.line([(x, y0), (x, y1)], fill=(230, 230, 230))
        label = f"{t:.6g}"
        draw.text((x - draw.textlength(label, font=font) / 2, y1 + 6), label, fill="black", font=font)
    draw.rectangle([x0, y0, x1, y1], outline="black")
    for (_, steps, vals), color in zip(series, colors):
        segment: list[tuple[float, float]] = []
        for s, v in [*zip(steps, vals), (None, math.nan)]:  # sentinel closes the last segment
            if s is not None and math.isfinite(v):
                segment.append(px(s, v))
                continue
            if len(segment) > 1:
                draw.line(segment, fill=color, width=2, joint="curve")
            elif segment:
                (x, y), = segment
                draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=color)
            segment = []
    # legend, top right inside the axes
    width = max(draw.textlength(name, font=font) for name, _, _ in series) + 34
    lx, ly = x1 - width - 6, y0 + 6
    draw.rectangle([lx, ly, x1 - 6, ly + 14 * len(series) + 6], fill="white", outline=(160, 160, 160))
    for i, ((name, _, _), color) in enumerate(zip(series, colors)):
        yy = ly + 10 + 14 * i
        draw.line([(lx + 6, yy), (lx + 24, yy)], fill=color, width=3)
        draw.text((lx + 30, yy - 6), name, fill="black", font=font)


def plot_curves(
    metrics_jsonl: str | os.PathLike,
    out_png: str | os.PathLike,
    keys: Sequence[str | Sequence[str]] | None = None,
    size: tuple[int, int] = (1000, 600),
    title: str | None = None,
    ylabels: Sequence[str] | None = None,
) -> Path:
    """Draw training curves from a metrics.jsonl to a PNG of ``size`` (width, height) pixels.

    ``keys``: one panel per entry, stacked vertically; an entry is a tag or a sequence of tags
    drawn on shared axes with a legend (``[("train/loss", "loss/dino"), "opt/lr"]``). Keys
    without "/" are read as ``train/<key>``. Default: a panel of every loss tag and a panel of
    the lr tags. Non-finite values break the line. ``title`` (default: "training curves of
    <run directory>") heads the picture; each panel's y axis is labelled by ``ylabels`` (default:
    what its tags have in common, e.g. "loss", else the tag) and its x axis "step". Rendered
    with PIL, no matplotlib."""
    from PIL import Image, ImageDraw, ImageFont

    data = read_metrics(metrics_jsonl)
    if keys is None:
        losses = sorted(t for t in data if t.startswith("loss/") or t.rsplit("/", 1)[-1] == "loss")
        panels = [p for p in (losses, sorted(t for t in data if t.rsplit("/", 1)[-1] == "lr")) if p]
    else:
        panels = [[tag_for(k) for k in ([entry] if isinstance(entry, str) else entry)] for entry in keys]
    missing = sorted({t for p in panels for t in p if t not in data})
    if missing or not panels:
        raise ValueError(f"plot_curves: tags {missing or 'to plot'} not in {metrics_jsonl}; available: {sorted(data)}")
    if ylabels is not None and len(ylabels) != len(panels):
        raise ValueError(f"plot_curves: {len(ylabels)} ylabels for {len(panels)} panels")

    def common_label(tags: list[str]) -> str:
        if len(tags) == 1:
            return {"lr": "learning rate", "wd": "weight decay"}.get(tags[0].rsplit("/", 1)[-1], tags[0])
        shared = set(tags[0].split("/")).intersection(*(t.split("/") for t in tags[1:]))
        return "/".join(part for part in tags[0].split("/") if part in shared) or ", ".join(tags)

    width, height = size
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    fs = 12  # a TrueType face, not the 6 px bitmap default; 12 px also fits the legend's 14 px rows
    font, bold = ImageFont.load_default(size=fs), ImageFont.load_default(size=fs + 3)
    heading = title if title is not None else f"training curves of {Path(metrics_jsonl).resolve().parent.name}"
    title_h, ylabel_w, xlabel_h = fs + 14, fs + 10, fs + 6
    draw.text(((width - draw.textlength(heading, font=bold)) / 2, 5), heading, fill="black", font=bold)
    panel_h = (height - title_h) / len(panels)
    for i, tags in enumerate(panels):
        top, bottom = title_h + round(i * panel_h), title_h + round((i + 1) * panel_h)
        box = (ylabel_w, top, width, bottom - xlabel_h)
        _draw_panel(draw, font, box, [(t, *data[t]) for t in tags], _PALETTE * (len(tags) // len(_PALETTE) + 1))
        # Axis labels outside the box _draw_panel fills: "step" under the ticks, the quantity
        # rotated along the y axis, both centred on the plot area.
        x_mid = (box[0] + _MARGIN["left"] + box[2] - _MARGIN["right"]) / 2
        draw.text((x_mid - draw.textlength("step", font=font) / 2, box[3] - 4), "step", fill="black", font=font)
        label = ylabels[i] if ylabels is not None else common_label(tags)
        strip = Image.new("RGB", (round(draw.textlength(label, font=font)) + 4, fs + 6), "white")
        ImageDraw.Draw(strip).text((2, 1), label, fill="black", font=font)
        strip = strip.rotate(90, expand=True)
        y_mid = (box[1] + _MARGIN["top"] + box[3] - _MARGIN["bottom"]) / 2
        image.paste(strip, (2, max(top, round(y_mid - strip.height / 2))))
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out, format="PNG")
    return out
