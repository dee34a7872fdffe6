"""Invariant and Spreading Instance Feature (Ye et al., CVPR 2019) as a client-side trainer.

Each sample is its own class. With L2-normalised embeddings f_i of a batch and f^_i of its
augmented copy, the probability that x^_i is recognised as instance i and that another
instance x_j is recognised as i are in-batch softmaxes (temperature tau):

    P(i|x^_i) = exp(f_i.f^_i / tau) / sum_k exp(f_k.f^_i / tau)
    P(i|x_j)  = exp(f_i.f_j  / tau) / sum_k exp(f_k.f_j  / tau),   j != i

and the loss J = -sum_i log P(i|x^_i) - sum_i sum_{j!=i} log(1 - P(i|x_j)) pulls a sample's
views together (invariance) and pushes instances apart (spreading). As the official code does,
J is divided by the batch size. tau = 0.1 and 128-d embeddings are the paper's defaults. The
official code's symmetric variant (both views as anchors, 2N-1 negatives) is not the paper's
equation and is not implemented.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fedtl.clients.trainers.self_supervised import SelfSupervisedTrainer


def instance_spreading_loss(f: torch.Tensor, f_hat: torch.Tensor, temperature: float
                            ) -> torch.Tensor:
    """J / N for L2-normalised embeddings ``f`` (N, d) and their augmented copies ``f_hat``."""
    n = f.shape[0]
    # row i: log softmax over instances k of f_k . f^_i -> its diagonal is log P(i|x^_i)
    positives = torch.log_softmax(f_hat @ f.T / temperature, dim=1).diagonal()
    # row j: P(k|x_j) over k; the off-diagonal entries are P(i|x_j), i != j. Each is at most
    # 1/2 (the k = j term is the largest), so log(1 - P) is well conditioned.
    p = torch.softmax(f @ f.T / temperature, dim=1)
    others = ~torch.eye(n, dtype=torch.bool, device=f.device)
    negatives = torch.log1p(-p[others])
    return -(positives.sum() + negatives.sum()) / n


class InstanceSpreadingLoss(nn.Module):
    """The loss with its embedding head: a linear map to ``embedding_dim``, L2-normalised."""

    def __init__(self, in_dim: int, embedding_dim: int = 128, temperature: float = 0.1):
        super().__init__()
        self.projector = nn.Linear(in_dim, embedding_dim)
        self.temperature = temperature

    def embed(self, features: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.projector(features), dim=1)

    def forward(self, features: torch.Tensor, augmented: torch.Tensor) -> torch.Tensor:
        """The loss of encoder features of a batch and of its augmented copy."""
        return instance_spreading_loss(self.embed(features), self.embed(augmented),
                                       self.temperature)


class InstanceSpreadingTrainer(SelfSupervisedTrainer):
    """Instance spreading on the client's unlabelled train split."""

    def objective(self, feature_dim: int) -> nn.Module:
        return InstanceSpreadingLoss(feature_dim, self.cfg.embedding_dim, self.cfg.temperature)
