"""The DINO/iBOT projection head (the classifier's head is a plain ``nn.Linear``: methods/classification.py)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DINOHead"]


class DINOHead(nn.Module):
    """MLP (``nlayers`` Linear+GELU, last one to ``bottleneck_dim``), L2 normalisation, then a
    weight-normalised linear layer onto ``out_dim`` prototypes (DINOv2's head).

    The last layer stores its direction in ``last_layer.weight`` and normalises each prototype
    at use (weight norm with the gain fixed to 1), instead of ``nn.utils.weight_norm``, whose
    split ``weight_g``/``weight_v`` parameters do not shard or checkpoint cleanly."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 2048, bottleneck_dim: int = 256, nlayers: int = 3):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (nlayers - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
            layers.append(nn.Linear(a, b))
            if i < nlayers - 1:
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        self.last_layer = nn.Linear(bottleneck_dim, out_dim, bias=False)
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.last_layer.weight, std=0.02)
        # DINOv2 freezes the prototypes for the first epoch; the method sets this per step.
        self.freeze_last_layer = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(self.mlp(x), dim=-1, eps=1e-6 if x.dtype == torch.float16 else 1e-12)
        prototypes = self.last_layer.weight
        if self.freeze_last_layer:
            # A zero gradient rather than none: DDP and ZeRO expect one for every parameter.
            prototypes = prototypes.detach() + 0.0 * prototypes
        return F.linear(x, F.normalize(prototypes, dim=-1))
