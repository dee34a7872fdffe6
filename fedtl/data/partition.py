"""Non-IID partitions built with flwr-datasets partitioners, and each client's own splits.

Every partition function takes the training pool's labels and the run config and returns one
index array per client. flwr-datasets partitions a small Arrow table of (index, label) rows,
never the images. Each client's indices are then split into its own train / validation /
test parts, deterministically from ``seed`` and the client's partition id.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from fedtl.config import ConfigError, RunConfig


@dataclass(frozen=True)
class ClientSplit:
    """Indices into the training pool: one client's own train, validation and test parts."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray

    @property
    def size(self) -> int:
        return len(self.train) + len(self.val) + len(self.test)


def _table(labels: np.ndarray, seed: int | None, extra: dict | None = None):
    """An Arrow table of (idx, label[, ...]) rows, shuffled by ``seed`` when given."""
    import datasets

    order = np.arange(len(labels))
    if seed is not None:
        order = np.random.default_rng(seed).permutation(len(labels))
    columns = {"idx": order, "label": labels[order]}
    for name, values in (extra or {}).items():
        columns[name] = values[order]
    return datasets.Dataset.from_dict(columns)


def _run(partitioner, table, num_clients: int, cfg: RunConfig) -> list[np.ndarray]:
    partitioner.dataset = table
    try:
        with warnings.catch_warnings():
            # flwr-datasets warns on every resampling attempt; a failure raises below.
            warnings.simplefilter("ignore", UserWarning)
            first = np.asarray(partitioner.load_partition(0)["idx"], dtype=np.int64)
            # Reading the partitioner's row assignment directly is O(samples); selecting each
            # partition through Arrow costs milliseconds per client (minutes for 10,000).
            rows = (getattr(partitioner, "partition_id_to_indices", None)
                    if not hasattr(partitioner, "_partition_id_to_indices")
                    else partitioner._partition_id_to_indices)
            if isinstance(rows, dict) and len(rows) == num_clients:
                idx = np.asarray(table["idx"], dtype=np.int64)
                parts = [idx[np.asarray(rows[i], dtype=np.int64)] for i in range(num_clients)]
                if np.array_equal(parts[0], first):
                    return parts
            return [first] + [np.asarray(partitioner.load_partition(i)["idx"], dtype=np.int64)
                              for i in range(1, num_clients)]
    except ValueError as exc:
        raise ConfigError(
            f"config key 'partitioner' = {cfg.partitioner!r} cannot split {len(table)} samples "
            f"into {num_clients} clients with this config ({_what_to_change(cfg)}): {exc}"
        ) from None


def _what_to_change(cfg: RunConfig) -> str:
    """The keys that make an impossible split possible, for the error message."""
    keys = {"dirichlet": "lower num-clients or min-partition-size, or raise alpha",
            "pathological": "lower num-clients or raise labels-per-client",
            "quantity-skew": "lower num-clients or min-partition-size"}
    return keys.get(cfg.partitioner, "lower num-clients")


def iid_partition(labels: np.ndarray, num_clients: int, cfg: RunConfig,
                  client_ids: np.ndarray | None = None) -> list[np.ndarray]:
    """Uniformly at random, equal sizes."""
    from flwr_datasets.partitioner import IidPartitioner

    return _run(IidPartitioner(num_clients), _table(labels, cfg.seed), num_clients, cfg)


def dirichlet_partition(labels: np.ndarray, num_clients: int, cfg: RunConfig,
                        client_ids: np.ndarray | None = None) -> list[np.ndarray]:
    """Label skew: each class's samples shared among clients by Dir(alpha) proportions."""
    from flwr_datasets.partitioner import DirichletPartitioner

    partitioner = DirichletPartitioner(
        num_partitions=num_clients, partition_by="label", alpha=cfg.alpha,
        min_partition_size=cfg.min_partition_size, self_balancing=False, shuffle=True,
        seed=cfg.seed,
    )
    return _run(partitioner, _table(labels, None), num_clients, cfg)


def inner_dirichlet_partition(labels: np.ndarray, num_clients: int, cfg: RunConfig,
                              client_ids: np.ndarray | None = None) -> list[np.ndarray]:
    """Equal client sizes, each client's label mix ~ Dir(alpha) (Acar et al. 2021's scheme);
    unlike ``dirichlet`` it never leaves a client empty, so it scales to thousands of clients."""
    from flwr_datasets.partitioner import InnerDirichletPartitioner

    base, extra = divmod(len(labels), num_clients)
    sizes = [base + (1 if i < extra else 0) for i in range(num_clients)]
    partitioner = InnerDirichletPartitioner(partition_sizes=sizes, partition_by="label",
                                            alpha=cfg.alpha, shuffle=True, seed=cfg.seed)
    return _run(partitioner, _table(labels, None), num_clients, cfg)


def pathological_partition(labels: np.ndarray, num_clients: int, cfg: RunConfig,
                           client_ids: np.ndarray | None = None) -> list[np.ndarray]:
    """Exactly ``labels-per-client`` labels on each client (Li et al. 2022's #C=k)."""
    from flwr_datasets.partitioner import PathologicalPartitioner

    partitioner = PathologicalPartitioner(
        num_partitions=num_clients, partition_by="label",
        num_classes_per_partition=cfg.labels_per_client,
        class_assignment_mode="first-deterministic", shuffle=True, seed=cfg.seed,
    )
    return _run(partitioner, _table(labels, None), num_clients, cfg)


def shard_partition(labels: np.ndarray, num_clients: int, cfg: RunConfig,
                    client_ids: np.ndarray | None = None) -> list[np.ndarray]:
    """McMahan et al.: sort by label, cut equal shards, deal ``shards-per-client`` to each."""
    from flwr_datasets.partitioner import ShardPartitioner

    partitioner = ShardPartitioner(
        num_partitions=num_clients, partition_by="label",
        num_shards_per_partition=cfg.shards_per_client, shuffle=True, seed=cfg.seed,
    )
    return _run(partitioner, _table(labels, None), num_clients, cfg)


def quantity_skew_sizes(n: int, num_clients: int, alpha: float, min_size: int,
                        seed: int) -> list[int]:
    """Client sizes: ``min_size`` each, the rest shared by proportions ~ Dir(alpha)."""
    spare = n - num_clients * min_size
    if spare < 0:
        raise ConfigError(
            f"config key 'min-partition-size' = {min_size}: {num_clients} clients need "
            f"{num_clients * min_size} samples but the dataset has {n}"
        )
    shares = np.random.default_rng(seed).dirichlet(np.full(num_clients, alpha))
    sizes = np.floor(shares * spare).astype(int) + min_size
    sizes[np.argmax(sizes)] += n - sizes.sum()  # rounding remainder to the largest client
    return [int(s) for s in sizes]


def quantity_skew_partition(labels: np.ndarray, num_clients: int, cfg: RunConfig,
                            client_ids: np.ndarray | None = None) -> list[np.ndarray]:
    """Quantity skew: IID labels, client sizes from Dir(alpha) over clients."""
    from flwr_datasets.partitioner import SizePartitioner

    sizes = quantity_skew_sizes(len(labels), num_clients, cfg.alpha, cfg.min_partition_size,
                                cfg.seed)
    return _run(SizePartitioner(sizes), _table(labels, cfg.seed), num_clients, cfg)


def natural_partition(labels: np.ndarray, num_clients: int, cfg: RunConfig,
                      client_ids: np.ndarray | None = None) -> list[np.ndarray]:
    """The dataset's own clients (e.g. each Synthetic(alpha, beta) client)."""
    from flwr_datasets.partitioner import NaturalIdPartitioner

    if client_ids is None:
        raise ConfigError(
            f"config key 'partitioner' = 'natural': dataset {cfg.dataset!r} has no natural "
            "clients. Accepted for it: iid, dirichlet, pathological, shard, quantity-skew"
        )
    found = len(np.unique(client_ids))
    if found != num_clients:
        raise ConfigError(
            f"config key 'num-clients' = {num_clients}: dataset {cfg.dataset!r} has "
            f"{found} natural clients"
        )
    table = _table(labels, None, {"client": client_ids})
    partitioner = NaturalIdPartitioner(partition_by="client")
    partitioner.dataset = table
    # NaturalIdPartitioner numbers clients in order of first appearance; map back by id.
    out: list[np.ndarray] = [np.empty(0, dtype=np.int64)] * num_clients
    for i in range(num_clients):
        part = partitioner.load_partition(i)
        out[int(part["client"][0])] = np.asarray(part["idx"], dtype=np.int64)
    return out


def split_client(indices: np.ndarray, val_fraction: float, test_fraction: float,
                 seed: int, partition_id: int) -> ClientSplit:
    """Shuffle one client's indices and cut test, validation and train parts."""
    rng = np.random.default_rng([seed, partition_id, 0x5EED])
    order = rng.permutation(indices)
    n = len(order)
    n_test = int(round(n * test_fraction))
    n_val = int(round(n * val_fraction))
    if test_fraction > 0 and n >= 3:
        n_test = max(n_test, 1)
    if val_fraction > 0 and n >= 3:
        n_val = max(n_val, 1)
    n_test = min(n_test, max(n - 1, 0))
    n_val = min(n_val, max(n - 1 - n_test, 0))
    test, val, train = np.split(order, [n_test, n_test + n_val])
    return ClientSplit(train=np.sort(train), val=np.sort(val), test=np.sort(test))


def label_counts(labels: np.ndarray, indices: np.ndarray, num_classes: int) -> list[int]:
    """How many samples of each class sit at ``indices``."""
    return np.bincount(labels[indices], minlength=num_classes).astype(int).tolist()
