"""pFedMe's server (Dinh et al., NeurIPS 2020): FedAvg whose update mixes with beta.

w <- (1 - beta) * w + beta * (sample-weighted mean of the sampled clients' w_i). beta = 1 is
plain averaging; the paper's tuned runs use beta = 2. Only the sampled clients train each
round (the official code trains all and aggregates the sampled ones); a client's personalized
theta_i is the one from the last round it trained.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord

from fedtl.config import RunConfig
from fedtl.strategies import Algorithm, held_out_partitions
from fedtl.strategies.fedavg import FedAvg


# Batch-norm statistics are not parameters: beta > 1 would extrapolate them (a negative
# running variance), so they take the clients' average as it is.
STATISTICS = ("running_mean", "running_var", "num_batches_tracked")


def mix(previous: ArrayRecord, average: ArrayRecord, beta: float) -> ArrayRecord:
    """(1 - beta) * previous + beta * average, key by key, in the dtypes of ``previous``;
    batch-norm statistics (``STATISTICS``) are the average."""
    out = {}
    for key, avg in average.items():
        if key.rsplit(".", 1)[-1] in STATISTICS:
            out[key] = avg
            continue
        old = previous[key].numpy()
        out[key] = Array(np.asarray((1.0 - beta) * old + beta * avg.numpy(), dtype=old.dtype))
    return ArrayRecord(out)


class PFedMe(FedAvg):
    """pFedMe: FedAvg's sampling and averaging, then w <- (1 - beta) w + beta mean(w_i)."""

    def __init__(self, *, clients: Mapping[int, int], seed: int, fraction_train: float = 1.0,
                 fraction_evaluate: float = 1.0, beta: float = 1.0,
                 held_out: Collection[int] = ()):
        super().__init__(clients=clients, seed=seed, fraction_train=fraction_train,
                         fraction_evaluate=fraction_evaluate, held_out=held_out)
        self.beta = beta

    @classmethod
    def from_config(cls, cfg: RunConfig, clients: Mapping[int, int]) -> PFedMe:
        return cls(clients=clients, seed=cfg.seed, fraction_train=cfg.fraction_train,
                   fraction_evaluate=cfg.eval_fraction, beta=cfg.beta,
                   held_out=held_out_partitions(cfg))

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Average the clients' w_i, then mix with the previous global model by beta."""
        average, metrics = super().aggregate_train(server_round, replies)
        if average is None or self._global is None or self.beta == 1.0:
            return average, metrics
        return mix(self._global, average, self.beta), metrics


PFEDME = Algorithm(PFedMe.from_config, "fedtl.clients.pfedme:PFedMeSolver",
                   personal_model="theta_i (Moreau-envelope prox of w)")
