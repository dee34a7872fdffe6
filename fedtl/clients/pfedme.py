"""pFedMe's client (Dinh et al., NeurIPS 2020): the Moreau-envelope bi-level solver.

The client minimises F_i(w) = min_theta f_i(theta) + lambda/2 ||theta - w||^2. Each of R
local steps draws one mini-batch and

1. approximates the personalized model theta = prox_{f_i/lambda}(w_i) with K gradient steps
   theta <- theta - p_lr * (grad f_i(theta) + lambda (theta - w_i)) on that batch;
2. moves the local copy of the global model: w_i <- w_i - eta * lambda * (w_i - theta).

theta starts each round at the received global w and carries over between local steps, as in
the official code. The client returns w_i and keeps theta as its personalized model.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from fedtl.clients.update_rule import (ClientState, ClipCount, UpdateRule, clip_gradients,
                                      lr_scale)
from fedtl.data import ClientData

THETA = "pfedme-theta"


def prox_steps(model: nn.Module, anchor: list[torch.Tensor], trainer, batch: Any, steps: int,
               personal_lr: float, lam: float, weight_decay: float = 0.0,
               clip: float = 0.0, clip_count: ClipCount | None = None) -> torch.Tensor:
    """K inner steps on one batch: theta <- theta - p_lr (grad f(theta) + lam (theta - anchor)).

    ``model``'s parameters are theta and are updated in place; returns the last loss f(theta).
    ``clip`` > 0 scales grad f(theta) down to that L2 norm first (``clip-grad-norm``);
    ``clip_count`` counts the inner steps it clipped.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    loss = torch.zeros(())
    for _ in range(steps):
        model.zero_grad(set_to_none=True)
        loss = trainer.loss(model, batch)
        loss.backward()
        clip_gradients(params, clip, clip_count)
        with torch.no_grad():
            for p, w in zip(params, anchor):
                grad = p.grad if p.grad is not None else torch.zeros_like(p)
                if weight_decay:
                    grad = grad + weight_decay * p
                p.sub_(personal_lr * (grad + lam * (p - w)))
    return loss.detach()


class PFedMeSolver(UpdateRule):
    """R local steps of (K prox steps on theta, one step of w_i toward theta)."""

    def _batches(self, data: ClientData, generator: torch.Generator) -> Iterator[Any]:
        return self.trainer.batches(data, generator, self.device)

    def train(self, model: nn.Module, data: ClientData, generator: torch.Generator,
              state: ClientState) -> dict[str, float]:
        cfg = self.cfg
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        local_w = [p.detach().clone() for p in params]
        batches = self._batches(data, generator)
        total = torch.zeros(())
        for _ in range(cfg.local_steps):
            batch = next(batches)
            scale = lr_scale(self.trainer, batch)  # a trainer's schedule scales both rates
            total += prox_steps(model, local_w, self.trainer, batch, cfg.inner_steps,
                                cfg.personal_lr * scale, cfg.pfedme_lambda,
                                cfg.weight_decay, cfg.clip_grad_norm, self.clip_count).cpu()
            with torch.no_grad():
                for w, theta in zip(local_w, params):
                    w.sub_(cfg.lr * scale * cfg.pfedme_lambda * (w - theta))
        state[THETA] = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        with torch.no_grad():  # reply with w_i; buffers (BN statistics) come from theta's passes
            for p, w in zip(params, local_w):
                p.copy_(w)
        return {"train-loss": float(total) / cfg.local_steps}

    def personalized(self, model: nn.Module, scratch: nn.Module, data: ClientData,
                     generator: torch.Generator, state: ClientState) -> nn.Module:
        """theta_i from the client's last training round; for a client that has not trained
        yet, theta = prox(w) solved from the current global w (R batches of K steps)."""
        if THETA in state:
            scratch.load_state_dict(state[THETA])
            return scratch
        cfg = self.cfg
        scratch.load_state_dict(model.state_dict())
        scratch.train()
        anchor = [p.detach().clone() for p in scratch.parameters() if p.requires_grad]
        batches = self._batches(data, generator)
        for _ in range(cfg.local_steps):
            batch = next(batches)
            prox_steps(scratch, anchor, self.trainer, batch, cfg.inner_steps,
                       cfg.personal_lr * lr_scale(self.trainer, batch), cfg.pfedme_lambda,
                       cfg.weight_decay, cfg.clip_grad_norm)
        return scratch
