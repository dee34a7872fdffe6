"""Knowledge distillation (Hinton, Vinyals & Dean, 2015) as a client-side trainer.

The student (the run's ``model``) learns from the client's labelled data and from a frozen
teacher's softened predictions:

    L = alpha * CE(y, s) + (1 - alpha) * T^2 * KL(softmax(t / T) || softmax(s / T))

with s and t the student's and teacher's logits, T = ``kd-temperature`` and alpha =
``kd-alpha``. The T^2 keeps the soft term's gradients on the scale of the hard term's as T
changes. Under FedAvg the students are averaged; under pFedMe each client keeps a
personalized student theta_i trained on this loss.

``kd-noise`` is the floor of data-free distillation: the same soft term on Gaussian noise
images, without any data.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from fedtl.clients.trainers.base import Trainer
from fedtl.clients.trainers.teacher import check_teacher, load_teacher
from fedtl.config import RunConfig
from fedtl.data import ClientData


def soft_term(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
              temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(t/T) || softmax(s/T)), averaged over the batch."""
    t = temperature
    return F.kl_div(F.log_softmax(student_logits / t, dim=1), F.softmax(teacher_logits / t, dim=1),
                    reduction="batchmean") * (t * t)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
            temperature: float, alpha: float) -> torch.Tensor:
    """Hinton et al.'s loss: alpha * CE(y, s) + (1 - alpha) * T^2 * KL(t/T || s/T)."""
    hard = F.cross_entropy(student_logits, targets)
    return alpha * hard + (1 - alpha) * soft_term(student_logits, teacher_logits, temperature)


class KDLoss(nn.Module):
    """Hinton's distillation loss; owns the frozen teacher whose logits it computes.

    ``forward(student_logits, inputs, targets)``: with ``targets`` None only the soft term
    (weight 1) is returned, as in data-free distillation.
    """

    def __init__(self, teacher: nn.Module, temperature: float, alpha: float = 0.0):
        super().__init__()
        self.teacher = teacher
        self.temperature = temperature
        self.alpha = alpha

    def forward(self, student_logits: torch.Tensor, inputs: torch.Tensor,
                targets: torch.Tensor | None = None) -> torch.Tensor:
        with torch.no_grad():
            teacher_logits = self.teacher(inputs)
        if targets is None:
            return soft_term(student_logits, teacher_logits, self.temperature)
        return kd_loss(student_logits, teacher_logits, targets, self.temperature, self.alpha)


class DistillationTrainer(Trainer):
    """A trainer whose student learns from the configured teacher (checked before Ray)."""

    @classmethod
    def preflight(cls, cfg: RunConfig) -> None:
        check_teacher(cfg)

    def teacher(self, device: torch.device | str) -> nn.Module:
        return load_teacher(self.cfg, device)

    def kd(self, device: torch.device | str) -> KDLoss:
        return KDLoss(self.teacher(device), self.cfg.kd_temperature, self.cfg.kd_alpha)


class KDTrainer(DistillationTrainer):
    """Hinton KD on the client's labelled train split."""

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        return self.kd(x.device)(model(x), x, y)


class NoiseKDTrainer(DistillationTrainer):
    """The soft term on fresh N(0, 1) noise images in the normalised input space; the
    client's data is never used for training (the floor of data-free methods)."""

    def batches(self, data: ClientData, generator: torch.Generator,
                device: torch.device | str = "cpu") -> Iterator[torch.Tensor]:
        from fedtl.registry import DATASETS

        shape = (self.cfg.batch_size, *DATASETS.get(self.cfg.dataset).input_shape)
        while True:
            yield torch.randn(shape, generator=generator).to(device)

    def num_examples(self, data: ClientData) -> int:
        return self.cfg.local_steps * self.cfg.batch_size

    def loss(self, model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        return self.kd(batch.device)(model(batch), batch)
