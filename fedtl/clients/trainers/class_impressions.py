"""Class impressions (Mopuri, Uppala & Babu, ECCV 2018, "Ask, Acquire, and Attack").

For each class c, images start as uniform noise and climb the teacher's pre-softmax logit of
c by gradient ascent (Adam, ``synthesis-lr``), through a random jitter / rotation / scale at
every step so that the images, not one pixel pattern, carry the class. The images are
clipped to the valid input range after every step. ``ci-samples`` images per client (equal
shares per class) and ``ci-steps`` steps each are the budget. The student then learns the
teacher's softened predictions on (augmented) impressions.

Known weaknesses (the reason ZSKD and DAFL exist): little diversity within a class and no
relation between classes.
"""

from __future__ import annotations

import torch
from torch import nn

from fedtl.clients.trainers.data_free import (
    TransferSetTrainer,
    balanced_classes,
    random_affine,
    synthesise_inputs,
)
from fedtl.data.datasets import DatasetSpec


def class_impressions(teacher: nn.Module, classes: torch.Tensor, input_shape: tuple[int, ...],
                      steps: int, lr: float, bounds: tuple[torch.Tensor, torch.Tensor],
                      generator: torch.Generator, device: torch.device | str = "cpu",
                      desc: str = "class impressions") -> torch.Tensor:
    """One image per entry of ``classes``: noise in ``bounds`` after ``steps`` Adam steps of
    ascent on the teacher's logit of that class under random jitter / rotation / scale."""
    lo = bounds[0]

    def loss(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        seen = random_affine(x, generator, shift_px=2.0, degrees=5.0, scale=(0.95, 1.05),
                             fill=lo)
        return -teacher(seen).gather(1, c[:, None]).sum()  # each image its own ascent

    return synthesise_inputs(classes, loss, input_shape, steps, lr, bounds, generator, device,
                             desc)


class ClassImpressionsTrainer(TransferSetTrainer):
    """Data-free KD on class impressions synthesised on the client."""

    method = "class-impressions"

    def set_size(self) -> int:
        return self.cfg.ci_samples

    def synthesise(self, teacher: nn.Module, spec: DatasetSpec, n: int,
                   generator: torch.Generator, device: torch.device | str,
                   bounds: tuple[torch.Tensor, torch.Tensor], partition_id: int) -> torch.Tensor:
        classes = balanced_classes(n, spec.num_classes)
        return class_impressions(teacher, classes, spec.input_shape, self.cfg.ci_steps,
                                 self.cfg.synthesis_lr, bounds, generator, device,
                                 desc=f"client {partition_id}: class impressions")
