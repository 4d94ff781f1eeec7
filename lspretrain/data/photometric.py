"""Batched photometric augmentations on float images in [0, 1], shape (N, 3, H, W).

Per-image random parameters; brightness/contrast/saturation as torchvision, hue as a YIQ
rotation, grayscale ITU-R 601, solarize at 128/255; the colour ops are fused into one affine
map per image (see ``color_transform``). Gaussian filtering comes from kornia. They run
wherever the tensor lives: in DataLoader workers inside the collate functions (default), or on
the training device when a collate is built with ``photometric=None`` (the trainer then calls
the transform's ``photometric`` on the uint8 batch itself).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from kornia.filters import gaussian_blur2d

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_GRAY = (0.299, 0.587, 0.114)


def grayscale(x: torch.Tensor) -> torch.Tensor:
    w = x.new_tensor(_GRAY).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)


def _pick(n: int, p: float, device) -> torch.Tensor:
    return torch.nonzero(torch.rand(n) < p).flatten().to(device)


# RGB -> YIQ: a hue shift is a rotation of the (I, Q) chroma plane, i.e. a linear map of RGB.
_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])


def _hue_matrices(theta: torch.Tensor) -> torch.Tensor:
    c, s = torch.cos(theta), torch.sin(theta)
    rot = torch.zeros(len(theta), 3, 3)
    rot[:, 0, 0] = 1
    rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = c, -s, s, c
    return torch.linalg.inv(_YIQ) @ rot @ _YIQ


def color_transform(x: torch.Tensor, jitter: tuple[float, float, float, float], jitter_p: float,
                    gray_p: float) -> torch.Tensor:
    """Colour jitter (p ``jitter_p``, random op order per image) then grayscale (p ``gray_p``).

    All five are affine maps of the RGB vector, so each image gets ONE 3x3 matrix + offset,
    applied in a single batched pass: several times faster on CPU than op-by-op float passes.
    Deliberate differences from torchvision: no clamping between the jitter ops (only at the
    end), and hue rotates the YIQ chroma plane instead of shifting HSV hue.
    """
    n = x.shape[0]
    eye = torch.eye(3).expand(n, 3, 3)
    mat, off = eye.clone(), torch.zeros(n, 3)
    gray = torch.tensor(_GRAY)
    mean = x.mean((2, 3)).cpu()  # mean colour: the contrast op blends towards its grey level
    on = torch.rand(n) < jitter_p
    order = torch.argsort(torch.rand(n, 4), dim=1)  # a random op order per image
    for k in range(4):
        for op, strength in enumerate(jitter):
            sel = on & (order[:, k] == op)
            m = int(sel.sum())
            if not strength or not m:
                continue
            f = torch.empty(m).uniform_(max(0.0, 1 - strength), 1 + strength) if op < 3 else \
                torch.empty(m).uniform_(-strength, strength) * (2 * math.pi)
            if op == 0:  # brightness: scale
                a, b = f.view(m, 1, 1) * eye[:m], torch.zeros(m, 3)
            elif op == 1:  # contrast: blend with the current mean grey level
                level = ((mat[sel] @ mean[sel].unsqueeze(-1)).squeeze(-1) + off[sel]) @ gray
                a, b = f.view(m, 1, 1) * eye[:m], ((1 - f) * level).unsqueeze(-1).expand(m, 3)
            elif op == 2:  # saturation: blend with the pixel's grey value
                a = f.view(m, 1, 1) * eye[:m] + (1 - f).view(m, 1, 1) * gray.expand(m, 3, 3)
                b = torch.zeros(m, 3)
            else:  # hue
                a, b = _hue_matrices(f), torch.zeros(m, 3)
            mat[sel] = a @ mat[sel]
            off[sel] = (a @ off[sel].unsqueeze(-1)).squeeze(-1) + b
    g = torch.rand(n) < gray_p
    if g.any():
        mat[g] = gray.expand(int(g.sum()), 3, 3) @ mat[g]
        off[g] = (off[g] @ gray).unsqueeze(-1).expand(-1, 3)
    y = torch.einsum("nij,njhw->nihw", mat.to(x.device), x) + off.to(x.device).view(n, 3, 1, 1)
    return y.clamp_(0, 1)


def gaussian_blur(x: torch.Tensor, kernel: int, sigma: tuple[float, float]) -> torch.Tensor:
    s = torch.empty(x.shape[0], 1).uniform_(*sigma).to(x.device).expand(-1, 2)
    k = min(kernel, 2 * (min(x.shape[-2:]) // 2) - 1)  # reflect padding needs kernel < size
    return gaussian_blur2d(x, (k, k), s, border_type="reflect")


def solarize(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x >= 128 / 255, 1 - x, x)


def _apply(x: torch.Tensor, p: float, fn) -> torch.Tensor:
    """``fn`` on a random subset (probability ``p`` per image), in place in ``x``."""
    if p <= 0:
        return x
    idx = _pick(x.shape[0], p, x.device) if p < 1 else None
    if idx is None:
        return fn(x)
    if len(idx):
        x[idx] = fn(x[idx])
    return x


def to_float(x: torch.Tensor) -> torch.Tensor:
    return x.float().div_(255) if x.dtype == torch.uint8 else x


def normalize(x: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    return (x - x.new_tensor(mean).view(1, 3, 1, 1)) / x.new_tensor(std).view(1, 3, 1, 1)


@dataclass
class DINOv2Photometric:
    """One DINOv2 view family: jitter p 0.8, grayscale p 0.2, blur p ``blur_p``, solarize p ``solarize_p``."""

    blur_p: float
    solarize_p: float = 0.0
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)
    jitter_p: float = 0.8
    gray_p: float = 0.2
    blur_kernel: int = 9
    blur_sigma: tuple[float, float] = (0.1, 2.0)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 or [0, 1] float (N, 3, H, W) -> normalised float32."""
        x = color_transform(to_float(x), self.jitter, self.jitter_p, self.gray_p)
        x = _apply(x, self.blur_p, lambda v: gaussian_blur(v, self.blur_kernel, self.blur_sigma))
        x = _apply(x, self.solarize_p, solarize)
        return normalize(x)


@dataclass
class ThreeAugmentPhotometric:
    """DeiT-III: exactly one of grayscale / solarize / blur per image, then jitter (0.3, 0.3, 0.3)."""

    jitter: float = 0.3
    blur_kernel: int = 9
    blur_sigma: tuple[float, float] = (0.1, 2.0)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = to_float(x)
        choice = torch.randint(0, 3, (x.shape[0],)).to(x.device)
        ops = (lambda v: grayscale(v).expand(-1, 3, -1, -1), solarize,
               lambda v: gaussian_blur(v, self.blur_kernel, self.blur_sigma))
        for c, op in enumerate(ops):
            idx = torch.nonzero(choice == c).flatten()
            if len(idx):
                x[idx] = op(x[idx])
        x = color_transform(x, (self.jitter, self.jitter, self.jitter, 0.0), 1.0, 0.0)
        return normalize(x)
