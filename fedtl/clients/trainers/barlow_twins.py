"""Barlow Twins (Zbontar et al., ICML 2021) as a client-side trainer.

The embeddings z_A, z_B of two views of a batch (encoder, then projector) are standardised
over the batch (BatchNorm without affine parameters); their cross-correlation
C = BN(z_A)^T BN(z_B) / N should be the identity:

    L = sum_i (1 - C_ii)^2 + lambda sum_i sum_{j!=i} C_ij^2

invariance on the diagonal, redundancy reduction off it; lambda = 5e-3. The paper's projector
has three 8192-wide layers; on small images two layers work better (Linear-BN-ReLU-Linear,
``projector-dim`` wide).
"""

from __future__ import annotations

import torch
from torch import nn

from fedtl.clients.trainers.self_supervised import SelfSupervisedTrainer

BN_EPS = 1e-5  # BatchNorm1d's eps, as in the official code


def standardise(z: torch.Tensor, eps: float = BN_EPS) -> torch.Tensor:
    """Per-dimension batch standardisation: BatchNorm1d(affine=False) in training mode."""
    return (z - z.mean(0)) / torch.sqrt(z.var(0, unbiased=False) + eps)


def barlow_twins_loss(z_a: torch.Tensor, z_b: torch.Tensor, lambda_: float) -> torch.Tensor:
    """sum (1 - C_ii)^2 + lambda sum_{i!=j} C_ij^2 for embeddings of two views, (N, D) each."""
    c = standardise(z_a).T @ standardise(z_b) / z_a.shape[0]
    diagonal = c.diagonal()
    on = (1 - diagonal).pow(2).sum()
    off = c.pow(2).sum() - diagonal.pow(2).sum()
    return on + lambda_ * off


class BarlowTwinsLoss(nn.Module):
    """The loss with its projector (Linear-BN-ReLU-Linear, no biases, as the official code)."""

    def __init__(self, in_dim: int, projector_dim: int = 512, lambda_: float = 5e-3):
        super().__init__()
        self.projector = nn.Sequential(
            nn.Linear(in_dim, projector_dim, bias=False), nn.BatchNorm1d(projector_dim),
            nn.ReLU(inplace=True), nn.Linear(projector_dim, projector_dim, bias=False),
        )
        self.lambda_ = lambda_

    def forward(self, features_a: torch.Tensor, features_b: torch.Tensor) -> torch.Tensor:
        """The loss of encoder features of two views (each view through the projector alone,
        so that its BatchNorm sees one view's statistics)."""
        return barlow_twins_loss(self.projector(features_a), self.projector(features_b),
                                 self.lambda_)


class BarlowTwinsTrainer(SelfSupervisedTrainer):
    """Barlow Twins on the client's unlabelled train split."""

    def objective(self, feature_dim: int) -> nn.Module:
        return BarlowTwinsLoss(feature_dim, self.cfg.projector_dim, self.cfg.barlow_lambda)
