"""Models are sized from the dataset and produce class logits."""

from __future__ import annotations

import pytest
import torch

from fedtl.data.datasets import CIFAR10, DIGITS, MNIST, SYNTHETIC
from fedtl.models import build_model


@pytest.mark.parametrize("name", ["mlr", "dnn", "cnn", "lenet5", "resnet18"])
@pytest.mark.parametrize("spec", [DIGITS, MNIST, CIFAR10], ids=lambda s: s.name)
def test_image_models_give_logits(name, spec):
    model = build_model(name, spec, seed=0)
    out = model(torch.zeros(2, *spec.input_shape))
    assert out.shape == (2, spec.num_classes)


@pytest.mark.parametrize("name", ["mlr", "dnn"])
def test_vector_models_give_logits(name):
    out = build_model(name, SYNTHETIC, seed=0)(torch.zeros(3, 60))
    assert out.shape == (3, 10)


def test_sizes_match_the_papers():
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(build_model("cnn", MNIST)) == 1_663_370  # McMahan et al.: 1.66M
    assert count(build_model("mlr", MNIST)) == 7_850  # 784 -> 10
    assert count(build_model("dnn", MNIST)) == 784 * 100 + 100 + 100 * 10 + 10
    assert count(build_model("dnn", SYNTHETIC)) == 60 * 20 + 20 + 20 * 10 + 10


def test_initialisation_is_seeded():
    a = build_model("cnn", DIGITS, seed=1).state_dict()
    b = build_model("cnn", DIGITS, seed=1).state_dict()
    c = build_model("cnn", DIGITS, seed=2).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
