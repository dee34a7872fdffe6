"""Local-only baseline: every client trains alone; the server averages nothing.

The server keeps sending the initial weights (clients start their own model from them) and
never replaces them, so there is no global model: fedtl records its global figures as null
(``Algorithm.has_global_model``), not as the accuracy of untrained weights.
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import ArrayRecord, Message, MetricRecord

from fedtl.strategies import Algorithm
from fedtl.strategies.fedavg import FedAvg


class LocalOnly(FedAvg):
    """FedAvg's client sampling with no aggregation: the weights sent never change."""

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The weights sent this round, unchanged, and the replies' mean training loss."""
        replies = self.in_partition_order(replies)
        losses = [(float(m.content["metrics"]["train-loss"]),
                   float(m.content["metrics"]["num-examples"])) for m in replies]
        n = sum(w for _, w in losses)
        metrics = MetricRecord({"train-loss": sum(l * w for l, w in losses) / n}) if n else None
        return self._global, metrics


LOCAL = Algorithm(LocalOnly.from_config, "fedtl.clients.local_only:LocalOnly",
                  has_global_model=False, personal_model="the client's own model")
