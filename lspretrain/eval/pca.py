"""PCA feature maps as in DINOv2's figures, and per-token feature-norm maps.

``pca_grid`` renders one row per image: the input, then for each model its PCA map (first
three principal components of the foreground patch features as RGB) and its feature-norm map
(high-norm artifact tokens are what specialization targets), on one colour scale per model
whose colour bar, with its values, closes the column. Drawn with PIL only.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torch import nn

__all__ = ["feature_maps", "pca_rgb", "norm_map", "pca_grid"]

# A perceptually ordered colour ramp (viridis anchors) for the norm maps.
_RAMP = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=np.float32)


@torch.no_grad()
def feature_maps(backbone: nn.Module, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Normalised patch features (B, h, w, C) and their pre-norm L2 norms (B, h, w)."""
    backbone.eval()
    out = backbone.forward_features(images)
    p = backbone.cfg.patch_size
    b, _, hh, ww = images.shape
    h, w = hh // p, ww // p
    prenorm_patches = out["prenorm"][:, backbone.num_prefix_tokens:]
    return {
        "patches": out["patches_norm"].float().reshape(b, h, w, -1),
        "norms": prenorm_patches.float().norm(dim=-1).reshape(b, h, w),
    }


def _principal_components(x: torch.Tensor, n: int) -> torch.Tensor:
    """Projections of the rows of ``x`` on its first ``n`` principal directions."""
    centred = x - x.mean(0, keepdim=True)
    _, _, v = torch.linalg.svd(centred, full_matrices=False)
    return centred @ v[:n].t()


def pca_rgb(patches: torch.Tensor, remove_background: bool = True, threshold: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """RGB maps (B, h, w, 3) in [0, 1] and foreground masks (B, h, w).

    DINOv2's recipe: the first component over all patches separates foreground from
    background (its sign is set so that the image borders are background); a second PCA on
    the foreground patches gives the three colour channels, min-max scaled."""
    b, h, w, c = patches.shape
    flat = patches.reshape(-1, c)
    if remove_background:
        first = _principal_components(flat, 1)[:, 0].reshape(b, h, w)
        border = torch.cat([first[:, 0], first[:, -1], first[:, :, 0], first[:, :, -1]], dim=1)
        if border.mean() > 0:
            first = -first
        fg = first > threshold
        if fg.sum() < 3:  # nothing stands out: keep every patch rather than draw nothing
            fg = torch.ones_like(fg)
    else:
        fg = torch.ones(b, h, w, dtype=torch.bool)
    rgb = torch.zeros(b, h, w, 3)
    comps = _principal_components(flat[fg.reshape(-1)], 3)
    lo, hi = comps.min(0).values, comps.max(0).values
    rgb[fg] = (comps - lo) / (hi - lo).clamp(min=1e-6)
    return rgb, fg


def norm_map(norms: torch.Tensor, lo: float | None = None, hi: float | None = None) -> torch.Tensor:
    """(B, h, w) norms -> (B, h, w, 3) colours in [0, 1]: ``lo`` .. ``hi`` on the colour ramp
    (values outside clamped), or each image's own min .. max when they are not given."""
    lo = norms.flatten(1).min(1).values[:, None, None] if lo is None else torch.tensor(lo)
    hi = norms.flatten(1).max(1).values[:, None, None] if hi is None else torch.tensor(hi)
    t = ((norms - lo) / (hi - lo).clamp(min=1e-6)).clamp(0, 1).numpy() * (len(_RAMP) - 1)
    i = np.clip(np.floor(t).astype(int), 0, len(_RAMP) - 2)
    frac = (t - i)[..., None]
    return torch.from_numpy((_RAMP[i] * (1 - frac) + _RAMP[i + 1] * frac) / 255.0)


def _to_pil(rgb: torch.Tensor, size: int) -> Image.Image:
    """(h, w, 3) in [0, 1] -> a size x size PIL image, patches as sharp squares."""
    arr = (rgb.clamp(0, 1).numpy() * 255).astype(np.uint8)
    return Image.fromarray(arr).resize((size, size), Image.NEAREST)


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: float) -> list[str]:
    """Greedy word wrap of ``text`` to lines no wider than ``width``; a word wider than a line
    (a long file name) is cut into pieces that fit, so nothing runs into the next column."""
    pieces: list[str] = []
    for word in text.split():
        while len(word) > 1 and draw.textlength(word, font=font) > width:
            n = 1
            while draw.textlength(word[:n + 1], font=font) <= width:
                n += 1
            pieces.append(word[:n])
            word = word[n:]
        pieces.append(word)
    lines: list[str] = []
    for piece in pieces:
        if lines and draw.textlength(f"{lines[-1]} {piece}", font=font) <= width:
            lines[-1] = f"{lines[-1]} {piece}"
        else:
            lines.append(piece)
    return lines


def _colour_bar(draw: ImageDraw.ImageDraw, font, x0: int, y0: int, width: int, lo: float, hi: float, line_h: int) -> None:
    """The norm ramp as a horizontal bar from ``lo`` (left) to ``hi`` (right), labelled."""
    ramp = norm_map(torch.linspace(0, 1, width)[None, None], 0.0, 1.0)[0, 0].numpy()
    for i, rgb in enumerate((ramp * 255).astype(np.uint8)):
        draw.line([(x0 + i, y0), (x0 + i, y0 + 9)], fill=tuple(int(c) for c in rgb))
    draw.rectangle([x0, y0, x0 + width - 1, y0 + 9], outline=(120, 120, 120))
    lo_text, hi_text = f"{lo:.3g}", f"{hi:.3g}"
    y = y0 + 12
    draw.text((x0, y), lo_text, fill="black", font=font)
    draw.text((x0 + width - draw.textlength(hi_text, font=font), y), hi_text, fill="black", font=font)
    caption = "L2 norm"
    free = width - draw.textlength(lo_text, font=font) - draw.textlength(hi_text, font=font)
    if draw.textlength(caption, font=font) + 8 <= free:
        draw.text((x0 + (width - draw.textlength(caption, font=font)) / 2, y), caption, fill=(90, 90, 90), font=font)
    else:
        draw.text((x0, y + line_h), caption, fill=(90, 90, 90), font=font)


def pca_grid(models: list[tuple[str, nn.Module]], images: torch.Tensor, display: torch.Tensor | None = None,
             cell: int = 224, font_size: int = 12) -> Image.Image:
    """A grid: one row per image; columns input, then per model its PCA map and norm map.

    Column titles are wrapped to the column width (never cut); each model's norm maps share
    one scale, its pre-norm patch-token L2 norms from min to max over all the images, shown by
    a colour bar with those values under the column. ``images`` (B, 3, H, W) are the normalised
    model inputs; ``display`` (B, 3, H, W) in [0, 1] what to show in the first column (defaults
    to a min-max rescale of ``images``)."""
    if display is None:
        lo = images.amin(dim=(1, 2, 3), keepdim=True)
        display = (images - lo) / (images.amax(dim=(1, 2, 3), keepdim=True) - lo).clamp(min=1e-6)
    columns = [("input", [_to_pil(F.interpolate(d[None], size=(cell, cell), mode="bilinear")[0].permute(1, 2, 0), cell) for d in display], None)]
    for name, model in models:
        maps = feature_maps(model, images)
        rgb, _ = pca_rgb(maps["patches"])
        lo, hi = maps["norms"].min().item(), maps["norms"].max().item()
        columns.append((f"{name}: PCA", [_to_pil(m, cell) for m in rgb], None))
        columns.append((f"{name}: token norm", [_to_pil(m, cell) for m in norm_map(maps["norms"], lo, hi)], (lo, hi)))
    font = ImageFont.load_default(size=font_size)  # a TrueType face: the bitmap default is 6 px wide
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    titles = [_wrap(measure, title, font, cell - 8) for title, _, _ in columns]
    line_h = font_size + 3
    header = 6 + line_h * max(len(t) for t in titles)
    footer = 16 + 3 * line_h  # colour bar, its values, room for the caption on a line of its own
    n_rows = images.shape[0]
    grid = Image.new("RGB", (cell * len(columns), header + cell * n_rows + footer), "white")
    draw = ImageDraw.Draw(grid)
    for col, ((_, tiles, scale), lines) in enumerate(zip(columns, titles)):
        x0 = col * cell
        for i, line in enumerate(lines):
            draw.text((x0 + (cell - draw.textlength(line, font=font)) / 2, 3 + i * line_h), line, fill="black", font=font)
        for row, tile in enumerate(tiles):
            grid.paste(tile, (x0, header + row * cell))
        if scale is not None:
            _colour_bar(draw, font, x0 + 6, header + n_rows * cell + 6, cell - 12, *scale, line_h)
    return grid
