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
        """The weights sent this round, unchanged, and the replies' mean training loss (and
        clipped share), weighted by their examples."""
        replies = [m.content["metrics"] for m in self.in_partition_order(replies)]
        n = sum(float(m["num-examples"]) for m in replies)
        if not n:
            return self._global, None
        keys = [k for k in ("train-loss", "clipped-share") if all(k in m for m in replies)]
        return self._global, MetricRecord({
            k: sum(float(m[k]) * float(m["num-examples"]) for m in replies) / n for k in keys})


LOCAL = Algorithm(LocalOnly.from_config, "fedtl.clients.local_only:LocalOnly",
                  has_global_model=False, personal_model="the client's own model")
