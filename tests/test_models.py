"""Models are sized from the dataset and produce class logits."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedtl.config import BATCH_NORM_MODELS, ConfigError, make_config
from fedtl.data.datasets import CIFAR10, DIGITS, MNIST, SYNTHETIC
from fedtl.models import build_model


@pytest.mark.parametrize("name", ["mlr", "dnn", "cnn", "lenet5", "dann-mnist", "resnet18"])
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
    # DANN's MNIST network: conv 32, conv 48 (5x5, 28x28 padded as LeNet's), 100, 100, 10
    dann = (1 * 32 * 25 + 32) + (32 * 48 * 25 + 48) + (48 * 5 * 5 * 100 + 100) + 100 * 101 + 1010
    assert count(build_model("dann-mnist", MNIST)) == dann
    bn = {"batch-norm": True}
    assert count(build_model("dann-mnist", MNIST, cfg=bn)) == dann + 2 * (32 + 48 + 100 + 100)


@pytest.mark.parametrize("name", BATCH_NORM_MODELS)
def test_batch_norm_option_adds_a_norm_before_each_hidden_relu(name):
    plain = build_model(name, MNIST, seed=0)
    normed = build_model(name, MNIST, seed=0, cfg={"batch-norm": True})
    relus = sum(isinstance(m, nn.ReLU) for m in plain.modules())
    norms = [m for m in normed.modules() if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d)]
    assert not any(isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d) for m in plain.modules())
    assert len(norms) == relus
    assert normed(torch.zeros(2, *MNIST.input_shape)).shape == (2, 10)


def test_batch_norm_is_refused_for_models_without_the_option():
    with pytest.raises(ConfigError, match="'batch-norm' = true: model 'mlr'.*accepted"):
        make_config({"model": "mlr", "batch-norm": True})


def test_initialisation_is_seeded():
    a = build_model("cnn", DIGITS, seed=1).state_dict()
    b = build_model("cnn", DIGITS, seed=1).state_dict()
    c = build_model("cnn", DIGITS, seed=2).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
