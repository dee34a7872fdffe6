"""Supervised training: cross-entropy on the client's labelled data."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fedtl.clients.trainers.base import Trainer


class SupervisedTrainer(Trainer):
    """Cross-entropy between the model's logits and the labels."""

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(model(x), y)
