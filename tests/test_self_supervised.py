"""Self-supervised trainers (instance spreading, Barlow Twins), the probe and kNN, labelled
fractions, parts kept on the client, and a federated run through Flower + Ray."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord

from fedtl.clients.client_app import LOCAL_PARTS, _receive, _shared_weights
from fedtl.clients.state import ClientStateStore
from fedtl.clients.trainers.barlow_twins import BarlowTwinsLoss, barlow_twins_loss
from fedtl.clients.trainers.instance_spreading import (
    instance_spreading_loss,
    symmetric_spreading_loss,
)
from fedtl.clients.trainers.self_supervised import encoder_scores, labelled_union
from fedtl.config import ConfigError, make_config
from fedtl.data import federated_data
from fedtl.data.augment import default_augmentation
from fedtl.data.datasets import CIFAR10, DIGITS, FASHION_MNIST, MNIST
from fedtl.probe import fit_linear_probe, knn_score
from fedtl.registry import TRAINERS
from fedtl.results import RunDirectory
from fedtl.server_app import build_summary
from fedtl.simulation import preflight, simulate

SSL = {"trainer": "instance-spreading", "model": "lenet5", "num-clients": 3,
       "batch-size": 16}


def unit(*rows):
    return F.normalize(torch.tensor(rows, dtype=torch.float64), dim=1)


# --- instance spreading ----------------------------------------------------------------------

def test_instance_spreading_matches_hand_computed_values():
    # orthogonal instances, exact views, tau = 1:
    # P(i|x^_i) = e / (e + 1), P(i|x_j) = 1 / (1 + e)  ->  J / N = 2 log(1 + 1/e)
    f = unit([1, 0], [0, 1])
    assert float(instance_spreading_loss(f, f, 1.0)) == pytest.approx(
        2 * math.log(1 + math.exp(-1)), rel=1e-9)
    # views closer to the other instance (f^_1 . f_1 = 0.6, f^_1 . f_2 = 0.8), tau = 0.5:
    # -log P(i|x^_i) = log(1 + e^0.4), -log(1 - P(i|x_j)) = log(1 + e^-2), each twice, / N = 2
    f_hat = unit([0.6, 0.8], [0.8, 0.6])
    assert float(instance_spreading_loss(f, f_hat, 0.5)) == pytest.approx(
        math.log(1 + math.exp(0.4)) + math.log(1 + math.exp(-2)), rel=1e-9)


def test_instance_spreading_loss_decreases_as_positives_align():
    g = torch.Generator().manual_seed(0)
    f = F.normalize(torch.randn(16, 8, generator=g), dim=1)
    other = F.normalize(torch.randn(16, 8, generator=g), dim=1)
    losses = [float(instance_spreading_loss(f, F.normalize((1 - t) * other + t * f, dim=1), 0.1))
              for t in (0.0, 0.25, 0.5, 0.75, 1.0)]
    assert all(a > b for a, b in itertools.pairwise(losses)), losses


def test_instance_spreading_loss_rewards_spread_instances():
    spread = unit([1, 0, 0], [0, 1, 0], [0, 0, 1])
    crowded = unit([1, 0.1, 0], [1, 0, 0.1], [1, 0.1, 0.1])
    assert instance_spreading_loss(spread, spread, 0.1) < instance_spreading_loss(
        crowded, crowded, 0.1)


def test_symmetric_spreading_matches_hand_computed_values():
    # orthogonal instances, exact views, tau = 1: every anchor sees its positive at
    # similarity 1 and two others at 0 (its own similarity is left out), so
    # P(pos) = e / (e + 2), P(other) = 1 / (e + 2), four anchors, two negatives each, / 2N = 4
    f = unit([1, 0], [0, 1])
    z = math.e + 2
    expected = -(math.log(math.e / z) + 2 * math.log(1 - 1 / z))
    assert float(symmetric_spreading_loss(f, f, 1.0)) == pytest.approx(expected, rel=1e-9)


def test_symmetric_spreading_is_the_official_batch_criterion():
    # the official BatchCriterion's arithmetic, written out: exp similarities without the
    # diagonal, positives at the other view, log(1 - P) over the rest, / 2N; the second
    # factor of every similarity detached
    g = torch.Generator().manual_seed(1)
    f = F.normalize(torch.randn(6, 5, generator=g), dim=1).requires_grad_()
    f_hat = F.normalize(torch.randn(6, 5, generator=g), dim=1).requires_grad_()
    x = torch.cat([f, f_hat])
    n2, tau = 12, 0.1
    partner = torch.cat([x[6:], x[:6]])
    pos = (x * partner.detach()).sum(1).div(tau).exp()
    all_prob = (x @ x.detach().T).div(tau).exp() * (1 - torch.eye(n2))
    all_div = all_prob.sum(1)
    p_pos = pos / all_div
    p_on = all_prob / all_div[:, None]
    log_neg = torch.log(1 - p_on).sum(1) - torch.log(1 - p_pos)
    reference = -(torch.log(p_pos).sum() + log_neg.sum()) / n2
    ours = symmetric_spreading_loss(f, f_hat, tau)
    torch.testing.assert_close(ours, reference)
    grads = torch.autograd.grad(ours, [f, f_hat])
    expected = torch.autograd.grad(reference, [f, f_hat])
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want)


def test_symmetric_spreading_decreases_as_positives_align():
    g = torch.Generator().manual_seed(0)
    f = F.normalize(torch.randn(16, 8, generator=g), dim=1)
    other = F.normalize(torch.randn(16, 8, generator=g), dim=1)
    losses = [float(symmetric_spreading_loss(f, F.normalize((1 - t) * other + t * f, dim=1),
                                             0.1)) for t in (0.0, 0.25, 0.5, 0.75, 1.0)]
    assert all(a > b for a, b in itertools.pairwise(losses)), losses


# --- Barlow Twins ----------------------------------------------------------------------------

def test_barlow_twins_matches_hand_computed_values():
    # standardised columns: A = [[-1, 1], [1, -1]], B = [[1, -1], [-1, 1]]
    # C = A^T B / 2 = [[-1, 1], [1, -1]]  ->  L = 2 (1 - (-1))^2 + lambda (1 + 1) = 8 + 2 lambda
    z_a = torch.tensor([[1.0, 2.0], [3.0, 0.0]])
    z_b = torch.tensor([[2.0, 0.0], [0.0, 4.0]])
    assert float(barlow_twins_loss(z_a, z_b, 0.005)) == pytest.approx(8 + 2 * 0.005, rel=1e-4)
    assert float(barlow_twins_loss(z_a, z_b, 0.0)) == pytest.approx(8, rel=1e-4)


def test_barlow_twins_is_minimal_for_identical_decorrelated_views():
    # eight samples; three columns of a Hadamard matrix: zero mean, unit variance, uncorrelated
    signs = torch.tensor([[(-1.0) ** (i & j).bit_count() for j in (1, 2, 4)] for i in range(8)])
    z = signs.clone().requires_grad_(True)
    loss = barlow_twins_loss(z, z, 0.005)
    assert loss.item() == pytest.approx(0.0, abs=1e-4)  # L >= 0, so this is the minimum
    loss.backward()
    assert float(z.grad.abs().max()) < 1e-3  # a stationary point
    g = torch.Generator().manual_seed(0)
    correlated = signs.clone()
    correlated[:, 2] = signs[:, 0] + 0.5 * signs[:, 1]
    others = [signs + 0.5 * torch.randn(8, 3, generator=g), torch.randn(8, 3, generator=g),
              signs[:, [1, 0, 2]]]
    for other in others:
        assert float(barlow_twins_loss(signs, other, 0.005)) > 1e-2
    # identical but correlated views: C_ii = 1, corr(0, 2)^2 = 0.8, corr(1, 2)^2 = 0.2, each twice
    assert float(barlow_twins_loss(correlated, correlated, 0.005)) == pytest.approx(
        0.005 * 2 * (0.8 + 0.2), rel=1e-4)


def test_barlow_twins_module_owns_its_projector_and_trains():
    torch.manual_seed(0)
    module = BarlowTwinsLoss(6, projector_dim=8, lambda_=0.005)
    assert sum(p.numel() for p in module.parameters()) == 6 * 8 + 2 * 8 + 8 * 8
    x = torch.randn(32, 6)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.01)
    before = module(x, x + 0.05 * torch.randn(32, 6)).item()
    for _ in range(20):
        optimizer.zero_grad()
        loss = module(x, x + 0.05 * torch.randn(32, 6))
        loss.backward()
        optimizer.step()
    assert loss.item() < before


# --- linear probe and kNN ---------------------------------------------------------------------

def _blobs(n_per_class, classes, dim, spread, seed):
    g = torch.Generator().manual_seed(seed)
    centres = 4 * torch.randn(classes, dim, generator=torch.Generator().manual_seed(99))
    y = torch.arange(classes).repeat_interleave(n_per_class)
    return centres[y] + spread * torch.randn(len(y), dim, generator=g), y


def test_probe_and_knn_separate_a_separable_toy_set():
    x, y = _blobs(5, 4, 6, 0.5, seed=1)
    x_test, y_test = _blobs(50, 4, 6, 0.5, seed=2)
    probe = fit_linear_probe(x, y, num_classes=5)  # a fifth class never labelled
    s = probe.score(x_test, y_test)
    assert s.total == 200 and s.accuracy == 1.0
    assert s.loss_sum / s.total < 0.2
    assert knn_score(x, y, x_test, y_test, num_classes=5).accuracy == 1.0  # k capped at 20


def test_probe_is_at_chance_on_labels_unrelated_to_features():
    x, _ = _blobs(25, 4, 6, 0.5, seed=1)
    x_test, _ = _blobs(100, 4, 6, 0.5, seed=2)
    g = torch.Generator().manual_seed(3)
    y, y_test = torch.randint(4, (100,), generator=g), torch.randint(4, (400,), generator=g)
    assert fit_linear_probe(x, y, 4).score(x_test, y_test).accuracy < 0.4
    assert knn_score(x, y, x_test, y_test, 4).accuracy < 0.4


# --- labelled fractions ----------------------------------------------------------------------

def test_labelled_fraction_is_deterministic_nested_and_at_least_one():
    data = federated_data(make_config({"num-clients": 3})).client(1)
    n = len(data.train)
    small, large = data.labelled(0.05, seed=0), data.labelled(0.5, seed=0)
    assert len(small) == max(1, round(0.05 * n)) and len(large) == round(0.5 * n)
    assert torch.equal(small.x, data.labelled(0.05, seed=0).x)
    assert not torch.equal(large.x, data.labelled(0.5, seed=1).x)
    rows = {tuple(r.tolist()) for r in large.x.flatten(1)}
    assert all(tuple(r.tolist()) in rows for r in small.x.flatten(1))  # 5% inside 50%
    assert len(data.labelled(1e-6, seed=0)) == 1
    assert data.labelled(1.0, seed=0) is data.train


def test_supervised_trainer_draws_only_labelled_samples():
    cfg = make_config({"num-clients": 3, "label-fraction": 0.1, "batch-size": 4})
    data = federated_data(cfg).client(0)
    labelled = {tuple(r.tolist()) for r in data.labelled(0.1, 0).x.flatten(1)}
    batches = TRAINERS.get("supervised")(cfg).batches(data, torch.Generator().manual_seed(0))
    seen = {tuple(r.tolist()) for _ in range(20) for r in next(batches)[0].flatten(1)}
    assert seen == labelled  # every labelled sample, nothing else
    # FedAvg weighs the update by the samples it learned from: the labelled ones
    assert TRAINERS.get("supervised")(cfg).num_examples(data) == len(labelled) < len(data.train)
    # pre-training reads every train sample (its labels never)
    ssl = make_config({**SSL, "label-fraction": 0.1})
    assert TRAINERS.get("barlow-twins")(ssl).num_examples(data) == len(data.train)


# --- trainers: views, parts, config ----------------------------------------------------------

def test_views_are_reproducible_and_differ_between_views():
    cfg = make_config(SSL)
    trainer = TRAINERS.get("instance-spreading")(cfg)
    data = federated_data(cfg).client(0)
    a1, a2 = next(trainer.batches(data, torch.Generator().manual_seed(5)))
    b1, b2 = next(trainer.batches(data, torch.Generator().manual_seed(5)))
    assert torch.equal(a1, b1) and torch.equal(a2, b2)
    assert a1.shape == (16, 1, 8, 8) and not torch.allclose(a1, a2)


def _names(transform):
    return {type(t).__name__ for t in getattr(transform, "transforms", [transform])}


def test_digits_are_never_flipped_photos_are():
    for spec in (DIGITS, MNIST):
        assert "RandomHorizontalFlip" not in _names(default_augmentation(spec))
    for spec in (FASHION_MNIST, CIFAR10):
        assert "RandomHorizontalFlip" in _names(default_augmentation(spec))


@pytest.mark.parametrize("values, fragment", [
    ({"dataset": "synthetic", "model": "dnn", "partitioner": "natural"}, "feature vectors"),
    ({"model": "mlr"}, "no trainable layers"),
    ({"batch-size": 1}, "at least 2"),
])
def test_ssl_trainers_refuse_what_they_cannot_train_before_ray(values, fragment):
    for trainer in ("instance-spreading", "barlow-twins"):
        with pytest.raises(ConfigError, match=fragment):
            preflight(make_config({**SSL, **values, "trainer": trainer}))
    with pytest.raises(ConfigError, match="ssl-shared"):
        make_config({"ssl-shared": "projector"})


class _Msg:
    def __init__(self, arrays):
        self.content = {"arrays": arrays}


def test_unshared_projector_stays_on_the_client():
    cfg = make_config({**SSL, "trainer": "barlow-twins", "ssl-shared": "encoder",
                       "projector-dim": 16})
    trainer = TRAINERS.get("barlow-twins")(cfg)
    model = trainer.build_model(DIGITS, seed=0)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    shared = trainer.shared_keys(model)
    assert shared and all(k.startswith("encoder.") for k in shared)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # "training"
    state = {}
    reply = ArrayRecord(_shared_weights(model, trainer, state))
    assert set(reply.keys()) == set(shared)
    assert set(state[LOCAL_PARTS]) == set(initial) - set(shared)
    # next round: the global encoder arrives; the projector comes back from the state
    fresh = trainer.build_model(DIGITS)
    _receive(fresh, _Msg(reply), state, initial)
    assert all(torch.equal(fresh.state_dict()[k], model.state_dict()[k]) for k in initial)
    # a client that never trained starts its projector from the run's initial weights
    fresh2 = trainer.build_model(DIGITS)
    _receive(fresh2, _Msg(reply), {}, initial)
    key = "objective.projector.0.weight"
    assert torch.equal(fresh2.state_dict()[key], initial[key])


def test_pfedme_keeps_a_personalized_encoder_per_client():
    from fedtl.clients.pfedme import THETA, PFedMeSolver

    cfg = make_config({**SSL, "strategy": "pfedme", "local-steps": 2, "inner-steps": 2,
                       "personal-lr": 0.01, "lr": 0.01})
    trainer = TRAINERS.get("instance-spreading")(cfg)
    data = federated_data(cfg).client(0)
    model, scratch = trainer.build_model(DIGITS, seed=0), trainer.build_model(DIGITS)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    state = {}
    rule = PFedMeSolver(cfg, trainer, torch.device("cpu"))
    rule.train(model, data, torch.Generator().manual_seed(0), state)
    theta = state[THETA]
    key = "encoder.0.0.weight"
    assert not torch.equal(theta[key], start[key])  # theta_i moved
    assert not torch.equal(theta[key], model.state_dict()[key])  # and differs from w_i
    personal = rule.personalized(model, scratch, data, torch.Generator(), state)
    assert torch.equal(personal.state_dict()[key], theta[key])
    scores = trainer.evaluate(personal, data)
    assert {"val", "test", "probe", "knn"} <= set(scores) and scores["test"].total == len(data.test)


def test_central_probe_uses_the_clients_labelled_parts():
    cfg = make_config({**SSL, "probe-label-fraction": 0.2})
    data = federated_data(cfg)
    union = labelled_union(data, 0.2, 0)
    assert len(union) == sum(len(data.client(p).labelled(0.2, 0)) for p in range(3))
    scores = encoder_scores(cfg)  # the random-encoder baseline
    assert scores["probe_accuracy"] is None and scores["knn_accuracy"] is None  # no central set
    # with a central test set (here: client 0's test split) the server scores probe and kNN
    trainer = TRAINERS.get(cfg.trainer)(cfg)
    model = trainer.build_model(DIGITS, seed=0)
    central = data.client(0).test
    s = trainer.central_scores(model, central)
    assert set(s) == {"probe", "knn"} and s["probe"].total == s["knn"].total == len(central)
    assert s["probe"].accuracy > 0.3
    supervised = TRAINERS.get("supervised")(make_config({"model": "lenet5"}))
    assert supervised.central_scores(model, None) == {}
    assert 0.3 < scores["probe_global_accuracy"] <= 1.0
    assert 0.1 < scores["knn_global_accuracy"] <= 1.0


def test_summary_reports_every_accuracy_and_picks_personalized_keys_on_their_round():
    rounds = [
        {"round": 1, "evaluated": True, "global_val_accuracy": 0.9,
         "personalized_val_accuracy": 0.1, "probe_accuracy": 0.7, "knn_global_accuracy": 0.6,
         "knn_personalized_accuracy": 0.2},
        {"round": 2, "evaluated": True, "global_val_accuracy": 0.5,
         "personalized_val_accuracy": 0.8, "probe_accuracy": 0.75, "knn_global_accuracy": 0.5,
         "knn_personalized_accuracy": 0.4},
    ]
    summary = build_summary(make_config(), rounds, "completed", 1.0)
    assert summary["final"]["probe_accuracy"] == 0.75
    assert summary["best"]["probe_accuracy"] == 0.7  # global round 1
    assert summary["best"]["knn_global_accuracy"] == 0.6
    assert summary["best"]["knn_personalized_accuracy"] == 0.4  # personalized round 2


# --- through Flower + Ray --------------------------------------------------------------------

@pytest.mark.e2e
def test_federated_barlow_twins_run_keeps_projectors_local(tmp_path):
    cfg = make_config({**SSL, "trainer": "barlow-twins", "ssl-shared": "encoder",
                       "projector-dim": 32, "num-rounds": 3, "local-steps": 4, "lr": 0.0001,
                       "momentum": 0.9, "finetune-steps": 2, "eval-every": 2,
                       "out-dir": str(tmp_path)})
    preflight(cfg)
    run = RunDirectory.create(cfg)
    summary = simulate(cfg, run)
    assert summary["status"] == "completed" and summary["rounds_completed"] == 3
    rounds = run.rounds()
    assert [r["evaluated"] for r in rounds] == [False, True, True]
    assert all(not r["failures"] and math.isfinite(r["train_loss"]) for r in rounds)
    final = summary["final"]
    for key in ("probe_global_accuracy", "probe_personalized_accuracy", "knn_global_accuracy",
                "knn_personalized_accuracy"):
        assert 0.1 < final[key] <= 1.0, key
        assert key in summary["best"]
    assert final["global_accuracy"] == final["probe_global_accuracy"]
    assert final["probe_accuracy"] is None  # digits has no central test set
    weights = torch.load(run.path / "model.pt")
    assert weights and all(k.startswith("encoder.") for k in weights)  # projectors stay local
    assert "knn_global_accuracy" in run.table("clients.csv")[0]
    # each client's projector is in its versioned state on disk, not in the server's model
    state = ClientStateStore(run.path / "client-state", 0).load(before_round=4)
    assert state[LOCAL_PARTS] and all(k.startswith("objective.") for k in state[LOCAL_PARTS])
