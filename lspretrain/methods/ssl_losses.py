"""Self-supervised losses of DINOv2: DINO (CLS), iBOT (masked patches), KoLeo, and the two
ways of centering the teacher (Sinkhorn-Knopp, softmax centering).

Every function is plain math on local tensors; the few that need the global batch (Sinkhorn-
Knopp, the softmax center) all-reduce when a process group is initialised, so each rank
computes exactly what one process would on the concatenated batch.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

__all__ = ["dino_loss", "ibot_loss", "koleo_loss", "sinkhorn_knopp", "SoftmaxCenter"]


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t


def dino_loss(student_logits: list[torch.Tensor], teacher_probs: list[torch.Tensor], student_temp: float = 0.1,
              n_global: int = 2) -> torch.Tensor:
    """Cross-entropy of every student crop against every teacher global crop of *another*
    view, averaged over pairs and images.

    ``student_logits``: one (B, K) tensor per crop, the ``n_global`` global crops first (same
    order as ``teacher_probs``), then the local crops. ``teacher_probs``: one (B, K) tensor of
    centred, sharpened probabilities per global crop."""
    total, pairs = student_logits[0].new_zeros(()), 0
    for s_idx, s in enumerate(student_logits):
        log_p = F.log_softmax(s.float() / student_temp, dim=-1)
        for t_idx, t in enumerate(teacher_probs):
            if s_idx < n_global and s_idx == t_idx:
                continue  # a global crop never predicts its own view
            total = total - (t * log_p).sum(dim=-1).mean()
            pairs += 1
    return total / pairs


def ibot_loss(student_patch_logits: torch.Tensor, teacher_patch_probs: torch.Tensor, masks: torch.Tensor,
              student_temp: float = 0.1, mask_indices: torch.Tensor | None = None) -> torch.Tensor:
    """iBOT: cross-entropy on the masked patches only.

    ``student_patch_logits`` and ``teacher_patch_probs``: (M, K) for the M masked patches of
    the batch, in ``masks.nonzero()`` order; ``masks``: (N_images, N_patches) bool. Each image
    weighs the same whatever its number of masked patches; images without masks count as 0
    in the mean over images (as in DINOv2); a batch without any masked patch gives 0.
    ``mask_indices``: ``masks.flatten().nonzero()`` when the caller has it (the collate does):
    selecting by index does not read the device from the host, a boolean mask does."""
    per_patch = -(teacher_patch_probs * F.log_softmax(student_patch_logits.float() / student_temp, dim=-1)).sum(-1)
    n_masked = masks.sum(dim=-1).clamp(min=1).to(per_patch.dtype)
    weights = (1.0 / n_masked).unsqueeze(-1).expand_as(masks)
    weights = weights[masks] if mask_indices is None else weights.flatten().index_select(0, mask_indices)
    return (per_patch * weights).sum() / masks.shape[0]


def koleo_loss(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Kozachenko-Leonenko entropy estimator: -mean log distance to the nearest neighbour of
    each L2-normalised feature. A batch of one has no neighbour (loss 0); duplicates sit at
    distance 0 and are kept finite by ``eps``."""
    if x.shape[0] < 2:
        return x.sum() * 0.0  # keeps the graph connected for every rank's backward
    x = F.normalize(x.float(), dim=-1, eps=eps)
    with torch.no_grad():
        sim = x @ x.t()
        sim.fill_diagonal_(-2.0)  # below any cosine: never one's own neighbour
        nearest = sim.argmax(dim=1)
    distances = F.pairwise_distance(x, x[nearest], eps=eps)
    return -torch.log(distances + eps).mean()


@torch.no_grad()
def sinkhorn_knopp(teacher_logits: torch.Tensor, temp: float, n_iterations: int = 3) -> torch.Tensor:
    """Teacher targets by Sinkhorn-Knopp over the global batch (all ranks): rows (prototypes)
    get equal mass, columns (samples) sum to one. Returns (B_local, K) probabilities.

    The global sample count is all-reduced rather than taken as local × world size: for iBOT
    the samples are masked patches, whose number differs from rank to rank."""
    q = torch.exp(teacher_logits.float() / temp).t()  # (K, B)
    # A device scalar (filled there, not copied from the host, and never read back): no host sync.
    n_samples = _all_reduce(q.new_full((), float(q.shape[1])))
    n_protos = q.shape[0]
    q /= _all_reduce(q.sum())
    for _ in range(n_iterations):
        q /= _all_reduce(q.sum(dim=1, keepdim=True))
        q /= n_protos
        q /= q.sum(dim=0, keepdim=True)
        q /= n_samples
    return (q * n_samples).t()


class SoftmaxCenter(nn.Module):
    """DINO's teacher centering: softmax((t - center) / temp), the center an EMA (momentum)
    of the global batch mean of the teacher logits, updated after it was used."""

    def __init__(self, dim: int, momentum: float = 0.9):
        super().__init__()
        self.momentum = momentum
        self.register_buffer("center", torch.zeros(1, dim))

    @torch.no_grad()
    def forward(self, teacher_logits: torch.Tensor, temp: float) -> torch.Tensor:
        probs = F.softmax((teacher_logits.float() - self.center) / temp, dim=-1)
        batch_sum = _all_reduce(teacher_logits.float().sum(dim=0, keepdim=True))
        count = _all_reduce(teacher_logits.new_full((), float(teacher_logits.shape[0]), dtype=torch.float32))
        mean = batch_sum / count
        self.center.mul_(self.momentum).add_(mean, alpha=1 - self.momentum)
        return probs
