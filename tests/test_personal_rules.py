"""Ditto's and local-only's update rules on toy problems, and held-out (unseen) clients."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord

from fedtl.clients.ditto import PERSONAL, Ditto
from fedtl.clients.local_only import OWN, LocalOnly
from fedtl.clients.local_sgd import LocalSGD
from fedtl.clients.trainers.supervised import SupervisedTrainer
from fedtl.config import ConfigError, make_config
from fedtl.data import ClientData, Split
from fedtl.server_app import summarize_clients, without_global
from fedtl.strategies import held_out_partitions
from fedtl.strategies.fedavg import FedAvg
from fedtl.strategies.local import LocalOnly as LocalOnlyStrategy

H = torch.tensor([1.0, 4.0, 0.5])   # curvature of the quadratic f
C = torch.tensor([2.0, -1.0, 3.0])  # minimiser of f
CPU = torch.device("cpu")


class Quadratic(torch.nn.Module):
    def __init__(self, start):
        super().__init__()
        self.theta = torch.nn.Parameter(torch.as_tensor(start, dtype=torch.float32).clone())


class QuadraticTrainer:
    """f(theta) = 1/2 sum_j H_j (theta_j - C_j)^2 on every batch: plain gradient descent."""

    def __init__(self, cfg=None):
        self.cfg = cfg

    def batches(self, data, generator, device="cpu"):
        while True:
            yield None

    def loss(self, model, batch):
        return 0.5 * (H * (model.theta - C) ** 2).sum()


def prox(w, lam):
    """argmin_v f(v) + lam/2 ||v - w||^2 in closed form."""
    return (H * C + lam * w) / (H + lam)


def _empty():
    empty = Split(torch.zeros(0, 1), torch.zeros(0, dtype=torch.long))
    return ClientData(0, empty, empty, empty)


def _classification_data(seed=0, n=64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=g)
    y = (x[:, 0] > 0).long()
    split = Split(x, y)
    return ClientData(0, split, split, split)


def _linear(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Linear(5, 2)


def test_ditto_personal_model_converges_to_the_prox_of_the_received_global_model():
    lam = 2.0
    cfg = make_config({"strategy": "ditto", "ditto-lambda": lam, "local-steps": 600,
                       "lr": 0.05})
    w = torch.tensor([0.0, 1.0, -2.0])
    model, state = Quadratic(w), {}
    Ditto(cfg, QuadraticTrainer(cfg), CPU).train(model, _empty(), torch.Generator(), state)
    v = state[PERSONAL]["theta"]
    # anchored at the w the client RECEIVED, not at its own updated copy
    assert torch.allclose(v, prox(w, lam), atol=1e-4)
    assert not torch.allclose(v, prox(model.theta.detach(), lam), atol=1e-2)
    # lambda = 0: v is plain local training, reaching f's minimiser
    cfg0 = cfg.replace(ditto_lambda=0.0)
    state0 = {}
    Ditto(cfg0, QuadraticTrainer(cfg0), CPU).train(Quadratic(w), _empty(), torch.Generator(),
                                                   state0)
    assert torch.allclose(state0[PERSONAL]["theta"], C, atol=1e-4)


class ScheduledQuadraticTrainer(QuadraticTrainer):
    """The quadratic with a learning-rate schedule, as DANN's annealing is given."""

    def __init__(self, scale):
        super().__init__()
        self.scale = scale

    def lr_scale(self, batch):
        return self.scale


def test_ditto_personal_steps_follow_the_trainers_learning_rate_schedule():
    cfg = make_config({"strategy": "ditto", "ditto-lambda": 1.0, "local-steps": 1, "lr": 0.1})
    w = torch.tensor([0.0, 1.0, -2.0])
    # a schedule at zero freezes both w and v_i
    state = {}
    model = Quadratic(w)
    Ditto(cfg, ScheduledQuadraticTrainer(0.0), CPU).train(model, _empty(), torch.Generator(),
                                                          state)
    assert torch.equal(model.theta.detach(), w)
    assert torch.equal(state[PERSONAL]["theta"], w)
    # one step at lr 0.1 * 0.5 from v = w (the proximal gradient is zero there)
    state = {}
    Ditto(cfg, ScheduledQuadraticTrainer(0.5), CPU).train(Quadratic(w), _empty(),
                                                          torch.Generator(), state)
    assert torch.allclose(state[PERSONAL]["theta"], w - 0.05 * H * (w - C))


def test_ditto_replies_exactly_what_fedavg_replies_and_keeps_v_apart():
    cfg = make_config({"strategy": "ditto", "local-steps": 7, "lr": 0.1, "batch-size": 8,
                       "ditto-lambda": 0.5})
    data, trainer = _classification_data(), SupervisedTrainer(cfg)
    fedavg_model, ditto_model, state = _linear(), _linear(), {}
    LocalSGD(cfg, trainer, CPU).train(fedavg_model, data, torch.Generator().manual_seed(5), {})
    metrics = Ditto(cfg, trainer, CPU).train(ditto_model, data,
                                             torch.Generator().manual_seed(5), state)
    for key, value in fedavg_model.state_dict().items():
        assert torch.equal(ditto_model.state_dict()[key], value), key
    v = state[PERSONAL]
    assert not torch.equal(v["weight"], ditto_model.weight.detach())
    assert np.isfinite(metrics["personal-loss"])
    # v carries over: the next round starts from it, not from the new global model
    before = {k: t.clone() for k, t in v.items()}
    Ditto(cfg.replace(lr=1e-9), trainer, CPU).train(_linear(seed=3), data, torch.Generator(),
                                                    state)
    assert torch.allclose(state[PERSONAL]["weight"], before["weight"], atol=1e-6)


def test_ditto_personalized_is_v_or_solved_from_the_global_model_when_absent():
    lam = 3.0
    cfg = make_config({"strategy": "ditto", "ditto-lambda": lam, "local-steps": 600,
                       "lr": 0.05})
    rule = Ditto(cfg, QuadraticTrainer(cfg), CPU)
    kept = {PERSONAL: {"theta": torch.tensor([7.0, 8.0, 9.0])}}
    out = rule.personalized(Quadratic([0, 0, 0]), Quadratic([0, 0, 0]), _empty(),
                            torch.Generator(), kept)
    assert torch.equal(out.theta.detach(), torch.tensor([7.0, 8.0, 9.0]))
    w = torch.tensor([1.0, 1.0, 1.0])
    global_model = Quadratic(w)
    out = rule.personalized(global_model, Quadratic([0, 0, 0]), _empty(), torch.Generator(), {})
    assert torch.allclose(out.theta.detach(), prox(w, lam), atol=1e-4)
    assert torch.equal(global_model.theta.detach(), w), "the global model is left unchanged"


def test_local_only_trains_its_own_model_across_rounds_and_sends_nothing_learned():
    lr, steps = 0.1, 5
    cfg = make_config({"strategy": "local", "local-steps": steps, "lr": lr})
    rule = LocalOnly(cfg, QuadraticTrainer(cfg), CPU)
    init = torch.tensor([0.0, 0.0, 0.0])
    state = {}
    for _ in range(2):  # two rounds: the server always sends the initial weights
        model = Quadratic(init)
        rule.train(model, _empty(), torch.Generator(), state)
        assert torch.equal(model.theta.detach(), init), "the reply is the received weights"
    # gradient descent on f: theta_k - C = (1 - lr H)^k (theta_0 - C), k = 2 rounds x steps
    expected = C + (1 - lr * H) ** (2 * steps) * (init - C)
    assert torch.allclose(state[OWN]["theta"], expected, atol=1e-5)
    out = rule.personalized(Quadratic(init), Quadratic(init), _empty(), torch.Generator(), state)
    assert torch.equal(out.theta.detach(), state[OWN]["theta"])
    # a client without a model of its own trains finetune-steps from the weights it is sent
    fresh = rule.personalized(Quadratic(init), Quadratic(init), _empty(), torch.Generator(), {})
    k = cfg.finetune_steps
    assert torch.allclose(fresh.theta.detach(), C + (1 - lr * H) ** k * (init - C), atol=1e-5)


def test_local_only_server_never_changes_the_weights(monkeypatch):
    strategy = LocalOnlyStrategy(clients={11: 0, 22: 1}, seed=0)
    start = ArrayRecord({"w": Array(np.array([1.0, 2.0], dtype=np.float32))})
    strategy._global = start
    monkeypatch.setattr(strategy, "in_partition_order", lambda replies: [])
    arrays, _ = strategy.aggregate_train(3, [])
    assert arrays is start


def test_unseen_clients_are_drawn_from_the_seed_and_never_trained():
    cfg = make_config({"num-clients": 20, "unseen-clients": 0.2, "seed": 4})
    held = held_out_partitions(cfg)
    assert len(held) == 4 and held == held_out_partitions(cfg)
    assert held != held_out_partitions(cfg.replace(seed=5))
    assert held_out_partitions(cfg.replace(unseen_clients=0.0)) == frozenset()
    clients = {100 + p: p for p in range(20)}
    strategy = FedAvg(clients=clients, seed=4, fraction_train=0.5, held_out=held)
    for rnd in range(1, 30):
        chosen = {clients[n] for n in strategy.sample_train(rnd)}
        assert len(chosen) == 8 and not chosen & held  # half of the 16 participants


@pytest.mark.parametrize("values, fragment", [
    ({"unseen-clients": 1.0}, "[0, 1)"),
    ({"unseen-clients": 0.01, "num-clients": 10}, "at least one client"),
    ({"unseen-clients": 0.95, "num-clients": 10}, "at least one to train"),
    ({"ditto-lambda": -1.0}, "must be >= 0"),
])
def test_bad_unseen_and_ditto_values_are_clear_errors(values, fragment):
    with pytest.raises(ConfigError) as info:
        make_config(values)
    assert fragment in str(info.value)


def _row(pid, g, p, total=10):
    return {"partition_id": pid, "num_train": 30, "test_total": total,
            "test_correct_global": g, "test_correct_personalized": p,
            "test_loss_global": 1.0, "test_loss_personalized": 1.0,
            "test_global_accuracy": g / total, "test_personalized_accuracy": p / total}


def test_unseen_clients_are_summarised_apart_and_local_has_no_global_figures():
    rows = [_row(0, 5, 9), _row(1, 7, 6), _row(2, 2, 8)]
    out = summarize_clients(rows, frozenset({2}))
    assert out["personalized_accuracy"] == pytest.approx(15 / 20)
    assert out["global_accuracy"] == pytest.approx(12 / 20)
    assert out["personalization_hurts_share"] == 0.5
    assert out["unseen_personalized_accuracy"] == pytest.approx(0.8)
    assert out["unseen_global_accuracy"] == pytest.approx(0.2)
    assert out["unseen_clients_evaluated"] == 1
    none = summarize_clients(rows, frozenset())
    assert none["unseen_personalized_accuracy"] is None
    assert none["personalized_accuracy"] == pytest.approx(23 / 30)
    local = without_global({**out, "centralized_accuracy": 0.1})
    assert local["personalized_accuracy"] == out["personalized_accuracy"]
    assert local["unseen_personalized_accuracy"] == out["unseen_personalized_accuracy"]
    assert all(local[k] is None for k in ("global_accuracy", "unseen_global_accuracy",
                                          "centralized_accuracy", "global_accuracy_bottom10",
                                          "personalization_hurts_share"))


def test_client_sampling_takes_the_fraction_of_clients_meant_despite_float_error():
    from fedtl.strategies.fedavg import sample_partitions

    assert 100 * 0.29 < 29  # 28.999999999999996
    picked = sample_partitions(0, 1, list(range(100)), 0.29)
    assert len(picked) == 29 and len(set(picked)) == 29
    assert len(sample_partitions(0, 1, list(range(10)), 0.05)) == 1  # at least one
    assert sample_partitions(0, 3, list(range(10)), 1.0) == list(range(10))
