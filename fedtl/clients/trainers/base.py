"""What a local objective (a *trainer*) is: its batches and its loss.

The update rule (FedAvg's local SGD, pFedMe's bi-level solver) owns the loop and the
optimiser; a trainer only says which batches it draws from the client's data and what loss a
batch gives. Methods with extra parts (a domain head, a teacher, a projector) own them here.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from fedtl.config import RunConfig
from fedtl.data import ClientData, Split


def batch_stream(split: Split, batch_size: int, generator: torch.Generator,
                 device: torch.device | str = "cpu") -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless mini-batches of ``split``: shuffled epochs, each sample once per epoch.

    A split smaller than ``batch_size`` yields the whole split each time.
    """
    n = len(split)
    if n == 0:
        raise ValueError("cannot draw batches from an empty split")
    x, y = split.x.to(device), split.y.to(device)
    while True:
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size].to(device)
            if start > 0 and len(idx) < batch_size:
                break  # drop the ragged tail; the next epoch reshuffles
            yield x[idx], y[idx]


class Trainer(ABC):
    """A client-side local objective."""

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg

    def batches(self, data: ClientData, generator: torch.Generator,
                device: torch.device | str = "cpu") -> Iterator[Any]:
        """Endless training batches from the client's train split."""
        return batch_stream(data.train, self.cfg.batch_size, generator, device)

    @abstractmethod
    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """The scalar loss of ``model`` on one batch."""
