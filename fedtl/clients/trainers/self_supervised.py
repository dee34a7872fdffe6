"""What the self-supervised trainers share: encoder + loss module, views, probe evaluation.

A self-supervised trainer trains an *encoder* (the run's ``model`` without its classification
layer) on the client's unlabelled train split: each batch becomes two augmented views, and a
loss ``nn.Module`` that owns its extra parts (a projector) scores the pair of feature batches.
Which parts the server averages is ``ssl-shared``: the encoder and the projector, or the
encoder alone (each client then keeps its projector).

An encoder is scored by what a few labels make of it (``fedtl.probe``): per client, a linear
probe and a kNN classifier fitted on ``probe-label-fraction`` of the client's train split and
scored on its validation and test splits; on the server, the same fitted on the union of the
clients' labelled parts and scored on the dataset's central test set.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Iterator

import torch
from torch import nn

from fedtl.clients.trainers.base import Trainer, batch_stream
from fedtl.config import ConfigError, RunConfig
from fedtl.data import ClientData, FederatedData, Split, federated_data
from fedtl.data.augment import Views, default_augmentation
from fedtl.data.datasets import DatasetSpec
from fedtl.evaluation import Score
from fedtl.probe import encode, fit_linear_probe, knn_score
from fedtl.registry import DATASETS


class SelfSupervisedModel(nn.Module):
    """An encoder and the loss module (with its projector) that trains it.

    ``forward`` returns the encoder's features: that is the model a downstream task uses.
    """

    def __init__(self, encoder: nn.Module, objective: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.objective = objective

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)


def split_encoder(model: nn.Module) -> tuple[nn.Module, int]:
    """The model without its final classification layer, and its feature dimension.

    Works for fedtl's sequential models (last layer ``nn.Linear``) and torchvision ResNets
    (``fc``). Raises ConfigError when nothing trainable is left before the last layer.
    """
    if isinstance(getattr(model, "fc", None), nn.Linear):
        dim = model.fc.in_features
        model.fc = nn.Identity()
        encoder = model
    elif isinstance(model, nn.Sequential) and isinstance(model[-1], nn.Linear):
        dim = model[-1].in_features
        encoder = model[:-1]
    else:
        raise ConfigError(f"config key 'model': {type(model).__name__} has no final linear "
                          "layer to remove; self-supervised trainers need an encoder")
    if not any(p.requires_grad for p in encoder.parameters()):
        raise ConfigError("config key 'model': without its output layer this model has no "
                          "trainable layers (e.g. mlr); self-supervised trainers need an encoder "
                          "such as dnn, cnn, lenet5 or resnet18")
    return encoder, dim


class SelfSupervisedTrainer(Trainer):
    """Two augmented views per batch; the loss module scores the pair of feature batches."""

    def __init__(self, cfg: RunConfig):
        super().__init__(cfg)
        spec = DATASETS.get(cfg.dataset)
        if not spec.is_image:
            raise ConfigError(
                f"config key 'trainer' = {cfg.trainer!r} augments images, but dataset "
                f"{cfg.dataset!r} has feature vectors; use an image dataset (digits, mnist, "
                "fashion-mnist, cifar10)")
        if cfg.batch_size < 2:
            raise ConfigError(f"config key 'batch-size' = {cfg.batch_size}: {cfg.trainer} "
                              "contrasts samples within a batch and needs at least 2")
        self.spec = spec
        self._views: Views | None = None
        self._central_labelled: Split | None = None

    @classmethod
    def preflight(cls, cfg: RunConfig) -> None:
        """Refuse, before Ray starts, what cannot be trained: feature-vector datasets, batches
        under 2, models without an encoder (building the model says which)."""
        cls(cfg).build_model(DATASETS.get(cfg.dataset))

    @abstractmethod
    def objective(self, feature_dim: int) -> nn.Module:
        """The loss module (owning its projector) for encoder features of ``feature_dim``."""

    def build_model(self, spec: DatasetSpec, seed: int | None = None) -> SelfSupervisedModel:
        """The run's model without its classification layer, plus the loss module; the
        projector's initialisation is seeded like the model's."""
        encoder, dim = split_encoder(super().build_model(spec, seed))
        if seed is None:
            return SelfSupervisedModel(encoder, self.objective(dim))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return SelfSupervisedModel(encoder, self.objective(dim))

    def shared_keys(self, model: nn.Module) -> list[str]:
        """Everything (``ssl-shared`` = encoder+projector) or the encoder's keys only."""
        keys = list(model.state_dict())
        if self.cfg.ssl_shared == "encoder":
            return [k for k in keys if k.startswith("encoder.")]
        return keys

    @property
    def views(self) -> Views:
        if self._views is None:  # the dataset's normalisation: also a SuperNode's own data
            self._views = Views(default_augmentation(self.spec), self.spec.mean, self.spec.std)
        return self._views

    def num_examples(self, data: ClientData) -> int:
        return len(data.train)  # pre-training reads every train sample, labels never

    def batches(self, data: ClientData, generator: torch.Generator,
                device: torch.device | str = "cpu") -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Endless pairs of augmented views of train-split batches; labels are never read."""
        for x, _ in batch_stream(data.train, self.cfg.batch_size, generator, device):
            first, second = self.views(x, generator)
            yield first, second

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        first, second = batch
        return model.objective(model.encoder(first), model.encoder(second))

    # --- evaluation -----------------------------------------------------------------------

    def _probe_scores(self, model: nn.Module, labelled: Split, tests: dict[str, Split],
                      device: torch.device | str) -> dict[str, Score]:
        encoder = model.encoder if isinstance(model, SelfSupervisedModel) else model
        k = self.spec.num_classes
        train = encode(encoder, labelled.x, device)
        probe = fit_linear_probe(train, labelled.y, k)
        out = {}
        for name, split in tests.items():
            features = encode(encoder, split.x, device)
            out[f"{name}-probe"] = probe.score(features, split.y)
            out[f"{name}-knn"] = knn_score(train, labelled.y, features, split.y, k)
        return out

    def evaluate(self, model: nn.Module, data: ClientData,
                 device: torch.device | str = "cpu") -> dict[str, Score]:
        """The client's linear probe (``val``, ``test``; ``probe`` repeats ``test``) and kNN
        (``knn``, on the test split), fitted on its ``probe-label-fraction`` labelled part."""
        labelled = data.labelled(self.cfg.probe_label_fraction, self.cfg.seed)
        s = self._probe_scores(model, labelled, {"val": data.val, "test": data.test}, device)
        return {"val": s["val-probe"], "test": s["test-probe"], "probe": s["test-probe"],
                "knn": s["test-knn"]}

    def central_scores(self, model: nn.Module, central: Split | None,
                       device: torch.device | str = "cpu") -> dict[str, Score]:
        """``probe`` and ``knn`` on the central test set, fitted on the union of the clients'
        labelled parts (the samples a supervised run with the same label-fraction sees; the
        server rebuilds the simulated partition for them). Without a central test set both
        are empty scores (reported as null)."""
        if central is None:
            return {"probe": Score(0, 0.0, 0), "knn": Score(0, 0.0, 0)}
        if self._central_labelled is None:
            self._central_labelled = labelled_union(federated_data(self.cfg),
                                                    self.cfg.probe_label_fraction, self.cfg.seed)
        s = self._probe_scores(model, self._central_labelled, {"central": central}, device)
        return {"probe": s["central-probe"], "knn": s["central-knn"]}


def labelled_union(data: FederatedData, fraction: float, seed: int) -> Split:
    """The labelled parts of every client's train split, concatenated in partition order."""
    parts = [data.client(pid).labelled(fraction, seed) for pid in range(data.num_clients)]
    return Split(torch.cat([p.x for p in parts]), torch.cat([p.y for p in parts]))


def encoder_scores(cfg: RunConfig, model: SelfSupervisedModel | None = None,
                   weights: dict[str, torch.Tensor] | None = None) -> dict[str, float | None]:
    """What a run's evaluation reports for an encoder, computed in-process without a federation.

    - ``probe_accuracy`` / ``knn_accuracy``: the central test set (None without one);
    - ``probe_global_accuracy`` / ``knn_global_accuracy``: each client's own probe / kNN on its
      test split, pooled;
    - ``pooled_probe_accuracy`` / ``pooled_knn_accuracy``: one probe / kNN fitted on the union
      of the clients' labelled parts and scored on the union of their test splits (the samples
      a supervised run's ``global_accuracy`` is scored on).

    The model is ``model``, else the run's initial model with ``weights`` (e.g. a run's
    ``model.pt``) loaded over it; neither: the seeded random initialisation (the
    random-encoder baseline).
    """
    from fedtl.registry import TRAINERS

    trainer = TRAINERS.get(cfg.trainer)(cfg)
    if not isinstance(trainer, SelfSupervisedTrainer):
        raise ConfigError(f"config key 'trainer' = {cfg.trainer!r}: encoder scores need a "
                          "self-supervised trainer")
    data = federated_data(cfg)
    if model is None:
        model = trainer.build_model(data.spec, seed=cfg.seed)
        if weights is not None:
            model.load_state_dict({**model.state_dict(), **weights})
    central = trainer.central_scores(model, data.central_test())
    out: dict[str, float | None] = {f"{n}_accuracy": central[n].accuracy if central[n].total
                                    else None for n in ("probe", "knn")}
    pooled: dict[str, list[int]] = {"probe": [0, 0], "knn": [0, 0]}
    clients = [data.client(pid) for pid in range(data.num_clients)]
    for client in clients:
        scores = trainer.evaluate(model, client)
        for name, counts in pooled.items():
            counts[0] += scores[name].correct
            counts[1] += scores[name].total
    for name, (correct, total) in pooled.items():
        out[f"{name}_global_accuracy"] = correct / total if total else None
    tests = Split(torch.cat([c.test.x for c in clients]), torch.cat([c.test.y for c in clients]))
    union = labelled_union(data, cfg.probe_label_fraction, cfg.seed)
    s = trainer._probe_scores(model, union, {"pooled": tests}, "cpu")
    out["pooled_probe_accuracy"] = s["pooled-probe"].accuracy
    out["pooled_knn_accuracy"] = s["pooled-knn"].accuracy
    return out
