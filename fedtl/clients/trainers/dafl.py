"""DAFL: Data-Free Learning of student networks (Chen et al., ICCV 2019).

A generator G(z), z ~ N(0, I), learns against the fixed teacher T to make inputs that T
finds class-like, class-balanced and strongly activating:

    L_G = L_oh + 0.1 * L_a + 5 * L_ie
    L_oh = CE(T(G(z)), argmax T(G(z)))        (one-hot: confident predictions)
    L_a  = -mean |f_T(G(z))|                   (activation: large features before the output
                                                layer)
    L_ie = sum_j p_j log10 p_j, p = mean_batch softmax(T(G(z)))
                                               (information entropy: balanced classes)

and the student learns the teacher's softened predictions on the same samples (at
``kd-temperature``, default 4; the official code's student loss has no temperature, T = 1,
which the README's DAFL runs set); G and the student are stepped together, one step each per
local step. L_a and L_ie are normalised as in the official code, with which the weights 0.1
and 5 were tuned (the paper writes -(1/n) sum ||f||_1 and the natural log).

In fedtl each client keeps its own generator and its Adam state in its persistent state
(``fedtl.clients.state.ClientStateStore``, on its disk), so it carries on across rounds and
never leaves the client. The student's optimiser is the update rule's (FedAvg: SGD with
``lr``); the paper uses Adam.
Budgets: ``dafl-batch-size`` generated samples per step (paper 512), ``dafl-warmup-steps``
generator-only steps before a client's first student step (0: the paper's joint schedule),
``dafl-generator-lr`` (paper 0.2 on MNIST) and ``dafl-generator-width`` (paper 128).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from fedtl.clients.trainers.data_free import (
    DataFreeTrainer,
    progress_bar,
    synthesis_generator,
)
from fedtl.clients.trainers.teacher import logits_and_features
from fedtl.data import ClientData
from fedtl.data.datasets import DatasetSpec

LATENT = 100
GENERATOR = "dafl-generator"
OPTIMIZER = "dafl-generator-adam"


class Generator(nn.Module):
    """DAFL's DCGAN-style generator: z -> fc -> (width, H/4, W/4) -> 2x up, conv width ->
    2x up, conv width/2 -> conv C, tanh, then BatchNorm without affine parameters so that
    its output has the statistics of normalised inputs."""

    def __init__(self, input_shape: tuple[int, ...], width: int = 128, latent: int = LATENT):
        super().__init__()
        c, h, w = input_shape
        self.size = (h, w)
        self.init = (math.ceil(h / 4), math.ceil(w / 4))
        self.width = width
        self.fc = nn.Linear(latent, width * self.init[0] * self.init[1])
        self.bn0 = nn.BatchNorm2d(width)
        # eps=0.8 as in the official code (DCGAN's BatchNorm2d(n, 0.8)).
        self.block1 = nn.Sequential(nn.Conv2d(width, width, 3, 1, 1),
                                    nn.BatchNorm2d(width, 0.8), nn.LeakyReLU(0.2))
        self.block2 = nn.Sequential(nn.Conv2d(width, width // 2, 3, 1, 1),
                                    nn.BatchNorm2d(width // 2, 0.8), nn.LeakyReLU(0.2),
                                    nn.Conv2d(width // 2, c, 3, 1, 1), nn.Tanh(),
                                    nn.BatchNorm2d(c, affine=False))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.bn0(self.fc(z).view(len(z), self.width, *self.init))
        x = self.block1(F.interpolate(x, scale_factor=2))
        x = F.interpolate(x, scale_factor=2)
        if x.shape[-2:] != self.size:  # inputs whose sides are not multiples of 4
            x = F.interpolate(x, size=self.size)
        return self.block2(x)


class DAFLLoss(nn.Module):
    """L_G = one_hot * L_oh + activation * L_a + entropy * L_ie on the teacher's logits and
    output-layer features for generated samples; ``terms`` gives each part."""

    def __init__(self, one_hot: float = 1.0, activation: float = 0.1, entropy: float = 5.0):
        super().__init__()
        self.weights = {"one-hot": one_hot, "activation": activation, "entropy": entropy}

    @staticmethod
    def terms(logits: torch.Tensor, features: torch.Tensor) -> dict[str, torch.Tensor]:
        mean_p = F.softmax(logits, dim=1).mean(dim=0)
        return {
            "one-hot": F.cross_entropy(logits, logits.argmax(dim=1)),
            "activation": -features.abs().mean(),
            "entropy": (mean_p * torch.log10(mean_p.clamp_min(1e-30))).sum(),
        }

    def forward(self, logits: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        terms = self.terms(logits, features)
        return sum(self.weights[k] * v for k, v in terms.items())


def _flat_adam(opt: torch.optim.Adam, params: list[nn.Parameter]) -> dict[str, torch.Tensor]:
    """Adam's per-parameter moments and step count as a flat name -> tensor dict."""
    out = {}
    for i, p in enumerate(params):
        for name, value in opt.state.get(p, {}).items():
            out[f"{i}.{name}"] = torch.as_tensor(value).detach().cpu().clone()
    return out


def _restore_adam(opt: torch.optim.Adam, params: list[nn.Parameter],
                  flat: dict[str, torch.Tensor]) -> None:
    for key, value in flat.items():
        i, name = key.split(".", 1)
        p = params[int(i)]
        opt.state[p][name] = value.to(p.device) if name != "step" else value.clone()


class DAFLTrainer(DataFreeTrainer):
    """Data-free KD from a generator trained on the client against the teacher."""

    method = "dafl"

    def _generator(self, spec: DatasetSpec, partition_id: int,
                   device: torch.device | str) -> tuple[Generator, torch.optim.Adam, bool]:
        """This client's generator and optimiser, from its state or new (``fresh``)."""
        seed = synthesis_generator(self.cfg, partition_id, 1).initial_seed()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # each client's generator starts from its own weights
            g = Generator(spec.input_shape, self.cfg.dafl_generator_width)
        g = g.to(device).train()
        opt = torch.optim.Adam(g.parameters(), lr=self.cfg.dafl_generator_lr)
        fresh = GENERATOR not in self.state
        if not fresh:
            g.load_state_dict(self.state[GENERATOR])
            _restore_adam(opt, list(g.parameters()), self.state.get(OPTIMIZER, {}))
        return g, opt, fresh

    def _keep(self, g: Generator, opt: torch.optim.Adam) -> None:
        self.state[GENERATOR] = {k: v.detach().cpu().clone() for k, v in g.state_dict().items()}
        self.state[OPTIMIZER] = _flat_adam(opt, list(g.parameters()))

    def generator_step(self, g: Generator, opt: torch.optim.Adam, teacher: nn.Module,
                       z_gen: torch.Generator, device: torch.device | str,
                       loss: DAFLLoss) -> tuple[torch.Tensor, torch.Tensor]:
        """One step of G on L_G; returns the step's samples and the teacher's logits on
        them (both detached), the student's next batch."""
        z = torch.randn((self.cfg.dafl_batch_size, LATENT), generator=z_gen).to(device)
        x = g(z)
        logits, features = logits_and_features(teacher, x)
        opt.zero_grad(set_to_none=True)
        loss(logits, features).backward()
        opt.step()
        return x.detach(), logits.detach()

    def batches(self, data: ClientData, generator: torch.Generator,
                device: torch.device | str = "cpu") -> Iterator[torch.Tensor]:
        from fedtl.registry import DATASETS
        from fedtl.synthetic import save_preview

        spec = DATASETS.get(self.cfg.dataset)
        teacher = self.teacher(device)
        client = self.client_key(data)
        g, opt, fresh = self._generator(spec, client, device)
        loss = DAFLLoss()
        if fresh and self.cfg.dafl_warmup_steps:
            with progress_bar(self.cfg.dafl_warmup_steps,
                              f"client {client}: dafl generator") as bar:
                for _ in range(self.cfg.dafl_warmup_steps):
                    self.generator_step(g, opt, teacher, generator, device, loss)
                    bar.update(1)
        self._keep(g, opt)
        x, _ = self.generator_step(g, opt, teacher, generator, device, loss)
        save_preview(self.cfg, client, self.method, x, teacher)
        while True:
            self._keep(g, opt)
            yield x  # no augmentation: the generator already gives fresh samples every step
            x, _ = self.generator_step(g, opt, teacher, generator, device, loss)

    def num_examples(self, data: ClientData) -> int:
        return self.cfg.local_steps * self.cfg.dafl_batch_size
