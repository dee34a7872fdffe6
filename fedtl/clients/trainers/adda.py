"""ADDA (Tzeng et al., CVPR 2017): adversarial discriminative domain adaptation, federated.

Three stages, the first two run by the server as phases of rounds:

1. ``source`` (``adda-source-rounds`` rounds): the encoder M_s and classifier C learn the
   labelled source data (cross-entropy), averaged across clients as usual.
2. ``adapt`` (the remaining rounds; the paper's Adam, ``adda-adapt-optimizer``, at
   ``adda-adapt-lr`` = 2e-4 with beta1 = ``adda-adapt-momentum`` = 0.5): when the phase begins
   the server freezes a copy of the source encoder (``source_encoder``) and the target
   encoder M_t (``encoder``) starts from it. Each client trains the discriminator D
   (features -> 500 -> 500 -> 2) to tell M_s(x_s) (label 0) from M_t(x_t) (label 1), and M_t
   to make D call its target features source (the inverted label, -log D_source(M_t(x_t))).
   Both steps use one forward pass and are applied together, as in the official code; C and
   M_s receive no gradient. M_t and D are averaged across clients every round.
3. Target predictions are C(M_t(x)): the model's ``forward``, scored every evaluated round.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from fedtl.clients.trainers.base import Phase
from fedtl.clients.trainers.domain import (
    DomainBatch,
    DomainTrainer,
    feature_size,
    split_backbone,
    zero_loss,
)
from fedtl.data.datasets import DatasetSpec

DISCRIMINATOR_HIDDEN = 500  # the paper's 500-500-2 discriminator
SOURCE, TARGET = 0, 1  # discriminator classes


class AdversarialDiscriminativeNet(nn.Module):
    """Target encoder ``encoder``, ``classifier``, frozen ``source_encoder``, ``discriminator``.

    ``forward`` is classifier(encoder(x)): the source model during stage 1, the adapted
    target model afterwards.
    """

    def __init__(self, backbone: nn.Module, hidden: int = DISCRIMINATOR_HIDDEN):
        super().__init__()
        self.encoder, self.classifier = split_backbone(backbone)
        self.source_encoder = copy.deepcopy(self.encoder).requires_grad_(False)
        d = feature_size(self.classifier)
        self.discriminator = nn.Sequential(nn.Linear(d, hidden), nn.ReLU(),
                                           nn.Linear(hidden, hidden), nn.ReLU(),
                                           nn.Linear(hidden, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.encoder(x))


def init_target_encoder(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Stage 2 begins: the source encoder is frozen as it is now; the target encoder
    (``encoder``) continues from the same weights."""
    out = dict(state)
    for key, value in state.items():
        if key.startswith("encoder."):
            out["source_" + key] = value.clone()
    return out


class ADDATrainer(DomainTrainer):
    """ADDA's stages as server-driven phases; this client-side part gives each stage's loss."""

    def build_model(self, spec: DatasetSpec, seed: int | None = None) -> nn.Module:
        backbone = super().build_model(spec, seed)
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed + 1)
            return AdversarialDiscriminativeNet(backbone)

    def phases(self) -> list[Phase]:
        source = self.cfg.adda_source_rounds
        adapt = {"optimizer": self.cfg.adda_adapt_optimizer, "lr": self.cfg.adda_adapt_lr,
                 "momentum": self.cfg.adda_adapt_momentum}  # Adam's beta1 with adam
        return [Phase("source", source),
                Phase("adapt", self.cfg.num_rounds - source, adapt, begin=init_target_encoder)]

    def adapting(self) -> bool:
        return self.phase == "adapt"

    def domains(self) -> tuple[bool, bool]:
        return True, self.adapting()

    def loss(self, model: nn.Module, batch: DomainBatch) -> torch.Tensor:
        if self.adapting():
            return self.adaptation_loss(model, batch)
        if batch.source_x is None:
            return zero_loss(model)
        return F.cross_entropy(model(batch.source_x), batch.source_y)

    @staticmethod
    def adaptation_loss(model: AdversarialDiscriminativeNet, batch: DomainBatch) -> torch.Tensor:
        """Discriminator loss (its own parameters only) + inverted-label loss (M_t only)."""
        logits, labels = [], []
        mapping = None
        if batch.source_x is not None:
            model.source_encoder.eval()  # frozen: no batch-norm statistics updates either
            with torch.no_grad():
                fs = model.source_encoder(batch.source_x)
            logits.append(model.discriminator(fs))
            labels.append(torch.full((len(fs),), SOURCE, dtype=torch.long))
        if batch.target_x is not None:
            ft = model.encoder(batch.target_x)
            logits.append(model.discriminator(ft.detach()))
            labels.append(torch.full((len(ft),), TARGET, dtype=torch.long))
            frozen = {name: p.detach() for name, p in model.discriminator.named_parameters()}
            fooled = functional_call(model.discriminator, frozen, (ft,))
            mapping = F.cross_entropy(fooled, torch.full((len(ft),), SOURCE, dtype=torch.long,
                                                         device=ft.device))
        if not logits:
            return zero_loss(model)
        all_logits = torch.cat(logits)
        loss = F.cross_entropy(all_logits, torch.cat(labels).to(all_logits.device))
        return loss if mapping is None else loss + mapping
