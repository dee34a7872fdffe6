"""Zero-Shot Knowledge Distillation (Nayak et al., ICML 2019): data impressions.

1. Class similarity from the teacher's output layer: C = cosine similarity of its weight
   vectors (one row per class), each row min-max normalised to [0, 1] (so c_k(k) = 1).
2. For class k, soft labels y ~ Dir(beta * c_k + eps), with beta = 1.0 for half the class's
   impressions and 0.1 for the other half (eps = 1e-4, as the official code adds, keeps
   every concentration positive: the least similar class has c_k = 0).
3. Each impression starts as uniform noise and is optimised with Adam so that the teacher's
   softmax at temperature 20 matches its y (cross-entropy), clipped to the valid range.
4. The student learns the teacher's softened predictions on augmented impressions (the soft
   term only).

Budget: ``zskd-samples`` impressions per client and ``zskd-steps`` Adam steps each (the
paper: 24,000 in all and 1,500 steps at lr 1e-3).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedtl.clients.trainers.data_free import (
    TransferSetTrainer,
    balanced_classes,
    synthesise_inputs,
)
from fedtl.clients.trainers.teacher import classifier
from fedtl.data.datasets import DatasetSpec

TEMPERATURE = 20.0  # the paper's softmax temperature for matching soft labels
BETAS = (1.0, 0.1)  # the paper's two Dirichlet scales, half of each class's impressions each
EPS = 1e-4


def class_similarity(weight: torch.Tensor) -> torch.Tensor:
    """The concentration matrix: cosine similarity of the rows of ``weight`` (classes x
    features), each row min-max normalised to [0, 1]."""
    w = F.normalize(weight.detach().float(), dim=1)
    sim = w @ w.T
    lo = sim.min(dim=1, keepdim=True).values
    hi = sim.max(dim=1, keepdim=True).values
    return (sim - lo) / (hi - lo).clamp_min(1e-12)


def sample_soft_labels(concentration: torch.Tensor, classes: torch.Tensor, betas: torch.Tensor,
                       generator: torch.Generator) -> torch.Tensor:
    """One soft label per impression: y ~ Dir(beta * c_class + 1e-4)."""
    rng = np.random.default_rng(int(torch.randint(2**62, (1,), generator=generator)))
    alpha = (betas[:, None] * concentration[classes] + EPS).double().numpy()
    y = np.stack([rng.dirichlet(a) for a in alpha])
    # With tiny concentrations every gamma draw can underflow to 0; such a row becomes the
    # one-hot of its largest concentration (its limit).
    bad = ~np.isfinite(y).all(axis=1) | (y.sum(axis=1) <= 0)
    y[bad] = np.eye(alpha.shape[1])[alpha[bad].argmax(axis=1)]
    return torch.from_numpy(y).float()


def impression_plan(n: int, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Class and beta of each of ``n`` impressions: equal shares per class, within a class
    the first half beta = 1.0 and the rest beta = 0.1."""
    classes = balanced_classes(n, num_classes)
    betas = torch.empty(n)
    for c in range(num_classes):
        idx = (classes == c).nonzero().flatten()
        half = (len(idx) + 1) // 2
        betas[idx[:half]], betas[idx[half:]] = BETAS
    return classes, betas


def data_impressions(teacher: nn.Module, soft_labels: torch.Tensor,
                     input_shape: tuple[int, ...], steps: int, lr: float,
                     bounds: tuple[torch.Tensor, torch.Tensor], generator: torch.Generator,
                     device: torch.device | str = "cpu",
                     desc: str = "data impressions") -> torch.Tensor:
    """One image per soft label: uniform noise in ``bounds`` after ``steps`` Adam steps on
    CE(y, softmax(teacher(x) / 20)), clipped to ``bounds`` after each step."""
    def loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        log_p = F.log_softmax(teacher(x) / TEMPERATURE, dim=1)
        return -(y * log_p).sum()  # each impression its own loss (sum)

    return synthesise_inputs(soft_labels, loss, input_shape, steps, lr, bounds, generator,
                             device, desc)


class ZSKDTrainer(TransferSetTrainer):
    """Data-free KD on ZSKD data impressions synthesised on the client."""

    method = "zskd"

    def set_size(self) -> int:
        return self.cfg.zskd_samples

    def synthesise(self, teacher: nn.Module, spec: DatasetSpec, n: int,
                   generator: torch.Generator, device: torch.device | str,
                   bounds: tuple[torch.Tensor, torch.Tensor], partition_id: int) -> torch.Tensor:
        concentration = class_similarity(classifier(teacher).weight).cpu()
        classes, betas = impression_plan(n, spec.num_classes)
        y = sample_soft_labels(concentration, classes, betas, generator)
        return data_impressions(teacher, y, spec.input_shape, self.cfg.zskd_steps,
                                self.cfg.synthesis_lr, bounds, generator, device,
                                desc=f"client {partition_id}: zskd data impressions")
