"""Batched photometric augmentations on float images in [0, 1], shape (N, 3, H, W).

Per-image random parameters; brightness/contrast/saturation as torchvision, hue as a YIQ
rotation, grayscale ITU-R 601, solarize at 128/255; the colour ops are fused into one affine
map per image (see ``color_transform``). Gaussian filtering comes from kornia. They run
wherever the tensor lives: in DataLoader workers inside the collate functions, or on the
training device when the collate is built with ``photometric=None`` (uint8 batches; the
method then applies the transform's ``photometric`` after the batch reached its device: the
default on CUDA, see the ``photometric`` key of the DINOv2 and classification configs).

On an accelerator nothing here reads the device from the host or copies from host memory
inside a step: random draws come from the device's generator, per-image choices are selected
with ``torch.where`` over the whole batch (fixed shapes, no index lists), and constants are
made once per device. On the CPU the random subsets are computed on the chosen images only
(cheaper there), from the CPU generator.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from kornia.filters import gaussian_blur2d

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_GRAY = (0.299, 0.587, 0.114)
# RGB -> YIQ: a hue shift is a rotation of the (I, Q) chroma plane, i.e. a linear map of RGB.
_YIQ = ((0.299, 0.587, 0.114), (0.596, -0.274, -0.322), (0.211, -0.523, 0.312))


@functools.lru_cache(maxsize=None)
def _constants(device: torch.device) -> dict[str, torch.Tensor]:
    """Gray weights, YIQ and its inverse, ImageNet mean/std, on ``device`` (one host copy per
    device and process: a copy from host memory waits for the device's queue)."""
    yiq = torch.tensor(_YIQ)
    consts = {"gray": torch.tensor(_GRAY), "yiq": yiq, "yiq_inv": torch.linalg.inv(yiq),
              "mean": torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), "std": torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)}
    return {k: v.to(device) for k, v in consts.items()}


def grayscale(x: torch.Tensor) -> torch.Tensor:
    w = _constants(x.device)["gray"].to(x.dtype).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)


def _uniform(n: int, lo: float, hi: float, device: torch.device) -> torch.Tensor:
    return torch.empty(n, device=device).uniform_(lo, hi)


def _hue_matrices(theta: torch.Tensor) -> torch.Tensor:
    c, s = torch.cos(theta), torch.sin(theta)
    one, zero = torch.ones_like(theta), torch.zeros_like(theta)
    rot = torch.stack([one, zero, zero, zero, c, -s, zero, s, c], dim=-1).view(-1, 3, 3)
    k = _constants(theta.device)
    return k["yiq_inv"] @ rot @ k["yiq"]


def color_transform(x: torch.Tensor, jitter: tuple[float, float, float, float], jitter_p: float,
                    gray_p: float) -> torch.Tensor:
    """Colour jitter (p ``jitter_p``, random op order per image) then grayscale (p ``gray_p``).

    All five are affine maps of the RGB vector, so each image gets ONE 3x3 matrix + offset,
    applied in a single batched pass: several times faster on CPU than op-by-op float passes.
    The maps are composed for the whole batch at once (each op's matrix is drawn for every
    image and kept where that image applies it at that position), so the work is a fixed
    sequence of small batched ops wherever the batch lives.
    Deliberate differences from torchvision: no clamping between the jitter ops (only at the
    end), and hue rotates the YIQ chroma plane instead of shifting HSV hue.
    """
    n, dev = x.shape[0], x.device
    gray = _constants(dev)["gray"]
    eye = torch.eye(3, device=dev).expand(n, 3, 3)
    mat, off = eye.clone(), torch.zeros(n, 3, device=dev)
    mean = x.float().mean((2, 3))  # mean colour: the contrast op blends towards its grey level
    on = torch.rand(n, device=dev) < jitter_p
    order = torch.argsort(torch.rand(n, 4, device=dev), dim=1)  # a random op order per image
    for k in range(4):
        for op, strength in enumerate(jitter):
            if not strength:
                continue
            sel = on & (order[:, k] == op)
            if op < 3:
                f = _uniform(n, max(0.0, 1 - strength), 1 + strength, dev)
            else:
                f = _uniform(n, -strength, strength, dev) * (2 * math.pi)
            if op == 0:  # brightness: scale
                a, b = f.view(n, 1, 1) * eye, torch.zeros(n, 3, device=dev)
            elif op == 1:  # contrast: blend with the current mean grey level
                level = ((mat @ mean.unsqueeze(-1)).squeeze(-1) + off) @ gray
                a, b = f.view(n, 1, 1) * eye, ((1 - f) * level).unsqueeze(-1).expand(n, 3)
            elif op == 2:  # saturation: blend with the pixel's grey value
                a = f.view(n, 1, 1) * eye + (1 - f).view(n, 1, 1) * gray.expand(n, 3, 3)
                b = torch.zeros(n, 3, device=dev)
            else:  # hue
                a, b = _hue_matrices(f), torch.zeros(n, 3, device=dev)
            mat = torch.where(sel.view(n, 1, 1), a @ mat, mat)
            off = torch.where(sel.view(n, 1), (a @ off.unsqueeze(-1)).squeeze(-1) + b, off)
    g = torch.rand(n, device=dev) < gray_p
    mat = torch.where(g.view(n, 1, 1), gray.expand(n, 3, 3) @ mat, mat)
    off = torch.where(g.view(n, 1), (off @ gray).unsqueeze(-1).expand(n, 3), off)
    y = torch.einsum("nij,njhw->nihw", mat.to(x.dtype), x) + off.to(x.dtype).view(n, 3, 1, 1)
    return y.clamp_(0, 1)


def gaussian_blur(x: torch.Tensor, kernel: int, sigma: tuple[float, float]) -> torch.Tensor:
    # sigma drawn on the host: kornia checks it there and moves it without waiting for the device
    s = torch.empty(x.shape[0], 1).uniform_(*sigma).expand(-1, 2)
    k = min(kernel, 2 * (min(x.shape[-2:]) // 2) - 1)  # reflect padding needs kernel < size
    return gaussian_blur2d(x, (k, k), s, border_type="reflect")


def solarize(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x >= 128 / 255, 1 - x, x)


def _apply(x: torch.Tensor, p: float, fn) -> torch.Tensor:
    """``fn`` on a random subset (probability ``p`` per image): on the CPU computed on the
    chosen images only, in place in ``x``; elsewhere on every image, the chosen ones kept."""
    if p <= 0:
        return x
    if p >= 1:
        return fn(x)
    chosen = torch.rand(x.shape[0], device=x.device) < p
    if x.device.type != "cpu":
        return torch.where(chosen.view(-1, 1, 1, 1), fn(x), x)
    idx = torch.nonzero(chosen).flatten()
    if len(idx):
        x[idx] = fn(x[idx])
    return x


def to_float(x: torch.Tensor) -> torch.Tensor:
    return x.float().div_(255) if x.dtype == torch.uint8 else x


def normalize(x: torch.Tensor) -> torch.Tensor:
    """ImageNet mean/std normalisation."""
    k = _constants(x.device)
    return (x - k["mean"].to(x.dtype)) / k["std"].to(x.dtype)


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
        ops = (lambda v: grayscale(v).expand(-1, 3, -1, -1), solarize,
               lambda v: gaussian_blur(v, self.blur_kernel, self.blur_sigma))
        if x.device.type == "cpu":
            choice = torch.randint(0, 3, (x.shape[0],))
            for c, op in enumerate(ops):
                idx = torch.nonzero(choice == c).flatten()
                if len(idx):
                    x[idx] = op(x[idx])
        else:  # every op on the whole batch, each image keeping its own choice: no host read
            choice = torch.randint(0, 3, (x.shape[0], 1, 1, 1), device=x.device)
            x = torch.where(choice == 0, ops[0](x), torch.where(choice == 1, ops[1](x), ops[2](x)))
        x = color_transform(x, (self.jitter, self.jitter, self.jitter, 0.0), 1.0, 0.0)
        return normalize(x)


def photometric_on_device(where: str, run_device: str) -> bool:
    """Whether a method's batched photometrics run on the training device (``where`` is the
    method's ``photometric`` key: "device", "loader", or "auto" = device when training on CUDA,
    where a step waits for CPU workers long before it waits for these few batched ops)."""
    if where not in ("auto", "loader", "device"):
        raise ValueError(f"photometric={where!r}: expected 'auto', 'loader' or 'device'")
    if where == "auto":
        return run_device == "cuda" or (run_device == "auto" and torch.cuda.is_available())
    return where == "device"
