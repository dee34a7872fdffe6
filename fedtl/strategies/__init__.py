"""Server strategies (Flower ``Strategy`` subclasses) and the algorithms they belong to."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from flwr.serverapp.strategy import Strategy

from fedtl.config import RunConfig


@dataclass(frozen=True)
class Algorithm:
    """A federated algorithm: its server strategy and its client-side update rule."""

    make_strategy: Callable[[RunConfig, Mapping[int, int]], Strategy]
    client_rule_target: str  # "module:Class" of the client's UpdateRule

    def client_rule(self) -> type:
        module, _, attr = self.client_rule_target.partition(":")
        return getattr(importlib.import_module(module), attr)
