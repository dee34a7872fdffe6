"""What a local objective (a *trainer*) is: its batches and its loss.

The update rule (FedAvg's local SGD, pFedMe's bi-level solver) owns the loop and the
optimiser; a trainer only says which batches it draws from the client's data and what loss a
batch gives. Methods with extra parts (a domain head, a teacher, a projector) own them here.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from fedtl.config import RunConfig
from fedtl.data import ClientData, Split
from fedtl.data.datasets import DatasetSpec
from fedtl.evaluation import Score, score


def batch_stream(split: Split, batch_size: int, generator: torch.Generator,
                 device: torch.device | str = "cpu") -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless mini-batches of ``split``: shuffled epochs, each sample once per epoch.

    A split smaller than ``batch_size`` yields the whole split each time.
    """
    n = len(split)
    if n == 0:
        raise ValueError("cannot draw batches from an empty split")
    x, y = split.x.to(device), split.y.to(device)
    while True:
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size].to(device)
            if start > 0 and len(idx) < batch_size:
                break  # drop the ragged tail; the next epoch reshuffles
            yield x[idx], y[idx]


@dataclass(frozen=True)
class Phase:
    """A stretch of ``rounds`` federated rounds that the server drives with its own messages.

    ``config`` overrides run-config keys in this phase's train and evaluate messages (e.g. a
    learning rate); ``begin`` maps the global model's state dict when the phase starts (e.g.
    ADDA's target encoder initialised from the source encoder).
    """

    name: str
    rounds: int
    config: Mapping[str, Any] = field(default_factory=dict)
    begin: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None


class Trainer(ABC):
    """A client-side local objective.

    Besides its loss, a trainer decides which model it trains (``build_model``; e.g. a
    backbone plus a domain head) and how a client scores a model (``evaluate``): the scores
    named ``val`` and ``test`` are the headline figures and drive model selection; any other
    name (e.g. ``source-test``) is reported beside them.

    Optional parts, all with neutral defaults: ``phases`` (the server runs them in order),
    ``begin`` (the client says which round and phase a message belongs to), ``lr_scale``
    (a per-batch factor on the update rule's learning rates), ``num_examples`` (the weight of
    the client's reply), ``local_prefixes`` (state-dict entries that stay on the client) and
    ``summary_aliases`` (extra names for summary figures).
    """

    # True for trainers whose clients do long work of their own (e.g. synthesising a transfer
    # set) and report it on stderr: the simulation then forwards the clients' output.
    shows_client_progress = False

    needs_target: ClassVar[bool] = False  # reads a target domain (``target-dataset``)
    summary_aliases: ClassVar[Mapping[str, str]] = {}  # summary name -> round-record name

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.server_round = 1
        self.phase = ""
        # The client's persistent state (fedtl.clients.state.ClientStateStore: on the client's
        # disk, versioned by round), bound by the client app: a trainer may keep named state
        # dicts there (a synthetic transfer set, a generator) beside the update rule's.
        self.state: MutableMapping[str, dict[str, torch.Tensor]] = {}
        self.client: int | None = None  # the client's key (partition id, else node id)

    @classmethod
    def preflight(cls, cfg: RunConfig) -> None:
        """Raise ConfigError for what this trainer needs and the config lacks (before Ray)."""

    def use_state(self, state: MutableMapping[str, dict[str, torch.Tensor]],
                  client: int | None = None) -> None:
        """Bind the client's persistent state (what the trainer writes there is saved with
        it) and the client's key (``client_key``)."""
        self.state = state
        self.client = client

    def keeps_after_evaluation(self, key: str) -> bool:
        """Whether a state entry ``key`` that evaluation created may be saved: only a
        deterministic cache (a data-free transfer set, the same whoever makes it). Anything
        else evaluation makes (a generator fine-tuned for FedAvg-FT) is dropped, so that when
        a client is evaluated never changes how it trains."""
        return False

    def client_key(self, data: ClientData) -> int:
        """What identifies this client for its own seeds and files: the key bound by the
        client app (partition id, else the SuperNode's node id), else the partition id."""
        return data.partition_id if self.client is None else self.client

    def num_examples(self, data: ClientData) -> int:
        """How many samples this client's update stands for (FedAvg's averaging weight): the
        labelled part of its train split that ``batches`` draws from."""
        return len(data.labelled(self.cfg.label_fraction, self.cfg.seed))

    def phases(self) -> list[Phase]:
        """The phases of the run, in order; their rounds add up to ``num-rounds``."""
        return [Phase("train", self.cfg.num_rounds)]

    def begin(self, server_round: int, phase: str = "") -> None:
        """Called by the client before it trains or evaluates for ``server_round``."""
        self.server_round = server_round
        self.phase = phase

    def lr_scale(self, batch: Any) -> float:
        """Factor on the learning rates of the step that uses ``batch`` (1: no schedule)."""
        return 1.0

    def local_prefixes(self) -> tuple[str, ...]:
        """State-dict name prefixes that each client keeps for itself: the server's values
        for them are replaced by the client's own before training and evaluation, and the
        client replies with the values it received."""
        return ()

    def build_model(self, spec: DatasetSpec, seed: int | None = None) -> nn.Module:
        """The model this trainer trains: by default the run's ``model`` for the dataset."""
        from fedtl.models import build_model

        return build_model(self.cfg.model, spec, seed, cfg=self.cfg)

    def evaluate(self, model: nn.Module, data: ClientData,
                 device: torch.device | str = "cpu") -> dict[str, Score]:
        """Named scores of ``model`` on this client's data (classification accuracy)."""
        return {name: score(model, split.x, split.y, device)
                for name, split in (("val", data.val), ("test", data.test))}

    def batches(self, data: ClientData, generator: torch.Generator,
                device: torch.device | str = "cpu") -> Iterator[Any]:
        """Endless training batches from the labelled part of the client's train split
        (``label-fraction`` of it; all of it by default)."""
        labelled = data.labelled(self.cfg.label_fraction, self.cfg.seed)
        return batch_stream(labelled, self.cfg.batch_size, generator, device)

    def shared_keys(self, model: nn.Module) -> list[str]:
        """State-dict keys of ``model`` that the server aggregates; the others stay on each
        client (in its ClientStateStore). By default everything is shared."""
        return list(model.state_dict())

    def central_scores(self, model: nn.Module, central: Split | None,
                       device: torch.device | str = "cpu") -> dict[str, Score]:
        """How the server scores the global ``model`` with the dataset's central test set
        (None where there is none); each name ``s`` is reported as ``s_accuracy`` and
        ``s_loss`` (null for an empty Score). By default the model's classification accuracy,
        as ``centralized``; nothing without a central test set."""
        if central is None:
            return {}
        return {"centralized": score(model, central.x, central.y, device)}

    @abstractmethod
    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """The scalar loss of ``model`` on one batch."""
