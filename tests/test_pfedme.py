"""pFedMe's inner solver, its Moreau-envelope objective, and the server's beta-mixing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedtl.clients.pfedme import THETA, PFedMeSolver, prox_steps
from fedtl.config import make_config
from fedtl.data import ClientData, Split
from fedtl.strategies.fedavg import FedAvg
from fedtl.strategies.pfedme import PFedMe, mix

H = torch.tensor([1.0, 4.0, 0.5])   # curvature of the quadratic f
C = torch.tensor([2.0, -1.0, 3.0])  # minimiser of f


class Quadratic(torch.nn.Module):
    def __init__(self, start):
        super().__init__()
        self.theta = torch.nn.Parameter(torch.as_tensor(start, dtype=torch.float32).clone())


class QuadraticTrainer:
    """f(theta) = 1/2 sum_j H_j (theta_j - C_j)^2, the same for every batch."""

    def __init__(self, cfg=None):
        self.cfg = cfg

    def batches(self, data, generator, device="cpu"):
        while True:
            yield None

    def loss(self, model, batch):
        return 0.5 * (H * (model.theta - C) ** 2).sum()


def f(theta):
    return 0.5 * float((H * (theta - C) ** 2).sum())


def prox(w, lam):
    """Closed form of argmin_theta f(theta) + lam/2 ||theta - w||^2."""
    return (H * C + lam * w) / (H + lam)


def moreau(w, lam):
    t = prox(w, lam)
    return f(t) + lam / 2 * float(((t - w) ** 2).sum())


def _data():
    empty = Split(torch.zeros(0, 1), torch.zeros(0, dtype=torch.long))
    return ClientData(0, empty, empty, empty)


def test_inner_solver_reaches_the_prox_of_a_quadratic():
    w = torch.tensor([0.0, 1.0, -2.0])
    lam = 15.0
    model = Quadratic(w)
    prox_steps(model, [w.clone()], QuadraticTrainer(), None, steps=400, personal_lr=0.02,
               lam=lam)
    assert torch.allclose(model.theta.detach(), prox(w, lam), atol=1e-5)


def test_client_update_decreases_the_moreau_envelope_and_keeps_theta():
    lam = 15.0
    cfg = make_config({"strategy": "pfedme", "pfedme-lambda": lam, "personal-lr": 0.02,
                       "inner-steps": 20, "local-steps": 10, "lr": 0.005})
    w0 = torch.tensor([0.0, 1.0, -2.0])
    model = Quadratic(w0)
    state = {}
    solver = PFedMeSolver(cfg, QuadraticTrainer(cfg), torch.device("cpu"))
    solver.train(model, _data(), torch.Generator().manual_seed(0), state)
    w1 = model.theta.detach()
    assert moreau(w1, lam) < moreau(w0, lam)
    # one outer step moves w toward theta by eta * lambda; ten of them stay short of theta
    theta = state[THETA]["theta"]
    assert torch.all(torch.abs(theta - prox(w1, lam)) < torch.abs(w0 - prox(w1, lam)) + 1e-6)
    # the gradient of the envelope is lam (w - prox(w)): w moved against it
    grad = lam * (w0 - prox(w0, lam))
    assert float(torch.dot(w1 - w0, grad)) < 0


def test_outer_step_is_exactly_eta_lambda_toward_theta():
    lam, eta = 10.0, 0.01
    cfg = make_config({"strategy": "pfedme", "pfedme-lambda": lam, "personal-lr": 0.05,
                       "inner-steps": 3, "local-steps": 1, "lr": eta})
    w0 = torch.tensor([1.0, 1.0, 1.0])
    model = Quadratic(w0)
    state = {}
    PFedMeSolver(cfg, QuadraticTrainer(cfg), torch.device("cpu")).train(
        model, _data(), torch.Generator(), state)
    theta = state[THETA]["theta"]
    expected = w0 - eta * lam * (w0 - theta)
    assert torch.allclose(model.theta.detach(), expected, atol=1e-7)


def test_personalized_model_is_the_kept_theta():
    cfg = make_config({"strategy": "pfedme"})
    solver = PFedMeSolver(cfg, QuadraticTrainer(cfg), torch.device("cpu"))
    kept = {THETA: {"theta": torch.tensor([7.0, 8.0, 9.0])}}
    out = solver.personalized(Quadratic([0, 0, 0]), Quadratic([0, 0, 0]), _data(),
                              torch.Generator(), kept)
    assert torch.equal(out.theta.detach(), torch.tensor([7.0, 8.0, 9.0]))


def test_beta_mixing_is_exact():
    prev = ArrayRecord({"w": Array(np.array([1.0, 2.0], dtype=np.float32))})
    avg = ArrayRecord({"w": Array(np.array([3.0, -2.0], dtype=np.float32))})
    out = mix(prev, avg, beta=2.0)["w"].numpy()
    np.testing.assert_array_equal(out, np.array([5.0, -6.0], dtype=np.float32))
    np.testing.assert_array_equal(mix(prev, avg, 1.0)["w"].numpy(), avg["w"].numpy())
    np.testing.assert_allclose(mix(prev, avg, 0.5)["w"].numpy(), [2.0, 0.0])


def test_beta_mixing_of_a_batch_norm_model_averages_its_statistics():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    prev = ArrayRecord(net.state_dict())
    net(torch.randn(8, 3) * 5)  # train-mode pass: new running statistics, one more batch
    avg = ArrayRecord(net.state_dict())
    out = mix(prev, avg, beta=2.0).to_torch_state_dict()  # 0-d num_batches_tracked included
    for key in ("1.running_mean", "1.running_var", "1.num_batches_tracked"):
        assert torch.equal(out[key], net.state_dict()[key]), key
    assert out["1.num_batches_tracked"].dtype == torch.int64
    weight = 2 * net.state_dict()["0.weight"] - prev.to_torch_state_dict()["0.weight"]
    torch.testing.assert_close(out["0.weight"], weight)


def _reply(msg_to: Message, weights: np.ndarray, n: int) -> Message:
    content = RecordDict({"arrays": ArrayRecord({"w": Array(weights)}),
                          "metrics": MetricRecord({"num-examples": n, "train-loss": 1.0})})
    return Message(content, reply_to=msg_to)


@pytest.fixture
def task_identity():
    """Flower stamps messages with the running task's identity; set one for unit tests."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id)
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    yield
    TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id = saved


def _round(strategy, replies_spec):
    """Configure a round on fake nodes and aggregate hand-made replies."""

    class FakeGrid:
        def get_node_ids(self):
            return list(strategy.clients)

    start = ArrayRecord({"w": Array(np.array([1.0, 1.0], dtype=np.float32))})
    messages = {m.metadata.dst_node_id: m for m in
                strategy.configure_train(1, start, ConfigRecord(), FakeGrid())}
    replies = []
    for node, (w, n) in replies_spec.items():
        msg = messages[node]
        msg.metadata.__dict__["_message_id"] = f"m{node}"  # as if it had been sent
        replies.append(_reply(msg, np.asarray(w, dtype=np.float32), n))
    assert {r.metadata.src_node_id for r in replies} == set(replies_spec)
    return strategy.aggregate_train(1, replies)[0]["w"].numpy()


def test_fedavg_weights_by_number_of_examples(task_identity):
    strategy = FedAvg(clients={11: 0, 22: 1}, seed=0)
    out = _round(strategy, {11: ([0.0, 4.0], 30), 22: ([4.0, 0.0], 10)})
    np.testing.assert_allclose(out, [1.0, 3.0], rtol=1e-6)


def test_pfedme_server_mixes_with_beta(task_identity):
    strategy = PFedMe(clients={11: 0, 22: 1}, seed=0, beta=2.0)
    out = _round(strategy, {11: ([0.0, 4.0], 30), 22: ([4.0, 0.0], 10)})
    # average [1, 3]; previous [1, 1]; (1 - 2) * [1, 1] + 2 * [1, 3] = [1, 5]
    np.testing.assert_allclose(out, [1.0, 5.0], rtol=1e-6)


@pytest.mark.parametrize("fraction, expected", [(1.0, 10), (0.25, 2), (0.05, 1)])
def test_sampling_is_seeded_by_partition_id(fraction, expected):
    clients = {1000 + 7 * p: p for p in range(10)}
    a = FedAvg(clients=clients, seed=3, fraction_train=fraction)
    shuffled = dict(reversed(list(clients.items())))
    b = FedAvg(clients=shuffled, seed=3, fraction_train=fraction)
    for rnd in (1, 2, 3):
        assert a.sample_train(rnd) == b.sample_train(rnd)
        assert len(a.sample_train(rnd)) == expected


@pytest.mark.parametrize("clip", [0.0, 1.0])
def test_clip_grad_norm_bounds_every_kind_of_local_step(clip):
    """One step from theta = 0 (gradient -H*C, norm 4.72) moves theta by lr * min(norm, clip)
    in local SGD, Ditto's personal steps and pFedMe's inner steps alike."""
    from fedtl.clients.ditto import proximal_sgd_steps
    from fedtl.clients.update_rule import ClipCount, sgd_steps

    cfg = make_config({"lr": 0.1, "clip-grad-norm": clip})
    grad_norm = float((H * C).norm())
    expected = 0.1 * (min(grad_norm, clip) if clip else grad_norm)
    start = torch.zeros(3)
    moved, counts = [], [ClipCount() for _ in range(3)]
    model = Quadratic(start)
    sgd_steps(model, QuadraticTrainer(), _data(), torch.Generator(), 1, cfg, torch.device("cpu"),
              counts[0])
    moved.append(model.theta.detach().norm())
    model = Quadratic(start)
    proximal_sgd_steps(model, [start.clone()], QuadraticTrainer(), _data(), torch.Generator(),
                       1, 0.0, cfg, torch.device("cpu"), counts[1])
    moved.append(model.theta.detach().norm())
    model = Quadratic(start)
    prox_steps(model, [start.clone()], QuadraticTrainer(), None, steps=1, personal_lr=0.1,
               lam=0.0, clip=cfg.clip_grad_norm, clip_count=counts[2])
    moved.append(model.theta.detach().norm())
    assert [float(m) for m in moved] == pytest.approx([expected] * 3, rel=1e-5)
    # the one step's norm (4.72) is above a clip of 1; with clipping off nothing is counted
    assert [c.share() for c in counts] == ([1.0] * 3 if clip else [None] * 3)


@pytest.mark.parametrize("strategy", ["fedavg", "ditto", "pfedme", "local"])
def test_a_rule_reports_the_share_of_its_training_steps_that_were_clipped(strategy):
    """Steps start at theta = 0 (gradient norm 4.72) and shrink toward the minimum: a clip of
    1 acts on the first steps only, so the share lies strictly between 0 and 1; a clip above
    every norm reports 0 and no clip reports nothing."""
    from fedtl.registry import STRATEGIES

    def share(clip: float):
        cfg = make_config({"lr": 0.3, "local-steps": 20, "clip-grad-norm": clip,
                           "strategy": strategy, "personal-lr": 0.1, "pfedme-lambda": 1.0,
                           "inner-steps": 2})
        rule = STRATEGIES.get(strategy).client_rule()(cfg, QuadraticTrainer(),
                                                      torch.device("cpu"))
        rule.train(Quadratic(torch.zeros(3)), _data(), torch.Generator().manual_seed(0), {})
        return rule.clip_metrics().get("clipped-share")

    assert share(0.0) is None
    assert share(100.0) == 0.0
    assert 0.0 < share(1.0) < 1.0
