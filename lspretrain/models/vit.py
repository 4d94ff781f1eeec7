"""The plain Vision Transformer family (DINOv2 / DeiT-III flavours).

One file, one family, timm-style constructors per size (``vit_large_patch14`` ...).
Parameter names follow timm's VisionTransformer (``patch_embed.proj``, ``blocks.N.attn.qkv``,
``blocks.N.ls1.gamma``, ``norm``) so that the key maps in ``lspretrain.convert`` stay short.

The model knows nothing about distribution, compilation or specialization: those are applied
from outside (``lspretrain.models.specialize``, ``lspretrain.engine.parallelize``).
"""
from __future__ import annotations

import math
import difflib
from dataclasses import asdict, dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ViTConfig", "VisionTransformer", "create_vit", "VIT_ARCHS", "Block", "LayerScale", "resample_pos_embed"]


@dataclass(frozen=True)
class ViTConfig:
    """Architecture of a plain ViT. Sizes come from the constructors in ``VIT_ARCHS``."""

    img_size: int = 224  # resolution the stored positional embedding grid is made for
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    ffn: Literal["mlp", "swiglu"] = "mlp"
    qkv_bias: bool = True
    layerscale_init: float | None = None  # None: no LayerScale (plain ViT)
    drop_path_rate: float = 0.0
    drop_path_uniform: bool = False  # DINOv2 uses one rate for every block; DeiT-III a linear ramp
    num_registers: int = 0
    pos_embed_cls: bool = True  # DINOv2/timm: the CLS slot has a position; DeiT-III: patches only
    mask_token: bool = False  # iBOT replaces masked patch embeddings by a learned token
    norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        if self.img_size % self.patch_size:
            raise ValueError(
                f"img_size={self.img_size} is not divisible by patch_size={self.patch_size}"
            )
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim={self.embed_dim} is not divisible by num_heads={self.num_heads}")
        if self.ffn not in ("mlp", "swiglu"):
            raise ValueError(f"ffn={self.ffn!r}: expected 'mlp' or 'swiglu'")

    @property
    def grid_size(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_prefix_tokens(self) -> int:
        return 1 + self.num_registers

    def to_dict(self) -> dict:
        return asdict(self)


def resample_pos_embed(pos: torch.Tensor, size: tuple[int, int], has_cls: bool) -> torch.Tensor:
    """A (1, [1+]g*g, C) positional embedding on an ``size`` patch grid (bicubic); unchanged,
    the very tensor, when the grid already has that size. The CLS slot is never resized."""
    cls_pos, patch_pos = (pos[:, :1], pos[:, 1:]) if has_cls else (None, pos)
    g = math.isqrt(patch_pos.shape[1])
    if (g, g) != tuple(size):
        grid = patch_pos.reshape(1, g, g, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid.float(), size=size, mode="bicubic", align_corners=False)
        patch_pos = grid.to(pos.dtype).permute(0, 2, 3, 1).reshape(1, size[0] * size[1], -1)
    return patch_pos if cls_pos is None else torch.cat([cls_pos, patch_pos], dim=1)


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        p = self.patch_size
        if h % p or w % p:
            raise ValueError(f"image size {h}x{w} is not divisible by the patch size {p}")
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, N, C)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        # One attention over every token: CLS attends to patches and patches to CLS, whatever
        # parameters produced each token's q, k and v.
        x = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class SwiGLU(nn.Module):
    """DINOv2's fused SwiGLU: one projection to 2*hidden (w12), gated, then w3."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        hidden = (int(hidden * 2 / 3) + 7) // 8 * 8  # dinov2's width rule: ViT-g gets 4096
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(x1) * x2)


class LayerScale(nn.Module):
    def __init__(self, dim: int, init: float):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class DropPath(nn.Module):
    """Stochastic depth: drop the residual branch for a random subset of samples."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


class Block(nn.Module):
    """Pre-norm transformer block. ``norm1``, ``attn.qkv``, ``ls1``, ``norm2``, ``ls2`` are the
    seams that specialization replaces; the block's forward never needs to know."""

    def __init__(self, cfg: ViTConfig, drop_path: float):
        super().__init__()
        dim = cfg.embed_dim
        self.norm1 = nn.LayerNorm(dim, eps=cfg.norm_eps)
        self.attn = Attention(dim, cfg.num_heads, cfg.qkv_bias)
        self.ls1 = LayerScale(dim, cfg.layerscale_init) if cfg.layerscale_init is not None else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=cfg.norm_eps)
        ffn = SwiGLU if cfg.ffn == "swiglu" else Mlp
        self.mlp = ffn(dim, int(dim * cfg.mlp_ratio))
        self.ls2 = LayerScale(dim, cfg.layerscale_init) if cfg.layerscale_init is not None else nn.Identity()
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.ls1(self.attn(self.norm1(x))))
        return x + self.drop_path(self.ls2(self.mlp(self.norm2(x))))


class VisionTransformer(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        dim = cfg.embed_dim
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.in_chans, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.reg_token = nn.Parameter(torch.zeros(1, cfg.num_registers, dim)) if cfg.num_registers else None
        n_pos = cfg.grid_size**2 + (1 if cfg.pos_embed_cls else 0)
        self.pos_embed = nn.Parameter(torch.zeros(1, n_pos, dim))
        self.mask_token = nn.Parameter(torch.zeros(1, dim)) if cfg.mask_token else None
        if cfg.drop_path_uniform:
            rates = [cfg.drop_path_rate] * cfg.depth
        else:
            rates = [cfg.drop_path_rate * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
        self.blocks = nn.ModuleList(Block(cfg, r) for r in rates)
        self.norm = nn.LayerNorm(dim, eps=cfg.norm_eps)
        self.init_weights()

    # -- construction -------------------------------------------------------------------
    def init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.reg_token is not None:
            nn.init.normal_(self.reg_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        w = self.patch_embed.proj.weight
        nn.init.uniform_(w, -1 / math.sqrt(w[0].numel()), 1 / math.sqrt(w[0].numel()))

    @property
    def embed_dim(self) -> int:
        return self.cfg.embed_dim

    @property
    def num_prefix_tokens(self) -> int:
        return self.cfg.num_prefix_tokens

    # -- embedding ----------------------------------------------------------------------
    def interpolate_pos_embed(self, h: int, w: int) -> torch.Tensor:
        """Positional embedding of the patch grid for an (h, w)-patch input; bicubic when the
        grid differs from the stored one, the stored tensor itself when it does not."""
        return resample_pos_embed(self.pos_embed, (h, w), self.cfg.pos_embed_cls)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Also loads a checkpoint made at another resolution: its positional embedding is
        resampled (bicubic) to this model's grid, e.g. DeiT-III's 192 px pretraining into the
        224 px fine-tune."""
        pos = state_dict.get("pos_embed")
        if pos is not None and pos.shape != self.pos_embed.shape:
            n_patches = pos.shape[1] - (1 if self.cfg.pos_embed_cls else 0)
            side = math.isqrt(n_patches)
            if side * side != n_patches:
                raise ValueError(f"pos_embed of shape {tuple(pos.shape)} is not a square grid (pos_embed_cls={self.cfg.pos_embed_cls})")
            g = self.cfg.grid_size
            state_dict = {**state_dict, "pos_embed": resample_pos_embed(pos, (g, g), self.cfg.pos_embed_cls)}
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def prepare_tokens(self, x: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
        """Image -> token sequence ``[CLS, registers..., patches...]``.

        ``masks`` (B, N) bool replaces those patch embeddings by the mask token (iBOT)."""
        b, _, h, w = x.shape
        x = self.patch_embed(x)
        if masks is not None:
            if self.mask_token is None:
                raise ValueError("masks given but the model was built with mask_token=False")
            x = torch.where(masks.unsqueeze(-1), self.mask_token.to(x.dtype), x)
        p = self.cfg.patch_size
        pos = self.interpolate_pos_embed(h // p, w // p)
        cls = self.cls_token.expand(b, -1, -1)
        if self.cfg.pos_embed_cls:
            x = torch.cat([cls, x], dim=1) + pos
        else:
            x = torch.cat([cls, x + pos], dim=1)
        if self.reg_token is not None:
            # Registers go after CLS and after the positional embedding (they have no position).
            x = torch.cat([x[:, :1], self.reg_token.expand(b, -1, -1), x[:, 1:]], dim=1)
        return x

    # -- forward ------------------------------------------------------------------------
    def split_tokens(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        r = self.cfg.num_registers
        return {
            "cls": x[:, 0],
            "registers": x[:, 1 : 1 + r],
            "patches": x[:, 1 + r :],
        }

    def forward_features(self, x: torch.Tensor, masks: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Normalized CLS (B, C), registers (B, R, C) and patch tokens (B, N, C), plus the
        un-normalized sequence (``prenorm``) for heads that normalize on their own."""
        x = self.prepare_tokens(x, masks)
        for blk in self.blocks:
            x = blk(x)
        out = {f"{k}_norm": v for k, v in self.split_tokens(self.norm(x)).items()}
        out["prenorm"] = x
        return out

    def forward(self, x: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
        """Inference forward: the normalized CLS token."""
        return self.forward_features(x, masks)["cls_norm"]

    def get_intermediate_layers(
        self,
        x: torch.Tensor,
        n: int | list[int] = 1,
        reshape: bool = False,
        return_class_token: bool = False,
        norm: bool = True,
    ) -> tuple:
        """Outputs of the last ``n`` blocks (or of the blocks whose indices are listed), for
        dense evaluation. Patch tokens (B, N, C) or (B, C, h, w) with ``reshape``."""
        depth = len(self.blocks)
        wanted = list(range(depth - n, depth)) if isinstance(n, int) else list(n)
        for i in wanted:
            if not -depth <= i < depth:
                raise ValueError(f"block index {i} out of range for depth {depth}")
        wanted = {i % depth for i in wanted}
        b, _, h, w = x.shape
        x = self.prepare_tokens(x)
        outputs = []
        for i, blk in enumerate(self.blocks):
            x = blk(x)
            if i in wanted:
                outputs.append(self.norm(x) if norm else x)
        results = []
        for o in outputs:
            parts = self.split_tokens(o)
            patches = parts["patches"]
            if reshape:
                p = self.cfg.patch_size
                patches = patches.reshape(b, h // p, w // p, -1).permute(0, 3, 1, 2).contiguous()
            results.append((patches, parts["cls"]) if return_class_token else patches)
        return tuple(results)


# -- constructors -----------------------------------------------------------------------
_SIZES = {
    "tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "small": dict(embed_dim=384, depth=12, num_heads=6),
    "base": dict(embed_dim=768, depth=12, num_heads=12),
    "large": dict(embed_dim=1024, depth=24, num_heads=16),
    "giant": dict(embed_dim=1536, depth=40, num_heads=24, ffn="swiglu"),
}
# Name -> config defaults. Patch 14 is the DINOv2 family (LayerScale 1e-5, iBOT mask token);
# patch 16 the plain timm ViT, which DeiT-III recipes give LayerScale 1e-4 and patch-only
# positions through overrides.
_FAMILIES = {14: dict(layerscale_init=1e-5, mask_token=True), 16: {}}
VIT_ARCHS: dict[str, dict] = {
    f"vit_{size}_patch{p}": dict(spec, patch_size=p, **_FAMILIES[p])
    for size, spec in _SIZES.items()
    for p in (14, 16)
    if not (size == "giant" and p == 16)
}


def vit_config(arch: str, **overrides) -> ViTConfig:
    """The config of a named arch with ``overrides`` applied; unknown names are refused."""
    if arch not in VIT_ARCHS:
        close = difflib.get_close_matches(arch, VIT_ARCHS, n=3)
        raise ValueError(f"unknown arch {arch!r}; did you mean {close}? known: {', '.join(sorted(VIT_ARCHS))}")
    for key in overrides:
        if key not in ViTConfig.__dataclass_fields__:
            close = difflib.get_close_matches(key, ViTConfig.__dataclass_fields__, n=3)
            raise ValueError(f"unknown ViT config key {key!r} for {arch}; did you mean {close}?")
    return ViTConfig(**{**VIT_ARCHS[arch], **overrides})


def create_vit(arch: str, **overrides) -> VisionTransformer:
    """Build a plain ViT by name, e.g. ``create_vit("vit_large_patch14", layerscale_init=1e-5)``."""
    return VisionTransformer(vit_config(arch, **overrides))


def _constructor(name: str):
    def build(**overrides) -> VisionTransformer:
        return create_vit(name, **overrides)

    build.__name__ = name
    build.__doc__ = f"Plain ViT {name} ({VIT_ARCHS[name]})."
    return build


for _name in VIT_ARCHS:
    globals()[_name] = _constructor(_name)
__all__ += list(VIT_ARCHS) + ["vit_config"]
