"""The pictures people read next to the dense figures: pca.png (titles never cut, one norm
scale per model with its colour bar) and curves.png (title and axis labels)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

from lspretrain.engine.metrics import plot_curves
from lspretrain.eval.pca import _RAMP, _wrap, norm_map, pca_grid
from lspretrain.models import build_backbone


def _dark(pixels) -> int:
    return sum(1 for p in pixels if max(p) < 100)


def test_norm_map_shares_one_scale_when_given():
    norms = torch.tensor([[[1.0, 2.0]], [[3.0, 4.0]]])  # two images, 1 x 2 tokens
    bottom, top = (torch.tensor(_RAMP[i] / 255.0, dtype=torch.float64) for i in (0, -1))

    def same(a, b):
        return torch.allclose(a.double(), b, atol=1e-6)

    shared = norm_map(norms, 1.0, 4.0)
    assert same(shared[0, 0, 0], bottom) and same(shared[1, 0, 1], top)  # the column's minimum and maximum
    assert not same(shared[0, 0, 1], top)  # image 0's own maximum is not the top of the shared scale
    own = norm_map(norms)  # per image: each image spans the whole ramp
    assert same(own[0, 0, 1], top) and same(own[1, 0, 1], top) and same(own[1, 0, 0], bottom)
    assert same(norm_map(torch.tensor([[[9.0]]]), 1.0, 4.0)[0, 0, 0], top)  # clamped


def test_pca_grid_titles_whole_and_colour_bars_under_norm_columns():
    torch.manual_seed(0)
    kw = dict(embed_dim=32, depth=2, num_heads=2, img_size=32, patch_size=8, layerscale_init=0.1)
    models = [("init", build_backbone("vit_tiny_patch16", "none", **kw)),
              ("trained (paper_lora)", build_backbone("vit_tiny_patch16", "paper_lora", **kw))]
    cell = 112
    grid = pca_grid(models, torch.randn(2, 3, 32, 32), cell=cell)
    assert grid.size[0] == 5 * cell and grid.size[1] > 2 * cell
    # Every title is drawn whole: its wrapped lines hold all its words and fit the column.
    font = ImageFont.load_default(size=12)
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    for title in ("trained (paper_lora): token norm", "trained (paper_lora): PCA", "init: token norm"):
        lines = _wrap(draw, title, font, cell - 8)
        assert " ".join(lines) == title and all(draw.textlength(line, font=font) <= cell - 8 for line in lines)
    # A word wider than the column (a checkpoint's file name) is cut into pieces that fit.
    lines = _wrap(draw, "vit_large_patch14_paper_lora.safetensors: PCA", font, 56)
    assert "".join(lines).replace(" ", "") == "vit_large_patch14_paper_lora.safetensors:PCA"
    assert len(lines) > 3 and all(draw.textlength(line, font=font) <= 56 for line in lines)
    header = 6 + 15 * len(_wrap(draw, "trained (paper_lora): token norm", font, cell - 8))
    bottom = header + 2 * cell
    # Text in every column's header; the last column's title is not cut at the right edge.
    for col in range(5):
        assert _dark(grid.crop((col * cell, 0, (col + 1) * cell, header)).getdata()) > 20, col
    # Colour bars (the ramp's two ends) and their values under the norm columns (2 and 4) only.
    for col in range(5):
        footer = set(grid.crop((col * cell, bottom, (col + 1) * cell, grid.size[1])).getdata())
        ends = {tuple(int(c) for c in _RAMP[0]), tuple(int(c) for c in _RAMP[-1])}
        near = {c for c in footer if any(sum(abs(a - b) for a, b in zip(c, e)) < 40 for e in ends)}
        assert bool(near) == (col in (2, 4)), col
        assert (_dark(grid.crop((col * cell, bottom + 16, (col + 1) * cell, grid.size[1])).getdata()) > 20) == (col in (2, 4))


def test_curves_have_a_title_and_axis_labels(tmp_path):
    run = tmp_path / "dinov2_tiny_paper"
    run.mkdir()
    rows = [{"step": s, "time": 0, "train/loss": 11 - 4 * (1 - math.exp(-s / 150)), "loss/dino": 10 - 3 * s / 600,
             "opt/lr": 1e-3 * min(s / 60, 1)} for s in range(0, 601, 25)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    other = tmp_path / "other.png"
    out = plot_curves(run / "metrics.jsonl", tmp_path / "c.png", keys=[("train/loss", "loss/dino"), ("opt/lr",)])
    img = np.asarray(Image.open(out).convert("RGB"))
    assert img.shape == (600, 1000, 3)
    dark = img.max(axis=2) < 100
    # The title band: text centred at the top; the y-label band left of the axes' tick labels.
    title = dark[:22]
    cols = np.flatnonzero(title.any(axis=0))
    assert title.sum() > 100 and abs((cols[0] + cols[-1]) / 2 - 500) < 20
    ylabel = dark[30:, :20]
    rows_with_text = np.flatnonzero(ylabel.any(axis=1))
    assert ylabel.sum() > 50 and rows_with_text.max() - rows_with_text.min() > 250  # a label beside each panel
    # "step" under each panel's x axis: dark text in the middle, just above each panel's bottom.
    for bottom in (26 + 287, 600):
        assert dark[bottom - 20:bottom, 480:560].sum() > 20, bottom
    # A caller's own title and labels; a wrong number of labels is refused.
    plot_curves(run / "metrics.jsonl", other, keys=["loss"], title="", ylabels=["DINO loss"])
    with pytest.raises(ValueError, match="1 ylabels for 2 panels"):
        plot_curves(run / "metrics.jsonl", other, keys=["loss", "opt/lr"], ylabels=["x"])
