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
        """The weights sent this round, unchanged, and the replies' metrics (training loss,
        clipped share, ...) averaged by their examples, as FedAvg averages them."""
        records = [m.content for m in self.in_partition_order(replies)]
        if not sum(float(r["metrics"][self.weighted_by_key]) for r in records):
            return self._global, None
        return self._global, self.train_metrics_aggr_fn(records, self.weighted_by_key)


LOCAL = Algorithm(LocalOnly.from_config, "fedtl.clients.local_only:LocalOnly",
                  has_global_model=False, personal_model="the client's own model")
