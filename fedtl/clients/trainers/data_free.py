"""Data-free distillation: what class impressions, ZSKD and DAFL share.

The client trains the student without touching its data: a *transfer set* is synthesised
from the frozen teacher on the client, kept in the client's persistent state
(``fedtl.clients.state.ClientStateStore``, on the client's disk: it is made once per client,
not every round, and never leaves the client), and the student learns the teacher's softened
predictions on it (the soft term of ``fedtl.clients.trainers.kd`` only; there are no
labels). The client's own splits serve only to score the student.
"""

from __future__ import annotations

import math
import sys
from abc import abstractmethod
from collections.abc import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedtl.clients.trainers.kd import DistillationTrainer
from fedtl.config import RunConfig
from fedtl.data import ClientData
from fedtl.data.datasets import DatasetSpec


def input_range(cfg: RunConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Lowest and highest valid value of each input channel in the normalised input space
    (raw values 0 and 1 after the dataset's normalisation), shaped to broadcast over a
    batch: (C, 1, 1) for images, (1,) for feature vectors."""
    from fedtl.registry import DATASETS

    # the dataset's own normalisation: also known on a SuperNode that holds only its data
    spec = DATASETS.get(cfg.dataset)
    mean = torch.tensor(spec.mean, dtype=torch.float32)
    std = torch.tensor(spec.std, dtype=torch.float32)
    lo, hi = (0 - mean) / std, (1 - mean) / std
    if spec.is_image:
        return lo.view(-1, 1, 1), hi.view(-1, 1, 1)
    return lo, hi


def random_affine(x: torch.Tensor, generator: torch.Generator, shift_px: float = 2.0,
                  degrees: float = 5.0, scale: tuple[float, float] = (0.95, 1.05),
                  fill: torch.Tensor | float = 0.0) -> torch.Tensor:
    """Each image of ``x`` (N, C, H, W) moved by its own random shift (up to ``shift_px``
    pixels), rotation (up to ``degrees``) and scale; uncovered pixels get ``fill``.
    Differentiable in ``x``."""
    n, _, h, w = x.shape

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n, generator=generator)

    angle = uniform(-1, 1) * math.radians(degrees)
    zoom = uniform(*scale)
    tx, ty = uniform(-1, 1) * 2 * shift_px / w, uniform(-1, 1) * 2 * shift_px / h
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
    grid = F.affine_grid(theta.to(x), list(x.shape), align_corners=False)
    # grid_sample pads with zeros: shift so that "zero" is the fill value.
    return F.grid_sample(x - fill, grid, align_corners=False) + fill


def balanced_classes(n: int, num_classes: int) -> torch.Tensor:
    """``n`` class indices, as equal a share per class as ``n`` allows, in class order."""
    counts = [n // num_classes + (1 if c < n % num_classes else 0) for c in range(num_classes)]
    return torch.cat([torch.full((k,), c, dtype=torch.int64) for c, k in enumerate(counts)])


def synthesis_generator(cfg: RunConfig, partition_id: int, purpose: int) -> torch.Generator:
    """A generator seeded by (seed, client, purpose): each client synthesises its own set."""
    seed = np.random.SeedSequence([cfg.seed, partition_id, 0xD157, purpose])
    return torch.Generator().manual_seed(int(seed.generate_state(1, np.uint64)[0] >> 1))


class _Lines:
    """A stream that turns tqdm's carriage-return redraws into whole lines, so progress shows
    where output is read line by line (Ray forwards a client's stderr that way)."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> None:
        text = text.replace("\r", "\n").strip()
        if text:
            self.stream.write(text + "\n")

    def flush(self) -> None:
        self.stream.flush()


def progress_bar(total: int, desc: str):
    """A tqdm bar on stderr for synthesis: redrawn in place on a terminal, one line every
    10 s elsewhere (a Ray actor's stderr, which the driver shows line by line)."""
    from tqdm.auto import tqdm

    if sys.stderr.isatty():
        return tqdm(total=total, desc=desc, file=sys.stderr, dynamic_ncols=True,
                    mininterval=2.0, leave=False)
    return tqdm(total=total, desc=desc, file=_Lines(sys.stderr), ncols=80, mininterval=10.0,
                ascii=True)


SYNTHESIS_GROUP = 256  # inputs optimised together (they do not interact: each has its own loss)


def synthesise_inputs(targets: torch.Tensor, loss: Callable[[torch.Tensor, torch.Tensor],
                                                            torch.Tensor],
                      input_shape: tuple[int, ...], steps: int, lr: float,
                      bounds: tuple[torch.Tensor, torch.Tensor], generator: torch.Generator,
                      device: torch.device | str, desc: str) -> torch.Tensor:
    """One input per entry of ``targets``: uniform noise in ``bounds`` after ``steps`` Adam
    steps on ``loss(x, targets_of_x)`` (summed over the group, so each input follows its own
    loss), clipped to ``bounds`` after every step; groups of ``SYNTHESIS_GROUP``."""
    lo, hi = bounds
    out = []
    with progress_bar(steps * -(-len(targets) // SYNTHESIS_GROUP), desc) as bar:
        for start in range(0, len(targets), SYNTHESIS_GROUP):
            t = targets[start:start + SYNTHESIS_GROUP].to(device)
            noise = torch.rand((len(t), *input_shape), generator=generator).to(device)
            x = (lo + (hi - lo) * noise).requires_grad_(True)
            opt = torch.optim.Adam([x], lr=lr)
            for _ in range(steps):
                opt.zero_grad(set_to_none=True)
                loss(x, t).backward()
                opt.step()
                with torch.no_grad():
                    x.copy_(torch.maximum(torch.minimum(x, hi), lo))
                bar.update(1)
            out.append(x.detach())
    return torch.cat(out)


class DataFreeTrainer(DistillationTrainer):
    """A student distilled on inputs made from the teacher alone (soft term, no labels)."""

    method: str = "data-free"
    shows_client_progress = True  # synthesis takes minutes: show the clients' bars

    @classmethod
    def preflight(cls, cfg: RunConfig) -> None:
        from fedtl.config import ConfigError
        from fedtl.registry import DATASETS

        spec = DATASETS.get(cfg.dataset)
        if not spec.is_image:
            raise ConfigError(
                f"config key 'trainer' = {cfg.trainer!r} synthesises images, but dataset "
                f"{cfg.dataset!r} has feature vectors of shape {spec.input_shape}. Accepted "
                "for it: kd, kd-noise")
        super().preflight(cfg)

    def loss(self, model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        return self.kd(batch.device)(model(batch), batch)

    def augment(self, x: torch.Tensor, generator: torch.Generator,
                lo: torch.Tensor) -> torch.Tensor:
        """The student's augmentation of a transfer batch (``distill-augment``)."""
        if not self.cfg.distill_augment or x.dim() != 4:
            return x
        return random_affine(x, generator, shift_px=2.0, degrees=15.0, scale=(0.9, 1.1),
                             fill=lo.to(x.device))


class TransferSetTrainer(DataFreeTrainer):
    """Data-free KD on a fixed transfer set synthesised once per client."""

    @abstractmethod
    def set_size(self) -> int:
        """Synthetic samples per client (the method's budget key)."""

    @abstractmethod
    def synthesise(self, teacher: nn.Module, spec: DatasetSpec, n: int,
                   generator: torch.Generator, device: torch.device | str,
                   bounds: tuple[torch.Tensor, torch.Tensor], partition_id: int) -> torch.Tensor:
        """``n`` inputs made from ``teacher`` alone, within ``bounds`` (normalised space)."""

    def keeps_after_evaluation(self, key: str) -> bool:
        return key == f"{self.method}-transfer-set"  # seeded by the client's key alone

    def transfer_set(self, partition_id: int, device: torch.device | str) -> torch.Tensor:
        """This client's transfer set: from its state, or synthesised now and kept there
        (``partition_id``: the client's key, which seeds the synthesis)."""
        key = f"{self.method}-transfer-set"
        if key not in self.state:
            from fedtl.registry import DATASETS
            from fedtl.synthetic import save_preview

            teacher = self.teacher(device)
            bounds = input_range(self.cfg)
            x = self.synthesise(teacher, DATASETS.get(self.cfg.dataset), self.set_size(),
                                synthesis_generator(self.cfg, partition_id, 0), device,
                                (bounds[0].to(device), bounds[1].to(device)), partition_id)
            if not bool(torch.isfinite(x).all()):
                bad = int((~torch.isfinite(x)).flatten(1).any(1).sum())
                raise RuntimeError(
                    f"{self.method}: {bad} of {len(x)} synthesised samples of client "
                    f"{partition_id} have non-finite values (the synthesis diverged); lower "
                    f"synthesis-lr (now {self.cfg.synthesis_lr}). Nothing was kept.")
            self.state[key] = {"x": x.detach().cpu()}
            save_preview(self.cfg, partition_id, self.method, x, teacher)
        return self.state[key]["x"].to(device)

    def batches(self, data: ClientData, generator: torch.Generator,
                device: torch.device | str = "cpu") -> Iterator[torch.Tensor]:
        x = self.transfer_set(self.client_key(data), device)
        lo = input_range(self.cfg)[0]
        n, size = len(x), self.cfg.batch_size
        while True:
            order = torch.randperm(n, generator=generator).to(x.device)
            for start in range(0, n, size):
                idx = order[start:start + size]
                if start > 0 and len(idx) < size:
                    break
                yield self.augment(x[idx], generator, lo)

    def num_examples(self, data: ClientData) -> int:
        return self.set_size()
