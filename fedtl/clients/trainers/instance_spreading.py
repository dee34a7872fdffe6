"""Invariant and Spreading Instance Feature (Ye et al., CVPR 2019) as a client-side trainer.

Each sample is its own class. With L2-normalised embeddings f_i of a batch and f^_i of its
augmented copy, the probability that x^_i is recognised as instance i and that another
instance x_j is recognised as i are in-batch softmaxes (temperature tau):

    P(i|x^_i) = exp(f_i.f^_i / tau) / sum_k exp(f_k.f^_i / tau)
    P(i|x_j)  = exp(f_i.f_j  / tau) / sum_k exp(f_k.f_j  / tau),   j != i

and the loss J = -sum_i log P(i|x^_i) - sum_i sum_{j!=i} log(1 - P(i|x_j)) pulls a sample's
views together (invariance) and pushes instances apart (spreading). As the official code does,
J is divided by the batch size. tau = 0.1 and 128-d embeddings are the paper's defaults.

``spreading-loss = "symmetric"`` is what the official code (``BatchCriterion``) computes
instead: the 2N embeddings of both views are each an anchor, classified among the OTHER 2N-1
(its own similarity left out of every softmax), so that each anchor's positive is its other
view and the 2N-2 rest are its negatives; the similarities' second factor carries no gradient,
and the sum is divided by 2N.
"""

from __future__ import annotations

import math

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


def symmetric_spreading_loss(f: torch.Tensor, f_hat: torch.Tensor, temperature: float
                             ) -> torch.Tensor:
    """The official code's J / 2N: both views' L2-normalised embeddings as anchors, each
    classified among the other 2N - 1 (the other view of its instance being the positive)."""
    x = torch.cat([f, f_hat])
    n2 = x.shape[0]
    eye = torch.eye(n2, dtype=torch.bool, device=x.device)
    # row a: log P(b | x_a) over b != a; the columns are the (gradient-free) instance weights
    log_p = torch.log_softmax((x @ x.detach().T / temperature).masked_fill(eye, -math.inf),
                              dim=1)
    rows = torch.arange(n2, device=x.device)
    partner = (rows + n2 // 2) % n2
    positives = log_p[rows, partner]
    negative = ~eye
    negative[rows, partner] = False
    # a negative's share is at most 1 - the positive's; the clamp only guards log(0)
    negatives = torch.log1p(-log_p[negative].exp().clamp(max=1 - 1e-6))
    return -(positives.sum() + negatives.sum()) / n2


SPREADING_LOSSES = {"paper": instance_spreading_loss, "symmetric": symmetric_spreading_loss}


class InstanceSpreadingLoss(nn.Module):
    """The loss with its embedding head: a linear map to ``embedding_dim``, L2-normalised."""

    def __init__(self, in_dim: int, embedding_dim: int = 128, temperature: float = 0.1,
                 variant: str = "paper"):
        super().__init__()
        self.projector = nn.Linear(in_dim, embedding_dim)
        self.temperature = temperature
        self.criterion = SPREADING_LOSSES[variant]

    def embed(self, features: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.projector(features), dim=1)

    def forward(self, features: torch.Tensor, augmented: torch.Tensor) -> torch.Tensor:
        """The loss of encoder features of a batch and of its augmented copy."""
        return self.criterion(self.embed(features), self.embed(augmented), self.temperature)


class InstanceSpreadingTrainer(SelfSupervisedTrainer):
    """Instance spreading on the client's unlabelled train split."""

    def objective(self, feature_dim: int) -> nn.Module:
        return InstanceSpreadingLoss(feature_dim, self.cfg.embedding_dim, self.cfg.temperature,
                                     self.cfg.spreading_loss)
