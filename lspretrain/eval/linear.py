"""Linear probe on frozen features."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def linear_probe(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                 test_labels: torch.Tensor, epochs: int = 100, lr: float = 5e-2, weight_decay: float = 1e-4,
                 batch_size: int = 256, seed: int = 0) -> dict[str, float]:
    """Train a linear classifier (AdamW, cosine lr) on ``train_feats`` and report top-1 (%) on
    the test features. Features are standardised with the training statistics first."""
    g = torch.Generator().manual_seed(seed)
    mean, std = train_feats.mean(0), train_feats.std(0).clamp(min=1e-6)
    xtr, xte = (train_feats - mean) / std, (test_feats - mean) / std
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    head = torch.nn.Linear(xtr.shape[1], num_classes)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = max(1, (len(xtr) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * steps_per_epoch)
    for _ in range(epochs):
        order = torch.randperm(len(xtr), generator=g)
        for start in range(0, len(xtr), batch_size):
            idx = order[start:start + batch_size]
            loss = F.cross_entropy(head(xtr[idx]), train_labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    with torch.no_grad():
        acc = (head(xte).argmax(1) == test_labels).float().mean().item()
    return {"top1": 100.0 * acc}
