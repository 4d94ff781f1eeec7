"""Weighted k-NN classification on cosine similarity (the DINO protocol: k = 20, T = 0.07)."""
from __future__ import annotations

import torch


def knn_predict(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor, num_classes: int,
                k: int = 20, temperature: float = 0.07, chunk: int = 1024) -> torch.Tensor:
    """Class scores (N_test, num_classes): each of the k most similar training features votes
    for its label with weight exp(cosine / T). Features must be L2-normalised."""
    k = min(k, train_feats.shape[0])
    scores = []
    for start in range(0, test_feats.shape[0], chunk):
        sim = test_feats[start:start + chunk] @ train_feats.t()
        top_sim, top_idx = sim.topk(k, dim=1)
        votes = torch.zeros(sim.shape[0], num_classes, dtype=sim.dtype)
        votes.scatter_add_(1, train_labels[top_idx], (top_sim / temperature).exp())
        scores.append(votes)
    return torch.cat(scores)


def knn_accuracy(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                 test_labels: torch.Tensor, k: int = 20, temperature: float = 0.07) -> dict[str, float]:
    """Top-1 and top-5 accuracy (%) of the weighted k-NN classifier."""
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    scores = knn_predict(train_feats, train_labels, test_feats, num_classes, k, temperature)
    top = scores.topk(min(5, num_classes), dim=1).indices
    hit = top == test_labels.unsqueeze(1)
    return {"top1": 100.0 * hit[:, 0].float().mean().item(), "top5": 100.0 * hit.any(dim=1).float().mean().item()}
