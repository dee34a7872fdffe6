"""FedAvg's client: local SGD from the global model; personalized = fine-tuned (FedAvg-FT)."""

from __future__ import annotations

import torch
from torch import nn

from fedtl.clients.update_rule import ClientState, UpdateRule, sgd_steps
from fedtl.data import ClientData


class LocalSGD(UpdateRule):
    """``local-steps`` mini-batch SGD steps; keeps no state between rounds."""

    def train(self, model: nn.Module, data: ClientData, generator: torch.Generator,
              state: ClientState) -> dict[str, float]:
        loss = sgd_steps(model, self.trainer, data, generator, self.cfg.local_steps, self.cfg,
                         self.device, self.clip_count)
        return {"train-loss": loss}

    def personalized(self, model: nn.Module, scratch: nn.Module, data: ClientData,
                     generator: torch.Generator, state: ClientState) -> nn.Module:
        """FedAvg-FT: the global model after ``finetune-steps`` SGD steps on the train split."""
        if self.cfg.finetune_steps == 0:
            return model
        scratch.load_state_dict(model.state_dict())
        sgd_steps(scratch, self.trainer, data, generator, self.cfg.finetune_steps, self.cfg,
                  self.device)
        return scratch
