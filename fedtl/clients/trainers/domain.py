"""What the domain-adaptation trainers share, and their floor and ceiling.

A domain-adaptation client holds labelled source data and unlabelled target data (either may
be empty, depending on ``da-scenario``; see ``fedtl.data.domain_shift``). Its trainer draws
``DomainBatch``es: ``batch-size`` labelled source samples and ``batch-size`` target samples
WITHOUT their labels, so a method cannot read target labels by accident; only the
``target-oracle`` ceiling draws labelled target batches.

Every domain-adaptation trainer scores a model the same way: ``test`` is the client's
TARGET test split (the headline figure), ``source-test`` its source test split, and ``val``
the validation split of the domain whose labels the trainer learns from (the source, except
for the oracle), so that rounds are selected without target labels.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fedtl.clients.trainers.base import Trainer, batch_stream
from fedtl.data import ClientData, Split
from fedtl.data.domain_shift import DomainClientData
from fedtl.evaluation import Score, score

# Summary figures under domain-adaptation names (rounds.jsonl keeps the generic ones).
DA_ALIASES = {
    "target_accuracy": "global_accuracy",
    "target_personalized_accuracy": "personalized_accuracy",
    "source_accuracy": "source_test_global_accuracy",
    "source_personalized_accuracy": "source_test_personalized_accuracy",
}


@dataclass(frozen=True)
class DomainBatch:
    """One step's data: labelled source images, unlabelled target images (either may be
    None when the client holds no such data), and the training progress p in [0, 1] over
    the whole federated run at this step."""

    source_x: torch.Tensor | None
    source_y: torch.Tensor | None
    target_x: torch.Tensor | None
    progress: float


def split_backbone(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """A classifier split into its feature extractor and the label predictor on top.

    - a ``nn.Sequential`` whose first block is convolutional (cnn, lenet5): the features are
      that block's flattened output and the predictor is the fully connected rest, as in
      DANN's MNIST network (reversal after the convolutions, 100-100-10 on top);
    - any other ``nn.Sequential`` ending in ``nn.Linear`` (mlr, dnn): the features are the
      penultimate activations;
    - a model with an ``fc`` layer (ResNet): everything before ``fc``.
    """
    if isinstance(model, nn.Sequential):
        first = model[0]
        if isinstance(first, nn.Sequential) and any(isinstance(m, nn.Conv2d)
                                                    for m in first.modules()):
            return first, nn.Sequential(*list(model)[1:])
        if isinstance(model[-1], nn.Linear):
            return nn.Sequential(*list(model)[:-1]), model[-1]
    head = getattr(model, "fc", None)
    if isinstance(head, nn.Linear):
        model.fc = nn.Identity()
        return model, head
    raise ValueError(f"cannot find the last linear layer of {type(model).__name__}; a domain-"
                     "adaptation trainer needs a model ending in one")


def feature_size(classifier: nn.Module) -> int:
    """Input width of a label predictor (its first linear layer)."""
    return next(m for m in classifier.modules() if isinstance(m, nn.Linear)).in_features


def zero_loss(model: nn.Module) -> torch.Tensor:
    """A loss of 0 with no gradient for any parameter (a client without the needed data)."""
    return torch.zeros((), device=next(model.parameters()).device, requires_grad=True)


def _stream(split: Split, batch_size: int, generator: torch.Generator, device
            ) -> Iterator[tuple[torch.Tensor, torch.Tensor]] | None:
    return batch_stream(split, batch_size, generator, device) if len(split) else None


class DomainTrainer(Trainer):
    """Base of the domain-adaptation trainers: batches of both domains, target-first scores."""

    needs_target = True
    summary_aliases = DA_ALIASES

    def domains(self) -> tuple[bool, bool]:
        """Whether this trainer's batches draw (source, target) data in the current phase."""
        return True, True

    def progress(self, step: int) -> float:
        """Training progress p in [0, 1] at local ``step`` (0-based) of the current round,
        counted in local steps over all ``num-rounds`` x ``local-steps`` of the run."""
        total = self.cfg.num_rounds * self.cfg.local_steps
        done = (self.server_round - 1) * self.cfg.local_steps + step
        return min(1.0, max(0.0, done / total))

    @staticmethod
    def domain_data(data: ClientData) -> DomainClientData:
        if not isinstance(data, DomainClientData):
            raise TypeError("a domain-adaptation trainer needs a run with 'target-dataset' set")
        return data

    def batches(self, data: ClientData, generator: torch.Generator,
                device: torch.device | str = "cpu") -> Iterator[DomainBatch]:
        """Endless ``DomainBatch``es: ``batch-size`` samples of each domain used."""
        data = self.domain_data(data)
        use_source, use_target = self.domains()
        size = self.cfg.batch_size
        source = _stream(data.train, size, generator, device) if use_source else None
        target = _stream(data.target_train, size, generator, device) if use_target else None
        step = 0
        while True:
            xs, ys = next(source) if source is not None else (None, None)
            xt = next(target)[0] if target is not None else None  # target labels stay unread
            yield DomainBatch(xs, ys, xt, self.progress(step))
            step += 1

    def num_examples(self, data: ClientData) -> int:
        """Source and target training samples this client learns from."""
        data = self.domain_data(data)
        use_source, use_target = self.domains()
        return len(data.train) * use_source + len(data.target_train) * use_target

    def evaluate(self, model: nn.Module, data: ClientData,
                 device: torch.device | str = "cpu") -> dict[str, Score]:
        """``test``: target test split; ``source-test``; ``val``: source validation split."""
        data = self.domain_data(data)
        return {
            "val": score(model, data.val.x, data.val.y, device),
            "test": score(model, data.target_test.x, data.target_test.y, device),
            "source-test": score(model, data.test.x, data.test.y, device),
        }


class SourceOnlyTrainer(DomainTrainer):
    """The floor: cross-entropy on labelled source data; the target is never seen."""

    def domains(self) -> tuple[bool, bool]:
        return True, False

    def loss(self, model: nn.Module, batch: DomainBatch) -> torch.Tensor:
        if batch.source_x is None:
            return zero_loss(model)
        return F.cross_entropy(model(batch.source_x), batch.source_y)


class TargetOracleTrainer(DomainTrainer):
    """The ceiling: cross-entropy on the target domain WITH its labels (train-on-target)."""

    def domains(self) -> tuple[bool, bool]:
        return False, True

    def batches(self, data: ClientData, generator: torch.Generator,
                device: torch.device | str = "cpu"
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor] | None]:
        """Labelled target batches (None forever on a client without target data)."""
        stream = _stream(self.domain_data(data).target_train, self.cfg.batch_size, generator,
                         device)
        while True:
            yield next(stream) if stream is not None else None

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor] | None
             ) -> torch.Tensor:
        if batch is None:
            return zero_loss(model)
        x, y = batch
        return F.cross_entropy(model(x), y)

    def evaluate(self, model: nn.Module, data: ClientData,
                 device: torch.device | str = "cpu") -> dict[str, Score]:
        """As the other trainers, but ``val`` is the TARGET validation split (labels allowed)."""
        scores = super().evaluate(model, data, device)
        data = self.domain_data(data)
        scores["val"] = score(model, data.target_val.x, data.target_val.y, device)
        return scores
