"""PCA feature maps as in DINOv2's figures, and per-token feature-norm maps.

``pca_grid`` renders one row per image: the input, then for each model its PCA map (first
three principal components of the foreground patch features as RGB) and its feature-norm map
(high-norm artifact tokens are what specialization targets). Drawn with PIL only.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
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


def norm_map(norms: torch.Tensor) -> torch.Tensor:
    """(B, h, w) norms -> (B, h, w, 3) colours in [0, 1], scaled per image."""
    lo = norms.flatten(1).min(1).values[:, None, None]
    hi = norms.flatten(1).max(1).values[:, None, None]
    t = ((norms - lo) / (hi - lo).clamp(min=1e-6)).numpy() * (len(_RAMP) - 1)
    i = np.clip(np.floor(t).astype(int), 0, len(_RAMP) - 2)
    frac = (t - i)[..., None]
    return torch.from_numpy((_RAMP[i] * (1 - frac) + _RAMP[i + 1] * frac) / 255.0)


def _to_pil(rgb: torch.Tensor, size: int) -> Image.Image:
    """(h, w, 3) in [0, 1] -> a size x size PIL image, patches as sharp squares."""
    arr = (rgb.clamp(0, 1).numpy() * 255).astype(np.uint8)
    return Image.fromarray(arr).resize((size, size), Image.NEAREST)


def pca_grid(models: list[tuple[str, nn.Module]], images: torch.Tensor, display: torch.Tensor | None = None,
             cell: int = 224, label_height: int = 22) -> Image.Image:
    """A grid: one row per image; columns input, then per model its PCA map and norm map.

    ``images`` (B, 3, H, W) are the normalised model inputs; ``display`` (B, 3, H, W) in [0, 1]
    what to show in the first column (defaults to a min-max rescale of ``images``)."""
    if display is None:
        lo = images.amin(dim=(1, 2, 3), keepdim=True)
        display = (images - lo) / (images.amax(dim=(1, 2, 3), keepdim=True) - lo).clamp(min=1e-6)
    columns = [("input", [_to_pil(F.interpolate(d[None], size=(cell, cell), mode="bilinear")[0].permute(1, 2, 0), cell) for d in display])]
    for name, model in models:
        maps = feature_maps(model, images)
        rgb, _ = pca_rgb(maps["patches"])
        norms = norm_map(maps["norms"])
        columns.append((f"{name}: PCA", [_to_pil(m, cell) for m in rgb]))
        columns.append((f"{name}: token norm", [_to_pil(m, cell) for m in norms]))
    n_rows = images.shape[0]
    grid = Image.new("RGB", (cell * len(columns), label_height + cell * n_rows), "white")
    draw = ImageDraw.Draw(grid)
    for col, (title, tiles) in enumerate(columns):
        draw.text((col * cell + 4, 4), title, fill="black")
        for row, tile in enumerate(tiles):
            grid.paste(tile, (col * cell, label_height + row * cell))
    return grid
