"""Linear semantic segmentation on frozen patch tokens: DINOv2's linear probe protocol.

The backbone is frozen; a BatchNorm + 1x1 convolution head is trained with AdamW (linear
decay, DINOv2's "poly" schedule) on the patch tokens of the last block (``layers=1``, DINOv2
"linear") or of the last four concatenated (``layers=4``, "linear4"), each optionally with its
CLS token broadcast to every patch (``use_cls``). Logits are upsampled bilinearly to the mask
size; the loss and the metrics skip the ignore label.

Resolution: images are resized so their shorter side is ``resize`` (default: the window),
then cut into ``img_size`` x ``img_size`` windows. The probe trains on windows that tile the
image (the last one flush with the border) and evaluates with a sliding window (stride
``stride``, overlapping logits averaged), upsampled to the original mask: DINOv2's ADE20K
protocol is ``img_size=resize=512, stride=341``. ``img_size`` defaults to the resolution the
backbone was built for (``cfg.img_size``), its training resolution.

Data: segmentation shards (``KEY.jpg|png`` + ``KEY.seg.png``, written by
``tools/make_shards.py segmentation``), class names from their index. Frozen features are
computed once per evaluation and held in memory up to ``cache_gib``, computed again at each
epoch above it; decoded images likewise.

Metrics (percent, like k-NN accuracy): ``miou`` (mean over the classes present in the ground
truth or the predictions, mmseg's convention), ``pixel_acc``, and ``iou/<class name>`` per
class present.
"""
from __future__ import annotations

import logging
import re
import time
from collections import Counter
from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ..data.errors import DataError
from ..data.shard_writer import IGNORE_INDEX
from ..progress import Progress

log = logging.getLogger(__name__)

__all__ = [
    "DenseEvalConfig", "DenseProbe", "evaluate_dense", "dense_features", "window_starts", "LinearSegHead",
    "confusion_matrix", "segmentation_metrics", "SegmentationShards",
]


@dataclass
class DenseEvalConfig:
    """The dense linear probe (``eval.dense``). Off while neither ``shards`` nor ``index`` is set.

    ``shards``/``index``: the probe's training split; ``val_shards``/``val_index``: the split
    it is scored on (both segmentation shards)."""

    shards: str = ""
    index: Optional[str] = None
    val_shards: str = ""
    val_index: Optional[str] = None
    num_classes: int = 0  # 0: as many as the index names
    ignore_index: int = IGNORE_INDEX  # mask value that is neither trained on nor scored
    layers: int = 1  # 1: last block's patch tokens; 4: the last four concatenated
    use_cls: bool = False  # concatenate each layer's CLS token to every patch token
    img_size: int = 0  # window side (px); 0: the backbone's cfg.img_size
    resize: int = 0  # shorter image side before windowing; 0: img_size
    stride: int = 0  # evaluation window stride; 0: 2/3 of img_size
    # 30 epochs: DINOv2's budget in crops seen (40k iterations x 16 crops on ADE20K's 20k images).
    # lr 3e-2, not DINOv2's 1e-3: on the tiny mosaic probe (~1000 steps) 1e-3 and 1e-2 stop far
    # short (mIoU 11.9, 13.1), 3e-2 reaches 18.0, as far as 100 epochs get (18.7); see docs/EVAL.md.
    epochs: int = 30
    batch_size: int = 64  # windows per batch (features and head)
    lr: float = 3e-2
    weight_decay: float = 1e-4
    max_samples: int = 1000  # training images
    max_val_samples: int = 500  # evaluation images
    cache_gib: float = 2.0  # decoded images and frozen features held in memory up to this, each
    seed: int = 0

    @property
    def enabled(self) -> bool:
        return bool(self.shards or self.index)

    def check(self) -> None:
        """Refuse settings that cannot work, naming the key and the value."""
        if not (self.val_shards or self.val_index):
            raise ValueError("dense evaluation needs val_shards or val_index (the split the probe is scored on)")
        if self.layers not in (1, 4):
            raise ValueError(f"dense layers={self.layers}: expected 1 (last block) or 4 (last four)")
        for key in ("epochs", "batch_size", "max_samples", "max_val_samples"):
            if getattr(self, key) < 1:
                raise ValueError(f"dense {key}={getattr(self, key)}: must be positive")
        for key in ("img_size", "resize", "stride", "num_classes"):
            if getattr(self, key) < 0:
                raise ValueError(f"dense {key}={getattr(self, key)}: must be >= 0 (0: the default)")


# ------------------------------------------------------------------------------ data
def _classes(shards: str, index: Optional[str]) -> list[str]:
    """The class names the index of a split lists (empty when it names none)."""
    from ..data.shards import resolve_shards

    return resolve_shards(shards, index)[1]


@dataclass(frozen=True)
class SegmentationShards:
    """Re-iterable ``(key, RGB image, (h, w) uint8 mask)`` of the first ``max_samples`` samples,
    in shard order. A sample without a readable image or mask, whose mask differs in size, or
    whose mask holds a value that is neither a class below ``num_classes`` nor ``ignore_index``,
    is skipped, counted and named in a warning."""

    shards: str
    index: Optional[str]
    max_samples: int
    num_classes: int
    ignore_index: int = IGNORE_INDEX

    def __iter__(self) -> Iterator[tuple[str, Image.Image, np.ndarray]]:
        import io

        from ..data.decode import DecodeError, decode_image, find_image
        from ..data.tario import iter_tar_samples

        from ..data.shards import resolve_shards

        shards = resolve_shards(self.shards, self.index)[0]
        seen, bad = 0, Counter()
        for shard in shards:
            for raw in iter_tar_samples(shard.url):
                key = f"{shard.url}:{raw['__key__']}"
                data, mask_bytes = find_image(raw), raw.get("seg.png")
                try:
                    if data is None or mask_bytes is None:
                        raise ValueError(f"no {'image' if data is None else 'seg.png mask'} "
                                         f"(members: {sorted(k for k in raw if not k.startswith('__'))})")
                    image = decode_image(data)
                    with Image.open(io.BytesIO(mask_bytes)) as m:
                        mask = np.asarray(m)
                    if mask.ndim != 2 or mask.shape != (image.size[1], image.size[0]):
                        raise ValueError(f"mask of shape {mask.shape} for a {image.size[0]}x{image.size[1]} image")
                    stray = mask[(mask >= self.num_classes) & (mask != self.ignore_index)]
                    if stray.size:
                        raise ValueError(f"mask holds label {int(stray.max())}, neither one of the {self.num_classes} "
                                         f"classes nor ignore_index {self.ignore_index}")
                except (DecodeError, ValueError, OSError) as e:
                    bad[type(e).__name__] += 1
                    log.warning("dense evaluation: skipped %s: %s", key, e)
                    continue
                yield key, image, mask
                seen += 1
                if seen >= self.max_samples:
                    return
        if bad:
            log.warning("dense evaluation: %d bad samples skipped in %s (%s)", sum(bad.values()),
                        self.index or self.shards, dict(bad))
        if not seen:
            raise DataError(f"{self.index or self.shards}: no usable segmentation sample (image + seg.png mask)")


def _images(source: SegmentationShards, cache_bytes: float) -> list | SegmentationShards:
    """The decoded samples, held in a list when they fit in ``cache_bytes``, else the source
    itself (decoded again at each pass)."""
    held, total = [], 0
    for sample in source:
        total += sample[1].size[0] * sample[1].size[1] * 4  # RGB + mask bytes per pixel
        if total > cache_bytes:
            log.info("dense evaluation: decoded images of %s exceed cache_gib, decoded again at each pass",
                     source.index or source.shards)
            return source
        held.append(sample)
    return held


def window_starts(length: int, window: int, stride: int) -> list[int]:
    """Starts of windows of ``window`` covering ``[0, length)`` every ``stride``, the last one
    flush with the end (mmseg's sliding window); one window at 0 when ``length <= window``."""
    if length <= window:
        return [0]
    n = -(-(length - window) // stride) + 1
    return [min(i * stride, length - window) for i in range(n)]


def _prepare(image: Image.Image, mask: np.ndarray, resize: int, window: int, ignore_index: int,
             train: bool) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
    """Normalised image (3, H', W') with its shorter side ``resize``, padded to at least
    ``window`` on each side; its mask (training: resized nearest and padded with the ignore
    label; evaluation: the original); and the unpadded (H, W)."""
    from ..data.geometric import resize_shorter, to_uint8_tensor
    from ..data.photometric import normalize, to_float

    resized = resize_shorter(image, resize)
    w, h = resized.size
    x = normalize(to_float(to_uint8_tensor(resized)[None]))[0]
    pad_h, pad_w = max(window - h, 0), max(window - w, 0)
    x = F.pad(x, (0, pad_w, 0, pad_h))  # zeros: the mean colour after normalisation
    if train:
        m = np.asarray(Image.fromarray(mask).resize((w, h), Image.NEAREST))
        y = F.pad(torch.from_numpy(m.astype(np.int64)), (0, pad_w, 0, pad_h), value=ignore_index)
    else:
        y = torch.from_numpy(mask.astype(np.int64))
    return x, y, (h, w)


# ------------------------------------------------------------------------------ model side
@torch.no_grad()
def dense_features(backbone: nn.Module, images: torch.Tensor, layers: int = 1, use_cls: bool = False) -> torch.Tensor:
    """Frozen features (B, D, h, w) of a patch grid: the normalised patch tokens of the last
    ``layers`` blocks, each followed by its CLS token broadcast over the grid when ``use_cls``
    (DINOv2's linear heads); D = embed_dim x layers x (2 if use_cls else 1)."""
    outs = backbone.get_intermediate_layers(images, n=layers, reshape=True, return_class_token=True, norm=True)
    parts = []
    for patches, cls in outs:
        parts.append(patches.float())
        if use_cls:
            parts.append(cls.float()[:, :, None, None].expand_as(patches))
    return torch.cat(parts, dim=1)


class LinearSegHead(nn.Module):
    """DINOv2's ``BNHead``: BatchNorm over the concatenated features, then a 1x1 convolution to
    class logits (weights N(0, 0.01), bias 0, as mmseg initialises ``conv_seg``)."""

    def __init__(self, in_dim: int, num_classes: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(in_dim)
        self.conv = nn.Conv2d(in_dim, num_classes, kernel_size=1)
        nn.init.normal_(self.conv.weight, std=0.01)
        nn.init.zeros_(self.conv.bias)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.conv(self.bn(feats))


# ------------------------------------------------------------------------------ metrics
def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """(K, K) int64 pixel counts, rows = ground truth, columns = prediction; pixels whose
    target is ``ignore_index`` are not counted. Any other target outside [0, K) is an error."""
    valid = target != ignore_index
    t, p = target[valid].long(), pred[valid].long()
    if t.numel() and (t.min() < 0 or t.max() >= num_classes):
        raise ValueError(f"target label {int(t.max() if t.max() >= num_classes else t.min())} outside the "
                         f"{num_classes} classes (ignore_index {ignore_index})")
    return torch.bincount(t * num_classes + p, minlength=num_classes**2).reshape(num_classes, num_classes)


def _key(name: str) -> str:
    """A class name as a metric tag component: '/' and spaces would split or break tags."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "class"


def segmentation_metrics(conf: torch.Tensor, class_names: list[str] | None = None) -> dict[str, float]:
    """``miou``, ``pixel_acc`` and ``iou/<name>`` (percent) from a confusion matrix. IoU_c =
    TP / (TP + FP + FN); classes absent from both the ground truth and the predictions have
    no IoU: they are left out of the mean and of the per-class keys."""
    conf = conf.double()
    tp = conf.diag()
    union = conf.sum(0) + conf.sum(1) - tp
    present = union > 0
    iou = tp / union.clamp(min=1)
    total = conf.sum()
    names = class_names or [str(c) for c in range(conf.shape[0])]
    out = {
        "miou": 100.0 * iou[present].mean().item() if present.any() else 0.0,
        "pixel_acc": 100.0 * (tp.sum() / total).item() if total > 0 else 0.0,
    }
    out.update({f"iou/{_key(names[c])}": 100.0 * iou[c].item() for c in range(len(names)) if present[c]})
    return out


# ------------------------------------------------------------------------------ the probe
class DenseProbe:
    """The probe's data, prepared once; ``evaluate(backbone)`` trains a fresh head on the frozen
    backbone and scores it. Keep one across periodic evaluations to decode the shards once."""

    def __init__(self, cfg: DenseEvalConfig):
        cfg.check()
        self.cfg = cfg
        classes, val_classes = _classes(cfg.shards, cfg.index), _classes(cfg.val_shards, cfg.val_index)
        if classes and val_classes and classes != val_classes:
            raise ValueError(f"dense evaluation: the training index names {len(classes)} classes and the validation "
                             f"index {len(val_classes)}, or in another order: {classes[:5]}... vs {val_classes[:5]}...")
        classes = classes or val_classes
        if cfg.num_classes and classes and cfg.num_classes != len(classes):
            raise ValueError(f"dense num_classes={cfg.num_classes} but the index of {cfg.index or cfg.shards} "
                             f"names {len(classes)} classes")
        if not (cfg.num_classes or classes):
            raise ValueError(f"dense evaluation: {cfg.index or cfg.shards} names no classes; set num_classes")
        self.num_classes = cfg.num_classes or len(classes)
        self.class_names = classes or [str(c) for c in range(self.num_classes)]
        budget = cfg.cache_gib * 2**30
        self.train_images = _images(SegmentationShards(cfg.shards, cfg.index, cfg.max_samples, self.num_classes,
                                                       cfg.ignore_index), budget)
        self.val_images = _images(SegmentationShards(cfg.val_shards, cfg.val_index, cfg.max_val_samples,
                                                     self.num_classes, cfg.ignore_index), budget)

    # -- geometry
    def _geometry(self, backbone: nn.Module) -> tuple[int, int, int]:
        """(window, resize, stride) in pixels for this backbone."""
        p, depth = backbone.cfg.patch_size, len(backbone.blocks)
        if self.cfg.layers > depth:
            raise ValueError(f"dense layers={self.cfg.layers}: the backbone has only {depth} blocks")
        window = self.cfg.img_size or backbone.cfg.img_size
        if window % p:
            raise ValueError(f"dense img_size={window} is not a multiple of the patch size {p}")
        return window, self.cfg.resize or window, self.cfg.stride or max(1, window * 2 // 3)

    def _train_windows(self, window: int, resize: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(image window, mask window) tiling each training image."""
        for _, image, mask in self.train_images:
            x, y, _ = _prepare(image, mask, resize, window, self.cfg.ignore_index, train=True)
            hh, ww = x.shape[1:]
            for top in window_starts(hh, window, window):
                for left in window_starts(ww, window, window):
                    yield x[:, top:top + window, left:left + window], y[top:top + window, left:left + window]

    def _train_features(self, backbone: nn.Module, device, window: int, resize: int
                        ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches of (frozen features on the CPU, mask windows)."""
        batch: list = []
        for pair in self._train_windows(window, resize):
            batch.append(pair)
            if len(batch) == self.cfg.batch_size:
                yield self._featurize(backbone, batch, device)
                batch = []
        if batch:
            yield self._featurize(backbone, batch, device)

    def _featurize(self, backbone: nn.Module, batch: list, device) -> tuple[torch.Tensor, torch.Tensor]:
        images = torch.stack([b[0] for b in batch]).to(device)
        return dense_features(backbone, images, self.cfg.layers, self.cfg.use_cls).cpu(), torch.stack([b[1] for b in batch])

    def _feature_bytes(self, backbone: nn.Module, window: int, resize: int) -> tuple[int, int]:
        """(training windows, bytes of their float32 features), from the image sizes alone."""
        n = 0
        for _, image, _ in self.train_images:
            w, h = image.size
            s = resize / min(w, h)
            # The padded size of resize_shorter's output: max(resize, round(side * s)), at least a window.
            n += len(window_starts(max(resize, round(h * s), window), window, window)) * \
                len(window_starts(max(resize, round(w * s), window), window, window))
        c = self.cfg
        dim = backbone.cfg.embed_dim * c.layers * (2 if c.use_cls else 1)
        grid = window // backbone.cfg.patch_size
        return n, n * dim * grid * grid * 4

    def evaluate(self, backbone: nn.Module, device: torch.device | str = "cpu") -> dict[str, float]:
        """Train a fresh head on the frozen ``backbone`` and score it: ``miou``, ``pixel_acc``,
        ``iou/<class>`` (percent). Deterministic for a given backbone and ``cfg.seed``; the
        global RNGs are left as they were (training runs call this between steps)."""
        c = self.cfg
        was_training = backbone.training
        backbone.eval()
        try:
            window, resize, stride = self._geometry(backbone)
            n_windows, nbytes = self._feature_bytes(backbone, window, resize)
            dim = backbone.cfg.embed_dim * c.layers * (2 if c.use_cls else 1)
            start = time.perf_counter()
            if nbytes <= c.cache_gib * 2**30:
                progress, xs, ys = Progress("dense features", n_windows, logger=log, unit="windows"), [], []
                for x, y in self._train_features(backbone, device, window, resize):
                    xs.append(x)
                    ys.append(y)
                    progress.update(len(y))
                feats = (torch.cat(xs), torch.cat(ys))
                del xs, ys
                log.info("dense features of %d training windows (%d x %d px, dim %d) in %.1f s", n_windows,
                         window, window, dim, time.perf_counter() - start)
            else:
                log.info("dense features of %d windows (%.1f GiB) exceed cache_gib: computed again each epoch",
                         n_windows, nbytes / 2**30)
                feats = None
            head = self._train_head(backbone, feats, dim, device, window, resize, n_windows)
            conf = self._score(backbone, head, device, window, resize, stride)
        finally:
            backbone.train(was_training)
        metrics = segmentation_metrics(conf, self.class_names)
        log.info("dense probe: mIoU %.2f %%, pixel accuracy %.2f %% (%.0f s)", metrics["miou"], metrics["pixel_acc"],
                 time.perf_counter() - start)
        return metrics

    def _train_head(self, backbone, feats: tuple[torch.Tensor, torch.Tensor] | None, dim: int, device, window: int, resize: int,
                    n_windows: int) -> LinearSegHead:
        c = self.cfg
        with torch.random.fork_rng(devices=[]):  # the head's init must not move the trainer's RNG
            torch.manual_seed(c.seed)
            head = LinearSegHead(dim, self.num_classes)
        head = head.to(device).train()
        opt = torch.optim.AdamW(head.parameters(), lr=c.lr, weight_decay=c.weight_decay)
        total = c.epochs * -(-n_windows // c.batch_size)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: max(0.0, 1.0 - i / total))  # DINOv2: poly, power 1
        g = torch.Generator().manual_seed(c.seed)
        progress = Progress("dense head training", total, logger=log, unit="steps")
        for _ in range(c.epochs):
            if feats is not None:
                # Shuffle windows across the cached batches each epoch (BatchNorm sees mixed batches).
                x_all, y_all = feats
                order = torch.randperm(len(x_all), generator=g)
                batches = ((x_all[order[i:i + c.batch_size]], y_all[order[i:i + c.batch_size]])
                           for i in range(0, len(order), c.batch_size))
            else:
                batches = self._train_features(backbone, device, window, resize)
            for x, y in batches:
                logits = head(x.to(device))
                logits = F.interpolate(logits, size=y.shape[-2:], mode="bilinear", align_corners=False)
                loss = F.cross_entropy(logits, y.to(device), ignore_index=c.ignore_index)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                progress.update()
        return head.eval()

    @torch.no_grad()
    def _score(self, backbone, head: LinearSegHead, device, window: int, resize: int, stride: int) -> torch.Tensor:
        """Confusion matrix over the evaluation images: sliding-window logits, averaged where
        windows overlap, upsampled to the original mask."""
        c, k = self.cfg, self.num_classes
        conf = torch.zeros(k, k, dtype=torch.int64)
        pending: dict[int, list] = {}  # image -> [logit sum, window count, mask, (h, w), windows left]
        batch: list[tuple[int, int, int, torch.Tensor]] = []
        total = len(self.val_images) if isinstance(self.val_images, list) else c.max_val_samples
        progress = Progress("dense evaluation", total, logger=log, unit="images")

        def flush() -> None:
            nonlocal conf
            feats = dense_features(backbone, torch.stack([b[3] for b in batch]).to(device), c.layers, c.use_cls)
            logits = F.interpolate(head(feats), size=(window, window), mode="bilinear", align_corners=False).float().cpu()
            for (i, top, left, _), lg in zip(batch, logits):
                acc = pending[i]
                acc[0][:, top:top + window, left:left + window] += lg
                acc[1][top:top + window, left:left + window] += 1
                acc[4] -= 1
                if acc[4] == 0:
                    summed, count, mask, (h, w), _ = pending.pop(i)
                    mean = (summed / count)[None, :, :h, :w]
                    pred = F.interpolate(mean, size=mask.shape, mode="bilinear", align_corners=False)[0].argmax(0)
                    conf += confusion_matrix(pred, mask, k, c.ignore_index)
                    progress.update()
            batch.clear()

        for i, (_, image, mask) in enumerate(self.val_images):
            x, y, hw = _prepare(image, mask, resize, window, c.ignore_index, train=False)
            hh, ww = x.shape[1:]
            tops, lefts = window_starts(hh, window, stride), window_starts(ww, window, stride)
            pending[i] = [torch.zeros(k, hh, ww), torch.zeros(hh, ww), y, hw, len(tops) * len(lefts)]
            for top in tops:
                for left in lefts:
                    batch.append((i, top, left, x[:, top:top + window, left:left + window]))
                    if len(batch) == c.batch_size:
                        flush()
        if batch:
            flush()
        return conf


def evaluate_dense(backbone: nn.Module, cfg: DenseEvalConfig, device: torch.device | str = "cpu") -> dict[str, float]:
    """One dense linear probe of a frozen ``backbone``: ``{"miou", "pixel_acc", "iou/<class>"}``
    in percent. Periodic evaluations should keep a ``DenseProbe`` instead (data decoded once)."""
    return DenseProbe(cfg).evaluate(backbone, device)
