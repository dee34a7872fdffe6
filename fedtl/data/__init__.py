"""Data: datasets, their partition across clients, and each client's local splits."""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fedtl.config import ConfigError, RunConfig
from fedtl.data.datasets import DatasetSpec, Source
from fedtl.data.partition import ClientSplit, label_counts, split_client
from fedtl.registry import DATASETS, MODELS, PARTITIONERS
from fedtl.results import atomic_write

# Bump when partitioning or splitting changes, so cached partitions are recomputed.
PARTITION_CACHE_VERSION = "1"

# The config keys that decide which samples a client holds.
DATA_KEYS = (
    "dataset", "data-dir", "partitioner", "alpha", "labels-per-client", "shards-per-client",
    "min-partition-size", "val-fraction", "test-fraction", "synthetic-alpha", "synthetic-beta",
    "synthetic-min-samples", "num-clients", "seed", "target-dataset", "da-scenario",
    "target-client-share", "photo-dir",
)

IMAGE_MODELS = ("cnn", "lenet5", "lenet5-half", "dann-mnist", "resnet18")


@dataclass(frozen=True)
class Split:
    """A client's samples as tensors: normalised inputs and labels."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return int(self.y.shape[0])


@dataclass(frozen=True)
class ClientData:
    """One client's train, validation and test splits."""

    partition_id: int
    train: Split
    val: Split
    test: Split

    def labelled(self, fraction: float, seed: int) -> Split:
        """The part of the train split whose labels the client keeps: ``fraction`` of it
        (rounded, at least one sample), drawn from (seed, partition id); the whole split when
        ``fraction`` is 1. Subsets are nested: the 1% subset lies inside the 10% subset."""
        n = len(self.train)
        if fraction >= 1 or n == 0:
            return self.train
        # a SuperNode without a partition id has -1; numpy seeds take non-negative integers
        key = max(self.partition_id, 0)
        order = np.random.default_rng([seed, key, 0x1ABE1]).permutation(n)
        idx = torch.from_numpy(np.sort(order[:max(1, round(fraction * n))]))
        return Split(self.train.x[idx], self.train.y[idx])


class ClientStatsOnce:
    """``stats_of(pid)``: ``client_stats()[pid]``, every client's computed once per object (an
    actor describes thousands of virtual clients of the same federation)."""

    def client_stats(self) -> list[dict]:
        raise NotImplementedError

    def stats_of(self, partition_id: int) -> dict:
        cached = self.__dict__.get("_client_stats")
        if cached is None:
            cached = self.__dict__["_client_stats"] = self.client_stats()
        return cached[partition_id]


# Bytes of materialised client splits a federation object keeps per process (see CachedClients)
CLIENT_CACHE_BYTES = 64 * 2**20


class CachedClients:
    """``client(pid)``: ``_materialise(pid)``, the most recently used clients' tensors kept up
    to ``CLIENT_CACHE_BYTES`` per object. An actor serving a small federation then gathers
    and normalises each client's samples once instead of at every message (for small models
    that was a tenth of a client's round); in a large one, clients whose data does not fit are
    simply materialised again. Callers must not modify the returned tensors in place."""

    def _materialise(self, partition_id: int):
        raise NotImplementedError

    def client(self, partition_id: int):
        cache = self.__dict__.setdefault("_clients", OrderedDict())
        if partition_id in cache:
            cache.move_to_end(partition_id)
            return cache[partition_id][0]
        data = self._materialise(partition_id)
        size = sum(t.element_size() * t.nelement() for t in _tensors(data))
        if size <= CLIENT_CACHE_BYTES:
            cache[partition_id] = (data, size)
            total = sum(n for _, n in cache.values())
            while total > CLIENT_CACHE_BYTES:
                total -= cache.popitem(last=False)[1][1]
        return data


def _tensors(data) -> list[torch.Tensor]:
    return [t for value in vars(data).values() if isinstance(value, Split)
            for t in (value.x, value.y)]


@dataclass
class FederatedData(ClientStatsOnce, CachedClients):
    """A dataset partitioned across clients."""

    spec: DatasetSpec
    source: Source
    splits: list[ClientSplit]

    @property
    def num_clients(self) -> int:
        return len(self.splits)

    def _materialise(self, partition_id: int) -> ClientData:
        """Client ``partition_id``'s splits, materialised as tensors (``client(pid)``)."""
        if not 0 <= partition_id < len(self.splits):
            raise ValueError(
                f"partition-id {partition_id} is outside 0..{len(self.splits) - 1}"
            )
        split = self.splits[partition_id]
        pool = self.source.train

        def take(idx: np.ndarray) -> Split:
            t = torch.from_numpy(idx)
            return Split(pool.inputs(t), pool.labels(t))

        return ClientData(partition_id, take(split.train), take(split.val), take(split.test))

    def central_test(self) -> Split | None:
        """The dataset's own test set, for the global model; None where there is none."""
        test = self.source.test
        return None if test is None else Split(test.inputs(), test.labels())

    def client_stats(self) -> list[dict]:
        """Samples per split and label counts per client (what clients report at start)."""
        labels = self.source.train.y.numpy()
        k = self.spec.num_classes
        return [
            {
                "partition-id": pid,
                "num-train": len(s.train),
                "num-val": len(s.val),
                "num-test": len(s.test),
                "label-counts": label_counts(labels, np.concatenate([s.train, s.val, s.test]), k),
            }
            for pid, s in enumerate(self.splits)
        ]


def dataset_spec(cfg: RunConfig) -> DatasetSpec:
    """The run's dataset; with a ``target-dataset``, the source/target pair in its shared
    input shape (whose test set is the target domain's)."""
    if cfg.target_dataset:
        from fedtl.data.domain_shift import pair_spec

        return pair_spec(cfg.dataset, cfg.target_dataset)
    return DATASETS.get(cfg.dataset)


def check_compatible(cfg: RunConfig) -> None:
    """Checks that need the dataset's static facts (no loading). Raises ConfigError."""
    from fedtl.data.domain_shift import check_domain_adaptation

    check_domain_adaptation(cfg)
    spec = dataset_spec(cfg)
    if cfg.partitioner == "pathological" and cfg.labels_per_client > spec.num_classes:
        raise ConfigError(
            f"config key 'labels-per-client' = {cfg.labels_per_client}: dataset "
            f"{cfg.dataset!r} has {spec.num_classes} classes (accepted: 1..{spec.num_classes})"
        )
    if spec.train_size is not None and cfg.num_clients > spec.train_size:
        raise ConfigError(
            f"config key 'num-clients' = {cfg.num_clients}: more clients than the "
            f"{spec.train_size} samples of dataset {cfg.dataset!r}"
        )
    if cfg.model in IMAGE_MODELS and not spec.is_image:
        raise ConfigError(
            f"config key 'model' = {cfg.model!r} needs images but dataset {cfg.dataset!r} "
            f"has feature vectors of shape {spec.input_shape}. Accepted for it: "
            + ", ".join(m for m in MODELS if m not in IMAGE_MODELS)
        )
    if cfg.partitioner == "natural" and not spec.natural_clients:
        PARTITIONERS.get("natural")(np.zeros(1, dtype=np.int64), cfg.num_clients, cfg, None)


def _data_key(cfg: RunConfig) -> tuple:
    return tuple(cfg[k] for k in DATA_KEYS)


def cache_dir() -> Path:
    """Where computed partitions are kept: ``$FEDTL_CACHE_DIR`` or ``~/.cache/fedtl``."""
    return Path(os.environ.get("FEDTL_CACHE_DIR") or Path.home() / ".cache" / "fedtl")


def _cache_file(key: tuple, source: Source) -> Path:
    """A file name that changes with the data keys, the data-dir, the pool's labels and the
    flwr-datasets version (whose partitioners draw the splits)."""
    from importlib.metadata import version
    ident = dict(zip(DATA_KEYS, key))
    ident["data-dir"] = str(Path(str(ident["data-dir"])).expanduser().resolve())
    digest = hashlib.sha256(json.dumps(ident, sort_keys=True).encode())
    digest.update(source.train.y.numpy().tobytes())
    digest.update(PARTITION_CACHE_VERSION.encode())
    digest.update(version("flwr-datasets").encode())
    return cache_dir() / "partitions" / f"{ident['dataset']}-{digest.hexdigest()[:24]}.npz"


def _save_splits(path: Path, splits: list[ClientSplit]) -> None:
    arrays = {}
    for part in ("train", "val", "test"):
        chunks = [getattr(s, part) for s in splits]
        arrays[part] = np.concatenate(chunks) if chunks else np.empty(0, np.int64)
        arrays[f"{part}_sizes"] = np.asarray([len(c) for c in chunks], dtype=np.int64)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, buf.getvalue())
    except OSError:
        pass  # a read-only home: the partition is simply recomputed next time


def _load_splits(path: Path) -> list[ClientSplit] | None:
    try:
        with np.load(path) as z:
            parts = {p: np.split(z[p], np.cumsum(z[f"{p}_sizes"])[:-1])
                     for p in ("train", "val", "test")}
    except (OSError, ValueError, KeyError):
        return None
    return [ClientSplit(*t) for t in zip(parts["train"], parts["val"], parts["test"])]


@functools.lru_cache(maxsize=4)
def _build(key: tuple) -> FederatedData:
    """Load the dataset and partition it, reusing a partition computed earlier (on disk):
    with thousands of clients partitioning takes longer than loading, and every Ray actor
    would otherwise repeat it."""
    from fedtl.config import make_config

    cfg = make_config(dict(zip(DATA_KEYS, key)))
    if cfg.target_dataset:
        from fedtl.data.domain_shift import build_domain_adaptation

        return build_domain_adaptation(cfg)
    spec = dataset_spec(cfg)
    source = spec.load(cfg)
    cache = _cache_file(key, source)
    splits = _load_splits(cache) if cache.exists() else None
    if splits is None or len(splits) != cfg.num_clients:
        labels = source.train.y.numpy()
        partition = PARTITIONERS.get(cfg.partitioner)
        parts = partition(labels, cfg.num_clients, cfg, source.client_ids)
        splits = [split_client(idx, cfg.val_fraction, cfg.test_fraction, cfg.seed, pid)
                  for pid, idx in enumerate(parts)]
        _save_splits(cache, splits)
    for pid, s in enumerate(splits):
        if len(s.train) == 0:
            raise ConfigError(
                f"client {pid} got {s.size} samples from partitioner {cfg.partitioner!r}, "
                "leaving none to train on: use fewer clients, a larger alpha or "
                "min-partition-size, or smaller val-fraction / test-fraction"
            )
    return FederatedData(spec, source, splits)


def federated_data(cfg: RunConfig) -> FederatedData:
    """The dataset of ``cfg`` partitioned across its clients; cached per process.

    With a ``target-dataset`` it is a ``DomainAdaptationData`` (same interface; each client
    holds source and target splits, see ``fedtl.data.domain_shift``)."""
    check_compatible(cfg)
    return _build(_data_key(cfg))
