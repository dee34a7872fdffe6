"""DANN (Ganin & Lempitsky, ICML 2015): domain-adversarial training by gradient reversal.

Parts: the feature extractor G_f (the model up to its last linear layer), the label predictor
G_y (that layer) and a domain head G_d (features -> 100 -> 2). One step on a batch of labelled
source and unlabelled target images minimises

    CE(G_y(G_f(x_s)), y_s) + mean_s CE(G_d(R_lambda(G_f(x_s))), 0)
                           + mean_t CE(G_d(R_lambda(G_f(x_t))), 1),

the domain term being a mean over each domain's batch, summed over the two domains, as in
the paper (JMLR 2016, eq. 9: (1/n) sum over source + (1/n') sum over target), where the gradient reversal layer R_lambda is the identity forward and multiplies the gradient
by -lambda backward: G_d learns to tell the domains apart while G_f learns features it cannot.
lambda_p = 2 / (1 + exp(-10 p)) - 1 and, by default, the learning rates follow
mu_p = mu_0 / (1 + 10 p)^0.75, with p the progress over the WHOLE federated run (rounds and
local steps), as in the paper.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fedtl.clients.trainers.domain import (
    DomainBatch,
    DomainTrainer,
    feature_size,
    split_backbone,
    zero_loss,
)
from fedtl.data.datasets import DatasetSpec

DOMAIN_HIDDEN = 100  # the paper's MNIST domain classifier: features -> 100 -> 2


class GradientReversal(torch.autograd.Function):
    """Identity forward; backward multiplies the incoming gradient by -lambda."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, lam: float) -> torch.Tensor:
        ctx.lam = lam
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * -ctx.lam, None


def grad_reverse(x: torch.Tensor, lam: float) -> torch.Tensor:
    """``x`` unchanged, with its gradient multiplied by ``-lam`` on the way back."""
    return GradientReversal.apply(x, lam)


def grl_lambda(p: float, gamma: float = 10.0) -> float:
    """The paper's adaptation factor lambda_p = 2 / (1 + exp(-gamma p)) - 1 (0 at p=0, ->1)."""
    return 2.0 / (1.0 + math.exp(-gamma * p)) - 1.0


def annealed_lr_factor(p: float, alpha: float = 10.0, beta: float = 0.75) -> float:
    """mu_p / mu_0 = 1 / (1 + alpha p)^beta, the paper's learning-rate annealing."""
    return 1.0 / (1.0 + alpha * p) ** beta


class DomainAdversarialNet(nn.Module):
    """A classifier split into ``features`` and ``classifier``, plus a ``domain_head``.

    ``forward`` returns class logits, so the model scores like any other.
    """

    def __init__(self, backbone: nn.Module, hidden: int = DOMAIN_HIDDEN):
        super().__init__()
        self.features, self.classifier = split_backbone(backbone)
        self.domain_head = nn.Sequential(nn.Linear(feature_size(self.classifier), hidden),
                                         nn.ReLU(), nn.Linear(hidden, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class DANNTrainer(DomainTrainer):
    """DANN's loss on each client's source and target batches."""

    def build_model(self, spec: DatasetSpec, seed: int | None = None) -> nn.Module:
        """The run's ``model`` with a domain head on its penultimate features."""
        backbone = super().build_model(spec, seed)
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed + 1)
            return DomainAdversarialNet(backbone)

    def local_prefixes(self) -> tuple[str, ...]:
        return () if self.cfg.dann_share_domain_head else ("domain_head.",)

    def lr_scale(self, batch: DomainBatch) -> float:
        return annealed_lr_factor(batch.progress) if self.cfg.dann_lr_annealing else 1.0

    def loss(self, model: nn.Module, batch: DomainBatch) -> torch.Tensor:
        """Label loss on the source batch + domain loss on both, through the reversal layer.

        Each domain's batch passes through the feature extractor on its own, so that
        batch-norm layers (``batch-norm = true``) normalise every domain with its own batch
        statistics during training (their running statistics, used at evaluation, mix both
        domains; tllib instead passes both batches together); without batch norm this equals
        one pass over both batches. The domain term is, by default, the paper's sum of one
        mean per domain; ``dann-domain-loss = "pooled-mean"`` takes tllib's mean over both
        batches together instead, half of it when the two batches are the same size. A
        client holding one domain only gets that domain's mean under either.
        """
        features, domain = [], []
        loss = None
        if batch.source_x is not None:
            fs = model.features(batch.source_x)
            loss = F.cross_entropy(model.classifier(fs), batch.source_y)
            features.append(fs)
            domain.append(torch.zeros(len(fs), dtype=torch.long))
        if batch.target_x is not None:
            features.append(model.features(batch.target_x))
            domain.append(torch.ones(len(batch.target_x), dtype=torch.long))
        if not features:
            return zero_loss(model)
        reversed_features = grad_reverse(torch.cat(features), grl_lambda(batch.progress))
        logits = model.domain_head(reversed_features)
        per_sample = F.cross_entropy(logits, torch.cat(domain).to(logits.device),
                                     reduction="none")
        if self.cfg.dann_domain_loss == "pooled-mean":
            domain_loss = per_sample.mean()
        else:
            domain_loss = sum(part.mean() for part in per_sample.split([len(f) for f in features]))
        return domain_loss if loss is None else loss + domain_loss
