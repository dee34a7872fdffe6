"""The client's update rule: how local training turns the global model into a reply.

An update rule owns the optimisation loop (FedAvg's local SGD, pFedMe's bi-level solver) and
the client's persistent state between rounds; the trainer it drives owns the loss. Rules are
free of Flower types: the ClientApp moves weights and state in and out of messages.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import MutableMapping

import torch
from torch import nn

from fedtl.clients.trainers.base import Trainer
from fedtl.config import RunConfig
from fedtl.data import ClientData

# Persistent per-client state: named state dicts kept across rounds (Flower's Context.state).
ClientState = MutableMapping[str, dict[str, torch.Tensor]]
PHASE_SUFFIX = "-phase"  # state entry beside a kept model: the phase it was last trained in


class ClipCount:
    """How many of a client's gradient steps ``clip-grad-norm`` scaled down. The count stays
    on the device (no synchronisation per step) until ``share`` reads it."""

    def __init__(self) -> None:
        self.steps = 0
        self.clipped: torch.Tensor | int = 0

    def add(self, clipped: torch.Tensor) -> None:
        self.steps += 1
        self.clipped = self.clipped + clipped.to(torch.int64)

    def share(self) -> float | None:
        """Clipped steps / steps counted (None before any step)."""
        return None if self.steps == 0 else float(self.clipped) / self.steps


class UpdateRule(ABC):
    """A client-side federated update rule."""

    def __init__(self, cfg: RunConfig, trainer: Trainer, device: torch.device):
        self.cfg = cfg
        self.trainer = trainer
        self.device = device
        self.clip_count = ClipCount()  # the training steps of this rule's ``train`` call

    def clip_metrics(self) -> dict[str, float]:
        """``clipped-share``: the share of ``train``'s gradient steps that ``clip-grad-norm``
        scaled down (only when clipping is on and steps were taken)."""
        share = self.clip_count.share() if self.cfg.clip_grad_norm > 0 else None
        return {} if share is None else {"clipped-share": share}

    @abstractmethod
    def train(self, model: nn.Module, data: ClientData, generator: torch.Generator,
              state: ClientState) -> dict[str, float]:
        """Train ``model`` in place, starting from the global weights it holds.

        On return ``model`` holds the weights to send back; ``state`` holds what the client
        keeps. Returns scalar training metrics.
        """

    @abstractmethod
    def personalized(self, model: nn.Module, scratch: nn.Module, data: ClientData,
                     generator: torch.Generator, state: ClientState) -> nn.Module:
        """The client's personalized model, given the global ``model`` (left unchanged).

        ``scratch`` is a model of the same architecture that may be overwritten and returned.
        """


def _phases(trainer: Trainer) -> list:
    phases = getattr(trainer, "phases", None)  # a minimal trainer may have none
    return [] if phases is None else phases()


def _phase_index(trainer: Trainer) -> int | None:
    names = [phase.name for phase in _phases(trainer)]
    return names.index(trainer.phase) if getattr(trainer, "phase", "") in names else None


def kept_weights(trainer: Trainer, state: ClientState, key: str
                 ) -> dict[str, torch.Tensor] | None:
    """The model a client keeps under ``state[key]`` (Ditto's v_i, a local-only model),
    carried into the trainer's current phase, or None if the client keeps none yet.

    The server applies a phase's ``begin`` to the global model when the phase starts (ADDA:
    freeze the source encoder as it is now); a model that never leaves the client gets the
    same, from its own weights, the first time the client uses it in a later phase than the
    one it was saved in (recorded by ``keep_weights``)."""
    if key not in state:
        return None
    weights = state[key]
    current = _phase_index(trainer)
    if current is None:
        return weights
    saved = state.get(key + PHASE_SUFFIX)
    done = int(saved["index"]) if saved is not None else 0
    for phase in _phases(trainer)[done + 1:current + 1]:
        if phase.begin is not None:
            weights = phase.begin(dict(weights))
    return weights


def keep_weights(trainer: Trainer, state: ClientState, key: str, model: nn.Module) -> None:
    """Keep ``model``'s weights under ``state[key]`` with the phase they belong to."""
    state[key] = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    current = _phase_index(trainer)
    if current is not None:
        state[key + PHASE_SUFFIX] = {"index": torch.tensor(current)}


def local_optimizer(params, cfg: RunConfig) -> torch.optim.Optimizer:
    """The client optimizer of ``cfg`` (``optimizer``), new for each call: its state (momentum,
    Adam's moments) starts afresh every round, as each round starts from new global weights."""
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, betas=(cfg.momentum, 0.999),
                                weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                           weight_decay=cfg.weight_decay)


def lr_scale(trainer: Trainer, batch) -> float:
    """The trainer's learning-rate factor for ``batch`` (1 for a trainer without a schedule)."""
    scale = getattr(trainer, "lr_scale", None)
    return 1.0 if scale is None else float(scale(batch))


def set_step_lr(optimizer: torch.optim.Optimizer, cfg: RunConfig, trainer: Trainer,
                batch) -> None:
    """The step on ``batch`` runs at ``lr`` times the trainer's ``lr_scale`` of it."""
    for group in optimizer.param_groups:
        group["lr"] = cfg.lr * lr_scale(trainer, batch)


def clip_gradients(params, max_norm: float, count: ClipCount | None = None) -> None:
    """Scale the gradients of ``params`` down to L2 norm ``max_norm`` (``clip-grad-norm``; 0
    leaves them); ``count`` records whether this step's norm was above it."""
    if max_norm > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        if count is not None:
            count.add(norm > max_norm)


def sgd_steps(model: nn.Module, trainer: Trainer, data: ClientData, generator: torch.Generator,
              steps: int, cfg: RunConfig, device: torch.device,
              clip_count: ClipCount | None = None) -> float:
    """``steps`` mini-batch steps of the client optimizer (``local_optimizer``) on the
    trainer's loss (learning rate ``lr`` times the trainer's ``lr_scale`` of each batch);
    returns the mean loss. ``clip_count`` counts the steps ``clip-grad-norm`` clipped."""
    if steps == 0:
        return float("nan")
    optimizer = local_optimizer(model.parameters(), cfg)
    model.train()
    batches = trainer.batches(data, generator, device)
    total = torch.zeros((), device=device)
    for _ in range(steps):
        batch = next(batches)
        set_step_lr(optimizer, cfg, trainer, batch)
        optimizer.zero_grad(set_to_none=True)
        loss = trainer.loss(model, batch)
        loss.backward()
        clip_gradients(model.parameters(), cfg.clip_grad_norm, clip_count)
        optimizer.step()
        total += loss.detach()
    return float(total) / steps
