"""Random views of image batches for self-supervised trainers (torchvision.transforms.v2).

Each dataset gets a default pipeline that suits its images: handwritten digits are never
flipped (a flipped 2 is no digit) and keep most of their area; photos get SimCLR's CIFAR
recipe (crop, flip, colour jitter, grayscale) with MoCo's CIFAR crop scale. Views are drawn
in [0, 1] pixel space and normalised back, so colour jitter and fill values mean what
torchvision expects.

torchvision's v2 transforms draw one set of random parameters per call, so one call on a whole
batch would crop every image alike. ``Views`` therefore transforms the batch in groups of
``group`` images, each group with its own draw: per-image calls cost several times more on a
CPU (one v2 call costs ~1 ms whatever its size), while in-batch groups still give a positive
pair two independent draws.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torchvision.transforms import v2

from fedtl.data.datasets import DatasetSpec

HANDWRITTEN = ("digits", "digits-28", "mnist", "usps", "emnist")


def handwritten(spec: DatasetSpec) -> v2.Transform:
    """Digits: a crop keeping most of the area, small rotation / shear / shift; no flip.

    Tiny images (8x8) lose a digit's identity sooner: their crops keep 70% of the area and
    they are not sheared.
    """
    size = spec.input_shape[1:]
    tiny = size[0] < 16
    return v2.Compose([
        v2.RandomResizedCrop(size, scale=(0.7 if tiny else 0.5, 1.0), ratio=(0.8, 1.25),
                             antialias=True),
        v2.RandomAffine(degrees=10 if tiny else 15, translate=(0.1, 0.1),
                        shear=None if tiny else 10),
    ])


def grayscale_objects(spec: DatasetSpec) -> v2.Transform:
    """Grayscale objects (Fashion-MNIST): crops of 30-100% of the area, horizontal flips."""
    size = spec.input_shape[1:]
    return v2.Compose([
        v2.RandomResizedCrop(size, scale=(0.3, 1.0), antialias=True),
        v2.RandomHorizontalFlip(),
    ])


def photos(spec: DatasetSpec) -> v2.Transform:
    """Colour photos: SimCLR's recipe at colour strength 0.5 (flip, colour jitter
    0.4/0.4/0.4/0.1 with p 0.8, grayscale with p 0.2) with crops of 20-100% of the image
    (MoCo's CIFAR scale; SimCLR crops 8-100%). Barlow Twins' ImageNet recipe adds blur and
    solarisation, left out at these image sizes."""
    size = spec.input_shape[1:]
    return v2.Compose([
        v2.RandomResizedCrop(size, scale=(0.2, 1.0), antialias=True),
        v2.RandomHorizontalFlip(),
        v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        v2.RandomGrayscale(p=0.2),
    ])


AUGMENTATIONS: dict[str, Callable[[DatasetSpec], v2.Transform]] = {
    **{name: handwritten for name in HANDWRITTEN},
    "fashion-mnist": grayscale_objects,
    "cifar10": photos,
}


def default_augmentation(spec: DatasetSpec) -> v2.Transform:
    """The dataset's pipeline; unknown datasets: handwritten-style for one channel (no flip
    is the safe choice), photos for three."""
    if not spec.is_image:
        raise ValueError(f"dataset {spec.name!r} has no images to augment")
    if spec.name in AUGMENTATIONS:
        return AUGMENTATIONS[spec.name](spec)
    return handwritten(spec) if spec.input_shape[0] == 1 else photos(spec)


class Views:
    """Draws augmented views of normalised image batches, reproducibly from a generator."""

    def __init__(self, transform: v2.Transform, mean: tuple[float, ...], std: tuple[float, ...],
                 group: int = 8):
        self.transform = transform
        view = (1, -1, 1, 1) if len(mean) > 1 else (1, 1, 1, 1)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(view)
        self.std = torch.tensor(std, dtype=torch.float32).view(view)
        self.group = group

    def __call__(self, x: torch.Tensor, generator: torch.Generator, count: int = 2
                 ) -> list[torch.Tensor]:
        """``count`` independently augmented views of the normalised batch ``x``."""
        mean, std = self.mean.to(x.device), self.std.to(x.device)
        pixels = (x * std + mean).clamp(0, 1)
        # v2 draws its parameters from torch's global generator: seed a private fork of it
        # from the batch generator so that a run's views depend only on its seed.
        seed = int(torch.randint(2**62, (1,), generator=generator))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return [(torch.cat([self.transform(g) for g in pixels.split(self.group)]) - mean)
                    / std for _ in range(count)]
