"""Models: plain functions returning ``nn.Module``s sized from the dataset, as torchvision's.

Every model maps a batch of normalised inputs to class logits. ``build_model`` seeds the
initialisation so that the server's initial global model depends only on ``seed``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from fedtl.config import BATCH_NORM_MODELS
from fedtl.data.datasets import DatasetSpec


def _flat(spec: DatasetSpec) -> int:
    return math.prod(spec.input_shape)


def mlr(spec: DatasetSpec) -> nn.Module:
    """Multinomial logistic regression: one linear layer on the flattened input."""
    return nn.Sequential(nn.Flatten(), nn.Linear(_flat(spec), spec.num_classes))


def dnn(spec: DatasetSpec) -> nn.Module:
    """pFedMe's DNN: one hidden ReLU layer, 100 units for images, 20 for feature vectors."""
    hidden = 100 if spec.is_image else 20
    return nn.Sequential(
        nn.Flatten(), nn.Linear(_flat(spec), hidden), nn.ReLU(), nn.Linear(hidden, spec.num_classes)
    )


def _conv_out(features: nn.Module, spec: DatasetSpec) -> int:
    with torch.no_grad():
        return int(features(torch.zeros(1, *spec.input_shape)).numel())


def _norm(width: int, conv: bool, batch_norm: bool) -> list[nn.Module]:
    """A batch-norm layer for ``width`` channels / units, or nothing."""
    if not batch_norm:
        return []
    return [nn.BatchNorm2d(width) if conv else nn.BatchNorm1d(width)]


def cnn(spec: DatasetSpec, batch_norm: bool = False) -> nn.Module:
    """McMahan et al. (2017)'s CNN: two 5x5 conv layers (32, 64) with 2x2 max-pooling,
    a 512-unit ReLU layer and the output layer (1.66M parameters on MNIST).
    ``batch_norm`` puts a batch-norm layer before every hidden ReLU."""
    c = spec.input_shape[0]
    features = nn.Sequential(
        nn.Conv2d(c, 32, 5, padding=2), *_norm(32, True, batch_norm), nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 5, padding=2), *_norm(64, True, batch_norm), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(),
    )
    return nn.Sequential(
        features, nn.Linear(_conv_out(features, spec), 512), *_norm(512, False, batch_norm),
        nn.ReLU(), nn.Linear(512, spec.num_classes),
    )


def _lenet(spec: DatasetSpec, conv1: int, conv2: int, fc1: int, fc2: int,
           batch_norm: bool = False) -> nn.Module:
    """conv5x5 (conv1) - pool - conv5x5 (conv2) - pool - fc1 - fc2 - classes (ReLU, max-pool).

    28x28 inputs are padded by 2 as in the original 32x32 setting; inputs under 16 pixels
    wide (8x8 digits) pad the second convolution too. ``batch_norm`` puts a batch-norm layer
    before every hidden ReLU.
    """
    c, h = spec.input_shape[0], spec.input_shape[1]
    bn = batch_norm
    features = nn.Sequential(
        nn.Conv2d(c, conv1, 5, padding=2 if h < 32 else 0), *_norm(conv1, True, bn), nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(conv1, conv2, 5, padding=2 if h < 16 else 0), *_norm(conv2, True, bn),
        nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
    )
    return nn.Sequential(
        features, nn.Linear(_conv_out(features, spec), fc1), *_norm(fc1, False, bn), nn.ReLU(),
        nn.Linear(fc1, fc2), *_norm(fc2, False, bn), nn.ReLU(),
        nn.Linear(fc2, spec.num_classes),
    )


def lenet5(spec: DatasetSpec, batch_norm: bool = False) -> nn.Module:
    """LeNet-5: conv5x5x6 - pool - conv5x5x16 - pool - 120 - 84 - classes (see ``_lenet``)."""
    return _lenet(spec, 6, 16, 120, 84, batch_norm)


def lenet5_half(spec: DatasetSpec, batch_norm: bool = False) -> nn.Module:
    """LeNet-5-half, the student of ZSKD and DAFL: LeNet-5 with half the channels and units
    (conv5x5x3 - pool - conv5x5x8 - pool - 60 - 42 - classes)."""
    return _lenet(spec, 3, 8, 60, 42, batch_norm)


def dann_mnist(spec: DatasetSpec, batch_norm: bool = False) -> nn.Module:
    """Ganin & Lempitsky (2015)'s MNIST network for DANN: conv5x5x32 - pool - conv5x5x48 -
    pool - 100 - 100 - classes (see ``_lenet``); DANN's reversal layer sits after the
    convolutions. The paper's network has no batch norm; common PyTorch re-implementations
    add it (``batch_norm``)."""
    return _lenet(spec, 32, 48, 100, 100, batch_norm)


def parse_hidden(text: str) -> tuple[int, ...]:
    """Hidden-layer widths from text such as ``"800,800"``; raises ValueError when malformed."""
    parts = [p.strip() for p in str(text).split(",")]
    if not parts or any(not p.isdigit() or int(p) < 1 for p in parts):
        raise ValueError(f"{text!r} is not a comma-separated list of positive widths")
    return tuple(int(p) for p in parts)


def mlp(spec: DatasetSpec, hidden: Sequence[int] = (800, 800)) -> nn.Module:
    """A fully connected ReLU net on the flattened input with the given hidden widths
    (Hinton et al.'s MNIST student is 2x800, their teacher 2x1200)."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = _flat(spec)
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, spec.num_classes))
    return nn.Sequential(*layers)


def resnet18(spec: DatasetSpec) -> nn.Module:
    """torchvision's ResNet-18; for inputs of 32 pixels or fewer the stem is a 3x3 stride-1
    convolution without max-pooling (the usual CIFAR variant)."""
    from torchvision.models import resnet18 as tv_resnet18

    model = tv_resnet18(num_classes=spec.num_classes)
    c, h = spec.input_shape[0], spec.input_shape[1]
    if h <= 32:
        model.conv1 = nn.Conv2d(c, 64, 3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    elif c != 3:
        model.conv1 = nn.Conv2d(c, 64, 7, stride=2, padding=3, bias=False)
    return model


def model_options(name: str, cfg: Mapping[str, Any] | None) -> dict[str, Any]:
    """Keyword arguments a model factory takes from a run config (``mlp``: ``mlp-hidden``;
    the convolutional nets: ``batch-norm``)."""
    if cfg is None:
        return {}
    if name == "mlp" and "mlp-hidden" in cfg:
        return {"hidden": parse_hidden(cfg["mlp-hidden"])}
    if name in BATCH_NORM_MODELS and cfg.get("batch-norm"):
        return {"batch_norm": True}
    return {}


def build_model(name: str, spec: DatasetSpec, seed: int | None = None,
                cfg: Mapping[str, Any] | None = None, **options: Any) -> nn.Module:
    """The registered model ``name`` for ``spec``; initialised from ``seed`` when given.

    Options the architecture takes from the run config (``mlp-hidden``, ``batch-norm``) are read from
    ``cfg``; explicit ``options`` override them.
    """
    from fedtl.registry import MODELS

    factory = MODELS.get(name)
    kwargs = {**model_options(name, cfg), **options}
    if seed is None:
        return factory(spec, **kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return factory(spec, **kwargs)
