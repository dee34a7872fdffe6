"""The names fedtl accepts: strategies, trainers, datasets, partitioners and models.

Adding a method is adding its file and one line here. Entries name their implementation as
``"module:attribute"`` and are imported only when used, so ``fedtl list`` and config errors
stay fast.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Entry:
    """One registered name: where it lives and one line saying what it is."""

    target: str
    help: str

    def load(self) -> Any:
        module, _, attr = self.target.partition(":")
        return getattr(importlib.import_module(module), attr)


class Registry:
    """Names of one kind (e.g. strategies), each mapped to an implementation."""

    def __init__(self, kind: str, entries: dict[str, Entry]):
        self.kind = kind
        self._entries = entries

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def items(self) -> list[tuple[str, Entry]]:
        return list(self._entries.items())

    def check(self, name: str, key: str | None = None, where: str | None = None) -> None:
        """Raise ConfigError unless ``name`` is registered (``where``: the value's origin)."""
        if name in self._entries:
            return
        from fedtl.config import ConfigError

        close = difflib.get_close_matches(str(name), self._entries, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        accepted = ", ".join(self._entries)
        raise ConfigError(
            f"config key '{key or self.kind}' = {name!r}{f' ({where})' if where else ''}: "
            f"unknown {self.kind}. "
            f"Accepted: {accepted}.{hint}"
        )

    def get(self, name: str) -> Any:
        """The implementation registered under ``name``."""
        self.check(name)
        return self._entries[name].load()


STRATEGIES = Registry("strategy", {
    "fedavg": Entry("fedtl.strategies.fedavg:FEDAVG",
                    "FedAvg (McMahan et al. 2017): local SGD, sample-weighted averaging; "
                    "personalized = FedAvg-FT"),
    "pfedme": Entry("fedtl.strategies.pfedme:PFEDME",
                    "pFedMe (Dinh et al. 2020): Moreau-envelope bi-level client solver, "
                    "beta-mixed server update; personalized = theta_i"),
    "ditto": Entry("fedtl.strategies.ditto:DITTO",
                   "Ditto (Li et al. 2021): FedAvg's global model plus a personal v_i trained "
                   "with lambda/2 ||v - w||^2; personalized = v_i"),
    "local": Entry("fedtl.strategies.local:LOCAL",
                   "local-only: each client trains its own model alone, nothing is averaged; "
                   "no global model"),
})

TRAINERS = Registry("trainer", {
    "supervised": Entry("fedtl.clients.trainers.supervised:SupervisedTrainer",
                        "cross-entropy on the client's labelled data (label-fraction of it)"),
    "instance-spreading": Entry(
        "fedtl.clients.trainers.instance_spreading:InstanceSpreadingTrainer",
        "self-supervised (Ye et al. 2019): invariant and spreading instance features"),
    "barlow-twins": Entry("fedtl.clients.trainers.barlow_twins:BarlowTwinsTrainer",
                          "self-supervised (Zbontar et al. 2021): cross-correlation of two "
                          "views toward the identity"),
    "kd": Entry("fedtl.clients.trainers.kd:KDTrainer",
                "Hinton KD from teacher-checkpoint on the client's labelled data"),
    "kd-noise": Entry("fedtl.clients.trainers.kd:NoiseKDTrainer",
                      "KD on Gaussian noise images (no data; the floor of data-free KD)"),
    "class-impressions": Entry("fedtl.clients.trainers.class_impressions:"
                               "ClassImpressionsTrainer",
                               "data-free KD on class impressions (Mopuri et al. 2018) "
                               "synthesised on the client"),
    "zskd": Entry("fedtl.clients.trainers.zskd:ZSKDTrainer",
                  "data-free KD on Zero-Shot KD data impressions (Nayak et al. 2019) "
                  "synthesised on the client"),
    "dafl": Entry("fedtl.clients.trainers.dafl:DAFLTrainer",
                  "data-free KD from a generator trained on the client (DAFL, Chen et al. "
                  "2019)"),
    "source-only": Entry("fedtl.clients.trainers.domain:SourceOnlyTrainer",
                         "domain adaptation floor: cross-entropy on labelled source data only"),
    "target-oracle": Entry("fedtl.clients.trainers.domain:TargetOracleTrainer",
                           "domain adaptation ceiling: cross-entropy on the target labels"),
    "dann": Entry("fedtl.clients.trainers.dann:DANNTrainer",
                  "DANN (Ganin & Lempitsky 2015): gradient reversal against a domain head"),
    "adda": Entry("fedtl.clients.trainers.adda:ADDATrainer",
                  "ADDA (Tzeng et al. 2017): source stage, then an adversarially adapted "
                  "target encoder"),
})

DATASETS = Registry("dataset", {
    "digits": Entry("fedtl.data.datasets:DIGITS",
                    "scikit-learn's 8x8 UCI handwritten digits (1,797 images, offline)"),
    "synthetic": Entry("fedtl.data.datasets:SYNTHETIC",
                       "FedProx/pFedMe Synthetic(alpha, beta): 60 features, 10 classes, "
                       "log-normal client sizes (natural partition)"),
    "mnist": Entry("fedtl.data.datasets:MNIST", "MNIST through torchvision (data-dir)"),
    "fashion-mnist": Entry("fedtl.data.datasets:FASHION_MNIST",
                           "Fashion-MNIST through torchvision (data-dir)"),
    "cifar10": Entry("fedtl.data.datasets:CIFAR10", "CIFAR-10 through torchvision (data-dir)"),
    "mnist-m": Entry("fedtl.data.domain_shift:MNIST_M",
                     "MNIST-M built offline: |photo crop - binarised MNIST digit| (data-dir, "
                     "photo-dir)"),
    "digits-m": Entry("fedtl.data.domain_shift:DIGITS_M",
                      "MNIST-M's recipe on scikit-learn's digits upsampled to 28x28 (offline)"),
    "digits-28": Entry("fedtl.data.domain_shift:DIGITS_28",
                       "scikit-learn's digits in MNIST's layout: ink box scaled to 20x20, "
                       "centred by mass in 28x28 (offline)"),
    "usps": Entry("fedtl.data.domain_shift:USPS", "USPS 16x16 digits through torchvision "
                  "(data-dir)"),
    "svhn": Entry("fedtl.data.domain_shift:SVHN", "SVHN 32x32 house numbers through "
                  "torchvision (data-dir)"),
})

PARTITIONERS = Registry("partitioner", {
    "iid": Entry("fedtl.data.partition:iid_partition", "uniformly at random, equal sizes"),
    "dirichlet": Entry("fedtl.data.partition:dirichlet_partition",
                       "label skew: per-class shares ~ Dir(alpha) (smaller alpha, more skew)"),
    "inner-dirichlet": Entry("fedtl.data.partition:inner_dirichlet_partition",
                             "equal sizes, each client's labels ~ Dir(alpha); never empty "
                             "(thousands of clients)"),
    "pathological": Entry("fedtl.data.partition:pathological_partition",
                          "exactly labels-per-client labels on every client"),
    "shard": Entry("fedtl.data.partition:shard_partition",
                   "McMahan et al.: label-sorted shards, shards-per-client each"),
    "quantity-skew": Entry("fedtl.data.partition:quantity_skew_partition",
                           "IID labels, client sizes ~ Dir(alpha) over clients"),
    "natural": Entry("fedtl.data.partition:natural_partition",
                     "the dataset's own clients (synthetic)"),
})

MODELS = Registry("model", {
    "mlr": Entry("fedtl.models:mlr", "multinomial logistic regression (one linear layer)"),
    "dnn": Entry("fedtl.models:dnn", "pFedMe's one-hidden-layer net (784-100-10; 60-20-10)"),
    "cnn": Entry("fedtl.models:cnn", "McMahan et al.'s CNN: conv5x5x32-pool-conv5x5x64-pool-"
                 "fc512"),
    "lenet5": Entry("fedtl.models:lenet5", "LeNet-5: conv5x5x6-pool-conv5x5x16-pool-120-84"),
    "lenet5-half": Entry("fedtl.models:lenet5_half", "LeNet-5-half (ZSKD/DAFL student): "
                         "conv5x5x3-pool-conv5x5x8-pool-60-42"),
    "dann-mnist": Entry("fedtl.models:dann_mnist", "Ganin & Lempitsky's DANN MNIST network: "
                        "conv5x5x32-pool-conv5x5x48-pool-100-100"),
    "mlp": Entry("fedtl.models:mlp", "fully connected ReLU net, widths from mlp-hidden "
                 "(Hinton et al.'s 2x800 student)"),
    "resnet18": Entry("fedtl.models:resnet18", "torchvision ResNet-18, stem sized to the input"),
})

REGISTRIES: dict[str, Registry] = {
    r.kind: r for r in (STRATEGIES, TRAINERS, DATASETS, PARTITIONERS, MODELS)
}
