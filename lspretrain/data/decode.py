"""Image bytes -> RGB ``PIL.Image``, with the fastest decoder available.

simplejpeg (libjpeg-turbo) decodes baseline/progressive RGB and grayscale JPEGs faster than PIL;
everything else (PNG, CMYK JPEG, 16-bit, palette, ...) goes through PIL and is normalised to
8-bit RGB here, so transforms only ever see one image type.
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image

try:
    import simplejpeg
except ImportError:  # optional: PIL decodes everything, only slower
    simplejpeg = None

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "ppm", "pgm", "img", "image")
_JPEG_MAGIC = b"\xff\xd8"


class DecodeError(ValueError):
    pass


def _pil_to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit grey: convert("RGB") would clip at 255; rescale the real range instead.
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") else max(float(arr.max()), 1.0)
        arr = np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if img.mode == "P" or img.mode in ("LA", "PA", "RGBA"):
        # Palette images may carry transparency; go through RGBA so it is not garbled.
        return img.convert("RGBA").convert("RGB")
    return img.convert("RGB")  # L, 1, CMYK, YCbCr, F...


def decode_image(data: bytes, decoder: str = "auto") -> Image.Image:
    """Decode to an 8-bit RGB image; raise :class:`DecodeError` naming what went wrong."""
    if not data:
        raise DecodeError("empty image payload")
    if decoder != "pil" and simplejpeg is not None and data[:2] == _JPEG_MAGIC:
        try:
            # colorspace RGB also expands grayscale JPEGs; CMYK ones raise and fall back to PIL.
            return Image.fromarray(simplejpeg.decode_jpeg(data, colorspace="RGB", fastdct=True, fastupsample=True))
        except Exception:
            pass
    try:
        img = Image.open(io.BytesIO(data))
        img.load()  # force the full decode now: truncated files fail here, not in a transform
        return _pil_to_rgb(img)
    except Exception as e:
        raise DecodeError(f"{type(e).__name__}: {e}") from e


def find_image(sample: dict) -> bytes | None:
    for ext in IMAGE_EXTS:
        if ext in sample:
            return sample[ext]
    return None
