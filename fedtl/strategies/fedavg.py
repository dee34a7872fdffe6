"""FedAvg (McMahan et al., AISTATS 2017) on Flower's message API.

Flower's FedAvg, with what a reproducible benchmark needs on top: the clients trained each
round are drawn from ``seed`` by partition id (not by Flower's random node ids), replies are
aggregated in partition order (the same float sums every run), evaluation goes to every
client, and evaluation counts are summed rather than averaged.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg as FlowerFedAvg

from fedtl.config import RunConfig
from fedtl.strategies import Algorithm, held_out_partitions


def sum_metrics(records: list[RecordDict], weighting_key: str) -> MetricRecord:
    """Sum every scalar metric over replies (correct / total counts pool exactly)."""
    out: dict[str, float] = {}
    for record in records:
        for metrics in record.metric_records.values():
            for key, value in metrics.items():
                if isinstance(value, int | float):
                    out[key] = out.get(key, 0) + value
    return MetricRecord(out)


def restore_dtypes(arrays: ArrayRecord, like: ArrayRecord) -> ArrayRecord:
    """Cast aggregated arrays back to the dtypes of ``like`` (e.g. BN's int64 counters)."""
    out = {}
    for key, value in arrays.items():
        target = like[key].numpy().dtype if key in like else None
        a = value.numpy()
        out[key] = Array(a.astype(target) if target is not None and a.dtype != target else a)
    return ArrayRecord(out)


def sample_partitions(seed: int, server_round: int, partition_ids: list[int], fraction: float,
                      minimum: int = 1) -> list[int]:
    """The partition ids trained in ``server_round``: a seeded draw of ``fraction`` of them."""
    ordered = sorted(partition_ids)
    # floor, robust to float error: 100 clients x 0.29 is 28.999999999999996, meant as 29
    count = min(len(ordered), max(minimum, math.floor(len(ordered) * fraction + 1e-9)))
    rng = np.random.default_rng([seed, server_round, 0xFEDA])
    return [ordered[i] for i in sorted(rng.choice(len(ordered), size=count, replace=False))]


class FedAvg(FlowerFedAvg):
    """Sample-weighted FedAvg with seeded client sampling by partition id."""

    def __init__(self, *, clients: Mapping[int, int], seed: int, fraction_train: float = 1.0,
                 fraction_evaluate: float = 1.0, held_out: Collection[int] = ()):
        super().__init__(
            fraction_train=fraction_train, fraction_evaluate=fraction_evaluate, min_train_nodes=1,
            min_evaluate_nodes=1, min_available_nodes=len(clients),
            evaluate_metrics_aggr_fn=sum_metrics,
        )
        self.clients = dict(clients)  # node id -> partition id
        self.held_out = frozenset(held_out)  # partition ids never trained (unseen clients)
        self.seed = seed
        self._global: ArrayRecord | None = None

    @classmethod
    def from_config(cls, cfg: RunConfig, clients: Mapping[int, int]) -> FedAvg:
        return cls(clients=clients, seed=cfg.seed, fraction_train=cfg.fraction_train,
                   fraction_evaluate=cfg.eval_fraction, held_out=held_out_partitions(cfg))

    def summary(self) -> None:
        """Log the sampling settings."""
        super().summary()

    def sample_train(self, server_round: int) -> list[int]:
        """Node ids of the clients trained in ``server_round``, drawn from the seed among the
        clients not held out."""
        node_of = {pid: node for node, pid in self.clients.items() if pid not in self.held_out}
        chosen = sample_partitions(self.seed, server_round, list(node_of), self.fraction_train,
                                   self.min_train_nodes)
        return [node_of[pid] for pid in chosen]

    def _messages(self, node_ids: Iterable[int], arrays: ArrayRecord, config: ConfigRecord,
                  server_round: int, message_type: str) -> list[Message]:
        config["server-round"] = server_round
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        return list(self._construct_messages(record, list(node_ids), message_type))

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Send the global model to this round's seeded sample of clients."""
        self._global = arrays
        return self._messages(self.sample_train(server_round), arrays, config, server_round,
                              MessageType.TRAIN)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """Send the global model to the evaluated clients: all of them, or the same seeded
        ``eval-fraction`` of them every evaluated round (comparable curves)."""
        node_of = {pid: node for node, pid in self.clients.items()}
        chosen = sample_partitions(self.seed, 0, list(node_of), self.fraction_evaluate)
        return self._messages([node_of[p] for p in chosen], arrays, config, server_round,
                              MessageType.EVALUATE)

    def in_partition_order(self, replies: Iterable[Message]) -> list[Message]:
        return sorted(replies, key=lambda m: self.clients.get(m.metadata.src_node_id, -1))

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Sample-weighted mean of the replies' weights, summed in partition order."""
        arrays, metrics = super().aggregate_train(server_round, self.in_partition_order(replies))
        if arrays is not None and self._global is not None:
            arrays = restore_dtypes(arrays, self._global)
        return arrays, metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:
        """Summed evaluation counts over clients."""
        return super().aggregate_evaluate(server_round, self.in_partition_order(replies))


FEDAVG = Algorithm(FedAvg.from_config, "fedtl.clients.local_sgd:LocalSGD",
                   personal_model="fine-tuned global model (FedAvg-FT)")
