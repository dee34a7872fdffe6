"""Partitioners' label distributions and each client's own splits."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedtl.config import make_config
from fedtl.data import federated_data
from fedtl.data.partition import quantity_skew_sizes, split_client


def _labels_per_client(fed):
    labels = fed.source.train.y.numpy()
    return [set(labels[np.concatenate([s.train, s.val, s.test])].tolist()) for s in fed.splits]


def _mean_label_entropy(fed):
    labels = fed.source.train.y.numpy()
    out = []
    for s in fed.splits:
        counts = np.bincount(labels[np.concatenate([s.train, s.val, s.test])], minlength=10)
        p = counts[counts > 0] / counts.sum()
        out.append(float(-(p * np.log(p)).sum()))
    return float(np.mean(out))


@pytest.mark.parametrize("k", [1, 2, 3])
def test_pathological_gives_exactly_k_labels_per_client(k):
    fed = federated_data(make_config({"partitioner": "pathological", "labels-per-client": k,
                                      "num-clients": 20}))
    assert all(len(s) == k for s in _labels_per_client(fed))


def test_smaller_alpha_means_more_label_skew():
    entropies = [
        _mean_label_entropy(federated_data(make_config(
            {"partitioner": "dirichlet", "alpha": a, "num-clients": 10, "min-partition-size": 5})))
        for a in (0.1, 1.0, 100.0)
    ]
    assert entropies[0] < entropies[1] < entropies[2]
    assert entropies[2] > 0.95 * np.log(10)  # near-uniform labels at alpha = 100


def test_iid_is_balanced_and_covers_every_sample_once():
    fed = federated_data(make_config({"partitioner": "iid", "num-clients": 7}))
    sizes = [s.size for s in fed.splits]
    assert max(sizes) - min(sizes) <= 1
    every = np.concatenate([np.concatenate([s.train, s.val, s.test]) for s in fed.splits])
    assert len(every) == len(np.unique(every)) == 1797


def test_shard_deals_label_sorted_shards():
    fed = federated_data(make_config({"partitioner": "shard", "shards-per-client": 2,
                                      "num-clients": 10}))
    # two shards of label-sorted data span at most two labels each (plus a boundary)
    assert all(len(s) <= 4 for s in _labels_per_client(fed))
    assert np.mean([len(s) for s in _labels_per_client(fed)]) <= 3


def test_quantity_skew_sizes_respect_minimum_and_total():
    sizes = quantity_skew_sizes(1000, 10, alpha=0.3, min_size=20, seed=1)
    assert sum(sizes) == 1000 and min(sizes) >= 20
    skewed = np.std(quantity_skew_sizes(1000, 10, 0.1, 5, 0))
    even = np.std(quantity_skew_sizes(1000, 10, 100.0, 5, 0))
    assert skewed > 3 * even


def test_quantity_skew_keeps_labels_roughly_iid():
    fed = federated_data(make_config({"partitioner": "quantity-skew", "alpha": 1.0,
                                      "num-clients": 5, "min-partition-size": 50}))
    assert all(len(s) >= 8 for s in _labels_per_client(fed))


def test_synthetic_natural_clients():
    cfg = make_config({"dataset": "synthetic", "partitioner": "natural", "num-clients": 6,
                       "model": "mlr"})
    fed = federated_data(cfg)
    assert fed.num_clients == 6
    assert fed.source.train.x.shape[1] == 60
    assert all(s.size >= 50 for s in fed.splits)


def test_partitions_and_splits_are_deterministic_from_seed():
    a = federated_data(make_config({"seed": 5}))
    b = federated_data(make_config({"seed": 5, "num-rounds": 3}))  # same data keys: cached
    c = federated_data(make_config({"seed": 6}))
    assert all(np.array_equal(x.train, y.train) for x, y in zip(a.splits, b.splits))
    assert not all(np.array_equal(x.train, y.train) for x, y in zip(a.splits, c.splits))


def test_client_split_is_disjoint_and_sized():
    idx = np.arange(100, 200)
    s = split_client(idx, 0.15, 0.25, seed=0, partition_id=3)
    assert (len(s.train), len(s.val), len(s.test)) == (60, 15, 25)
    assert len(np.intersect1d(s.train, s.test)) == len(np.intersect1d(s.val, s.test)) == 0
    assert np.array_equal(np.sort(np.concatenate([s.train, s.val, s.test])), idx)
    again = split_client(idx, 0.15, 0.25, seed=0, partition_id=3)
    assert np.array_equal(s.test, again.test)
    assert not np.array_equal(s.test, split_client(idx, 0.15, 0.25, 0, 4).test)


def test_client_tensors_match_split_sizes():
    fed = federated_data(make_config())
    data = fed.client(2)
    assert len(data.train) == len(fed.splits[2].train)
    assert data.train.x.dtype.is_floating_point and data.train.x.shape[1:] == (1, 8, 8)


def test_client_tensors_are_kept_per_process_within_a_byte_budget(monkeypatch):
    from fedtl import data as fdata

    fed = fdata._build.__wrapped__(fdata._data_key(make_config({"num-clients": 6})))
    first = fed.client(1)
    assert fed.client(1) is first  # materialised once
    size = sum(t.nelement() * t.element_size() for t in fdata._tensors(first))
    assert size > 0
    monkeypatch.setattr(fdata, "CLIENT_CACHE_BYTES", int(2.5 * size))
    fed = fdata._build.__wrapped__(fdata._data_key(make_config({"num-clients": 6})))
    a, b, c = fed.client(0), fed.client(1), fed.client(2)  # three do not fit: 0 is dropped
    assert fed.client(2) is c and fed.client(1) is b
    again = fed.client(0)
    assert again is not a and all(torch.equal(x, y) for x, y in
                                  zip(fdata._tensors(again), fdata._tensors(a)))
    monkeypatch.setattr(fdata, "CLIENT_CACHE_BYTES", 0)
    fed = fdata._build.__wrapped__(fdata._data_key(make_config({"num-clients": 6})))
    assert fed.client(3) is not fed.client(3)  # over the budget: never kept


def test_partitions_are_cached_on_disk_and_a_bad_cache_file_is_recomputed(tmp_path, monkeypatch):
    from fedtl import data as fdata

    monkeypatch.setenv("FEDTL_CACHE_DIR", str(tmp_path))
    key = fdata._data_key(make_config({"seed": 11, "num-clients": 7}))
    first = fdata._build.__wrapped__(key)
    files = list((tmp_path / "partitions").glob("digits-*.npz"))
    assert len(files) == 1
    again = fdata._build.__wrapped__(key)
    assert all(np.array_equal(a.train, b.train) and np.array_equal(a.test, b.test)
               for a, b in zip(first.splits, again.splits))
    files[0].write_bytes(b"not a zip file")
    third = fdata._build.__wrapped__(key)
    assert all(np.array_equal(a.val, b.val) for a, b in zip(first.splits, third.splits))


def test_the_partition_cache_file_changes_with_the_flwr_datasets_version(monkeypatch):
    import importlib.metadata
    from types import SimpleNamespace

    from fedtl import data as fdata

    key = fdata._data_key(make_config({"seed": 11, "num-clients": 7}))
    source = SimpleNamespace(train=SimpleNamespace(y=torch.zeros(5, dtype=torch.int64)))
    now = fdata._cache_file(key, source)
    assert fdata._cache_file(key, source) == now
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version",
                        lambda name: "99.0" if name == "flwr-datasets" else real(name))
    assert fdata._cache_file(key, source) != now
