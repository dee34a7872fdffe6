"""Local-only training (pFL-Bench's "Isolated"): each client trains its own model, alone.

A client's model starts from the run's initial weights (the same for every client, from
``seed``), trains ``local-steps`` SGD steps whenever the client is sampled, and is kept on the
client's disk; it never leaves the client. The reply carries the weights the client received,
unchanged, only because the server loop expects a well-formed reply; the local strategy
ignores it. There is no global model, so the run's global figures are not applicable.
"""

from __future__ import annotations

import torch
from torch import nn

from fedtl.clients.update_rule import (ClientState, UpdateRule, keep_weights, kept_weights,
                                      sgd_steps)
from fedtl.data import ClientData

OWN = "local-model"


class LocalOnly(UpdateRule):
    """Continue the client's own model for ``local-steps`` SGD steps per sampled round."""

    def train(self, model: nn.Module, data: ClientData, generator: torch.Generator,
              state: ClientState) -> dict[str, float]:
        received = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if (kept := kept_weights(self.trainer, state, OWN)) is not None:
            model.load_state_dict(kept)
        loss = sgd_steps(model, self.trainer, data, generator, self.cfg.local_steps, self.cfg,
                         self.device, self.clip_count)
        keep_weights(self.trainer, state, OWN, model)
        model.load_state_dict(received)  # nothing learned is sent
        return {"train-loss": loss}

    def personalized(self, model: nn.Module, scratch: nn.Module, data: ClientData,
                     generator: torch.Generator, state: ClientState) -> nn.Module:
        """The client's own model; a client that has not trained yet (or is held out) trains
        one from the initial weights for ``finetune-steps`` steps, the budget FedAvg-FT gets."""
        if (kept := kept_weights(self.trainer, state, OWN)) is not None:
            scratch.load_state_dict(kept)
            return scratch
        scratch.load_state_dict(model.state_dict())
        sgd_steps(scratch, self.trainer, data, generator, self.cfg.finetune_steps, self.cfg,
                  self.device)
        return scratch
