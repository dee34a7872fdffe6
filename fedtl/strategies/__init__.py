"""Server strategies (Flower ``Strategy`` subclasses) and the algorithms they belong to."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
from flwr.serverapp.strategy import Strategy

from fedtl.config import RunConfig, unseen_count


@dataclass(frozen=True)
class Algorithm:
    """A federated algorithm: its server strategy and its client-side update rule.

    ``has_global_model`` is False for algorithms that train no shared model (local-only):
    their "global" figures are not applicable and are recorded as null, never as the score of
    an untrained model. ``personal_model`` names the personalized model in reports.
    """

    make_strategy: Callable[[RunConfig, Mapping[int, int]], Strategy]
    client_rule_target: str  # "module:Class" of the client's UpdateRule
    has_global_model: bool = True
    personal_model: str = "personalized model"

    def client_rule(self) -> type:
        module, _, attr = self.client_rule_target.partition(":")
        return getattr(importlib.import_module(module), attr)


def held_out_partitions(cfg: RunConfig) -> frozenset[int]:
    """Partition ids of the clients ``unseen-clients`` holds out of training (drawn from
    ``seed``): they are only evaluated, personalized from the global model."""
    count = unseen_count(cfg.num_clients, cfg.unseen_clients)
    if count == 0:
        return frozenset()
    rng = np.random.default_rng([cfg.seed, 0x0DD5EE])
    return frozenset(int(i) for i in rng.choice(cfg.num_clients, size=count, replace=False))
