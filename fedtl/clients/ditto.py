"""Ditto's client (Li, Hu, Beirami & Smith, ICML 2021): a global and a personal model.

Each round a sampled client, given the global model w:

1. trains its copy of w exactly as FedAvg does (``local-steps`` mini-batch SGD steps) and
   replies with it, so Ditto's global model is FedAvg's;
2. trains its personal model v_i for ``local-steps`` steps on the regularised objective
   f_i(v) + lambda/2 ||v - w||^2 (``ditto-lambda``), anchored at the w it received, and keeps
   v_i on its own disk. lambda = 0 is local training; a large lambda pins v_i to w.

v_i starts at the first global model the client receives. The personal steps use the same
learning rate, momentum and weight decay as the global ones (as the official code does),
including a trainer's learning-rate schedule (DANN's annealing scales both alike). When a
trainer's phase begins (ADDA's adaptation), v_i enters it as the server's global model does,
from its own weights (``update_rule.kept_weights``).
"""

from __future__ import annotations

import torch
from torch import nn

from fedtl.clients.trainers.base import Trainer
from fedtl.clients.update_rule import (
    ClientState,
    ClipCount,
    UpdateRule,
    clip_gradients,
    keep_weights,
    kept_weights,
    local_optimizer,
    set_step_lr,
    sgd_steps,
)
from fedtl.config import RunConfig
from fedtl.data import ClientData

PERSONAL = "ditto-v"


def proximal_sgd_steps(model: nn.Module, anchor: list[torch.Tensor], trainer: Trainer,
                       data: ClientData, generator: torch.Generator, steps: int, lam: float,
                       cfg: RunConfig, device: torch.device,
                       clip_count: ClipCount | None = None) -> float:
    """``steps`` SGD steps on trainer loss + lam/2 ||params - anchor||^2, at ``lr`` times the
    trainer's ``lr_scale`` of each batch; returns the mean trainer loss (without the proximal
    term). ``anchor`` holds one tensor per trainable parameter, in ``model.parameters()``
    order; ``clip_count`` counts the steps ``clip-grad-norm`` clipped."""
    if steps == 0:
        return float("nan")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = local_optimizer(params, cfg)
    model.train()
    batches = trainer.batches(data, generator, device)
    total = torch.zeros((), device=device)
    for _ in range(steps):
        batch = next(batches)
        set_step_lr(optimizer, cfg, trainer, batch)
        optimizer.zero_grad(set_to_none=True)
        loss = trainer.loss(model, batch)
        proximal = sum(((p - a) ** 2).sum() for p, a in zip(params, anchor))
        (loss + 0.5 * lam * proximal).backward()
        clip_gradients(params, cfg.clip_grad_norm, clip_count)
        optimizer.step()
        total += loss.detach()
    return float(total) / steps


def trainable(model: nn.Module) -> list[torch.Tensor]:
    """Detached copies of ``model``'s trainable parameters, in ``parameters()`` order."""
    return [p.detach().clone() for p in model.parameters() if p.requires_grad]


class Ditto(UpdateRule):
    """FedAvg's local SGD for w, then lambda-regularised local training of v_i."""

    def _personal_steps(self, personal: nn.Module, anchor: list[torch.Tensor],
                        data: ClientData, generator: torch.Generator,
                        clip_count: ClipCount | None = None) -> float:
        return proximal_sgd_steps(personal, anchor, self.trainer, data, generator,
                                  self.cfg.local_steps, self.cfg.ditto_lambda, self.cfg,
                                  self.device, clip_count)

    def train(self, model: nn.Module, data: ClientData, generator: torch.Generator,
              state: ClientState) -> dict[str, float]:
        received = {k: v.detach().clone() for k, v in model.state_dict().items()}
        anchor = trainable(model)
        # w first, from the generator's first draws: the reply equals FedAvg's for the same seed
        loss = sgd_steps(model, self.trainer, data, generator, self.cfg.local_steps, self.cfg,
                         self.device, self.clip_count)
        reply = {k: v.detach().clone() for k, v in model.state_dict().items()}
        # then v_i, in the same module, anchored at the w the client RECEIVED (Ditto's Alg. 1)
        kept = kept_weights(self.trainer, state, PERSONAL)
        model.load_state_dict(received if kept is None else kept)
        personal_loss = self._personal_steps(model, anchor, data, generator, self.clip_count)
        keep_weights(self.trainer, state, PERSONAL, model)
        model.load_state_dict(reply)
        return {"train-loss": loss, "personal-loss": personal_loss}

    def personalized(self, model: nn.Module, scratch: nn.Module, data: ClientData,
                     generator: torch.Generator, state: ClientState) -> nn.Module:
        """v_i from the client's last training round; a client that has not trained yet (or is
        held out) trains v from the current global w with ``local-steps`` regularised steps."""
        if (kept := kept_weights(self.trainer, state, PERSONAL)) is not None:
            scratch.load_state_dict(kept)
            return scratch
        scratch.load_state_dict(model.state_dict())
        self._personal_steps(scratch, trainable(model), data, generator)
        return scratch
