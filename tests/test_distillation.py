"""Knowledge distillation: the losses, the synthesis steps, teachers, and federated runs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedtl.clients.trainers.class_impressions import class_impressions
from fedtl.clients.trainers.dafl import DAFLLoss, DAFLTrainer, Generator
from fedtl.clients.trainers.data_free import TransferSetTrainer, random_affine
from fedtl.clients.trainers.kd import KDLoss, KDTrainer, kd_loss, soft_term
from fedtl.clients.trainers.teacher import load_teacher, logits_and_features
from fedtl.clients.trainers.zskd import (
    ZSKDTrainer,
    class_similarity,
    data_impressions,
    impression_plan,
    sample_soft_labels,
)
from fedtl.config import ConfigError, make_config
from fedtl.data import federated_data
from fedtl.data.datasets import DIGITS, MNIST
from fedtl.models import build_model
from fedtl.results import RunDirectory
from fedtl.simulation import preflight, simulate

# --- the KD loss -------------------------------------------------------------------------


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_kd_loss_equals_hintons_formula_on_hand_made_logits():
    s = np.array([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
    t = np.array([[4.0, 1.0, 0.0], [0.5, 0.5, 2.0]])
    y = np.array([0, 2])
    temperature, alpha = 3.0, 0.25
    ce = -np.mean(np.log(_softmax(s))[np.arange(2), y])
    p_t, p_s = _softmax(t / temperature), _softmax(s / temperature)
    kl = np.mean(np.sum(p_t * (np.log(p_t) - np.log(p_s)), axis=1))
    expected = alpha * ce + (1 - alpha) * temperature**2 * kl
    got = kd_loss(torch.tensor(s), torch.tensor(t), torch.tensor(y), temperature, alpha)
    assert float(got) == pytest.approx(expected, rel=1e-9)
    # the soft term carries T^2: at T=3 it is 9 x the plain KL of the softened outputs
    soft = float(soft_term(torch.tensor(s), torch.tensor(t), temperature))
    assert soft == pytest.approx(9 * kl, rel=1e-9)
    assert float(kd_loss(torch.tensor(s), torch.tensor(t), torch.tensor(y), 1.0, 1.0)) == \
        pytest.approx(ce, rel=1e-9)


def test_kd_loss_module_uses_the_frozen_teacher_and_only_the_soft_term_without_labels():
    torch.manual_seed(0)
    teacher = nn.Linear(4, 3)
    for p in teacher.parameters():
        p.requires_grad_(False)
    student = nn.Linear(4, 3)
    x = torch.randn(5, 4)
    loss = KDLoss(teacher, temperature=2.0, alpha=0.5)
    unlabelled = loss(student(x), x)
    assert float(unlabelled.detach()) == pytest.approx(
        float(soft_term(student(x), teacher(x), 2.0).detach()))
    unlabelled.backward()
    assert student.weight.grad is not None and teacher.weight.grad is None
    # a student equal to its teacher has nothing left to learn from the soft term
    assert float(KDLoss(teacher, 2.0)(teacher(x), x)) == pytest.approx(0.0, abs=1e-6)


# --- ZSKD --------------------------------------------------------------------------------


def test_zskd_concentration_matrix_from_known_weights():
    w = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]])
    c = 1 / math.sqrt(2)
    # cosine rows: [1, 0, c, -1], [0, 1, c, 0], [c, c, 1, -c], [-1, 0, -c, 1]
    expected = torch.tensor([
        [1.0, 0.5, (c + 1) / 2, 0.0],
        [0.0, 1.0, c, 0.0],
        [(c + c) / (1 + c), (c + c) / (1 + c), 1.0, 0.0],
        [0.0, 0.5, (1 - c) / 2, 1.0],
    ])
    assert torch.allclose(class_similarity(w), expected, atol=1e-6)


def test_zskd_soft_labels_follow_the_dirichlet_plan():
    classes, betas = impression_plan(40, 4)
    assert torch.equal(torch.bincount(classes), torch.tensor([10, 10, 10, 10]))
    assert sorted(betas[classes == 0].tolist()) == pytest.approx([0.1] * 5 + [1.0] * 5)
    conc = class_similarity(torch.randn(4, 6, generator=torch.Generator().manual_seed(1)))
    big = impression_plan(4000, 4)
    y = sample_soft_labels(conc, *big, torch.Generator().manual_seed(0))
    assert torch.allclose(y.sum(1), torch.ones(4000), atol=1e-5) and (y >= 0).all()
    # beta = 0.1 gives sparser (more one-hot) labels than beta = 1.0
    peak = y.max(1).values
    assert peak[big[1] == 0.1].mean() > peak[big[1] == 1.0].mean() + 0.1
    # with beta = 1, a class's own label gets the most mass on average (c_k(k) = 1)
    ones = big[1] == 1.0
    mean_own = y[ones].gather(1, big[0][ones][:, None]).mean()
    assert mean_own > 1 / 4 + 0.05


def test_data_impressions_match_their_soft_labels_better_than_noise():
    torch.manual_seed(0)
    teacher = build_model("lenet5", DIGITS, seed=0).eval()
    y = F.one_hot(torch.arange(10), 10).float() * 0.9 + 0.01
    bounds = (torch.tensor(-0.8).view(1, 1, 1), torch.tensor(1.9).view(1, 1, 1))
    x0 = data_impressions(teacher, y, (1, 8, 8), 0, 0.1, bounds, torch.Generator().manual_seed(0))
    x = data_impressions(teacher, y, (1, 8, 8), 60, 0.1, bounds, torch.Generator().manual_seed(0))
    assert x.min() >= -0.8 - 1e-6 and x.max() <= 1.9 + 1e-6

    def ce(images):
        with torch.no_grad():
            return float(-(y * F.log_softmax(teacher(images) / 20, 1)).sum(1).mean())

    assert ce(x) < ce(x0) - 1e-3


# --- class impressions ---------------------------------------------------------------------


def test_class_impressions_raise_their_class_logit():
    torch.manual_seed(3)
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(256, 32), nn.Tanh(), nn.Linear(32, 10))
    for p in teacher.parameters():
        p.requires_grad_(False)
    classes = torch.arange(10).repeat(2)
    bounds = (torch.tensor(-0.81).view(1, 1, 1), torch.tensor(1.85).view(1, 1, 1))
    start = class_impressions(teacher, classes, (1, 16, 16), 0, 0.1, bounds,
                              torch.Generator().manual_seed(0))
    x = class_impressions(teacher, classes, (1, 16, 16), 40, 0.1, bounds,
                          torch.Generator().manual_seed(0))
    assert x.min() >= -0.81 - 1e-6 and x.max() <= 1.85 + 1e-6
    before = teacher(start).gather(1, classes[:, None]).flatten()
    after = teacher(x).gather(1, classes[:, None]).flatten()
    # ascent happens on jittered / rotated / scaled views, so judge the images themselves
    assert (after > before).all() and float((after - before).mean()) > 0.5
    assert (teacher(x).argmax(1) == classes).float().mean() >= 0.9


def test_random_affine_keeps_shape_fill_and_gradients():
    x = torch.zeros(3, 1, 8, 8, requires_grad=True)
    out = random_affine(x + 1.0, torch.Generator().manual_seed(0), shift_px=3, degrees=30,
                        fill=-0.5)
    assert out.shape == x.shape
    assert out.min() >= -0.5 - 1e-6 and out.max() <= 1.0 + 1e-6
    assert (out < 0).any()  # uncovered corners take the fill value, not 0
    out.sum().backward()
    assert x.grad is not None


# --- DAFL --------------------------------------------------------------------------------


def _toy_teacher() -> nn.Module:
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    with torch.no_grad():
        teacher[1].weight.copy_(torch.tensor([[1.0, 0, 0, 0], [0, -1.0, 0, 0], [0, 0, 2.0, 0]]))
        teacher[1].bias.zero_()
        teacher[3].weight.copy_(torch.tensor([[1.0, 0, 1.0], [0, 1.0, -1.0]]))
        teacher[3].bias.copy_(torch.tensor([0.0, 0.5]))
    return teacher


def test_dafl_loss_terms_on_a_toy_teacher():
    teacher = _toy_teacher()
    x = torch.tensor([[1.0, 2.0, 0.5, 9.0], [-1.0, -3.0, 1.0, 0.0]])
    with torch.no_grad():
        logits, features = logits_and_features(teacher, x)
    # features are the output layer's input: ReLU of the hidden layer
    assert torch.allclose(features, torch.tensor([[1.0, 0.0, 1.0], [0.0, 3.0, 2.0]]))
    assert torch.allclose(logits, torch.tensor([[2.0, -0.5], [2.0, 1.5]]))
    terms = DAFLLoss.terms(logits, features)
    p = F.softmax(logits, 1)
    assert float(terms["one-hot"]) == pytest.approx(float(-torch.log(p[:, 0]).mean()))
    assert float(terms["activation"]) == pytest.approx(-7.0 / 6.0)
    mean_p = p.mean(0)
    assert float(terms["entropy"]) == pytest.approx(float((mean_p * torch.log10(mean_p)).sum()))
    total = DAFLLoss()(logits, features)
    assert float(total) == pytest.approx(float(terms["one-hot"] + 0.1 * terms["activation"]
                                               + 5 * terms["entropy"]))
    # the information-entropy term is lowest (-log10 K) when classes are balanced
    balanced = DAFLLoss.terms(torch.tensor([[5.0, 0.0], [0.0, 5.0]]), features)["entropy"]
    skewed = DAFLLoss.terms(torch.tensor([[5.0, 0.0], [5.0, 0.0]]), features)["entropy"]
    assert float(balanced) == pytest.approx(-math.log10(2), abs=1e-3) and skewed > balanced


def test_dafl_generator_steps_lower_the_generator_loss_and_persist_in_client_state():
    torch.manual_seed(0)
    cfg = make_config({"trainer": "dafl", "dafl-batch-size": 32, "dafl-generator-width": 16,
                       "dafl-generator-lr": 0.05, "model": "lenet5-half"})
    teacher = build_model("lenet5", DIGITS, seed=0).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    g = Generator((1, 8, 8), width=16)
    with torch.no_grad():
        x = g(torch.randn(64, 100))
    assert x.shape == (64, 1, 8, 8)
    assert abs(float(x.mean())) < 1e-4 and float(x.std()) == pytest.approx(1.0, abs=0.02)
    trainer = DAFLTrainer(cfg)
    trainer.teacher = lambda device: teacher  # a toy teacher, no checkpoint
    state: dict = {}
    trainer.use_state(state)
    data = federated_data(cfg).client(0)
    loss = DAFLLoss()
    gen, opt, fresh = trainer._generator(DIGITS, 0, "cpu")
    assert fresh
    z = torch.Generator().manual_seed(1)

    def generator_loss() -> float:
        with torch.no_grad():
            return float(loss(*logits_and_features(teacher, gen(torch.randn(
                256, 100, generator=torch.Generator().manual_seed(9))))))

    first = generator_loss()
    for _ in range(20):
        trainer.generator_step(gen, opt, teacher, z, "cpu", loss)
    assert generator_loss() < first
    batches = trainer.batches(data, torch.Generator().manual_seed(0))
    batch = next(batches)
    assert batch.shape == (32, 1, 8, 8)
    assert "dafl-generator" in state and "dafl-generator-adam" in state
    kept = {k: v.clone() for k, v in state["dafl-generator"].items()}
    next(batches)  # one more generator step: the kept weights follow it
    assert any(not torch.equal(kept[k], state["dafl-generator"][k]) for k in kept)
    again, _, fresh = trainer._generator(DIGITS, 0, "cpu")
    assert not fresh
    assert all(torch.equal(again.state_dict()[k], state["dafl-generator"][k]) for k in kept)


# --- transfer sets are made once per client ------------------------------------------------


def test_a_transfer_set_is_synthesised_once_and_kept_in_the_client_state(monkeypatch,
                                                                       tmp_path):
    from fedtl.clients.state import ClientStateStore

    cfg = make_config({"trainer": "zskd", "zskd-samples": 30, "zskd-steps": 2,
                       "model": "lenet5-half", "batch-size": 8})
    teacher = build_model("lenet5", DIGITS, seed=0).eval()
    calls = []
    original = ZSKDTrainer.synthesise

    def counted(self, *args):
        calls.append(1)
        return original(self, *args)

    monkeypatch.setattr(ZSKDTrainer, "synthesise", counted)
    monkeypatch.setattr(TransferSetTrainer, "teacher", lambda self, device: teacher)
    data = federated_data(cfg).client(2)
    store = ClientStateStore(tmp_path, 2)
    for server_round in (1, 2, 3):  # as the client app does: a new trainer, state from disk
        state = store.load(before_round=server_round)
        trainer = ZSKDTrainer(cfg)
        trainer.use_state(state, 2)
        batch = next(trainer.batches(data, torch.Generator().manual_seed(0)))
        assert batch.shape == (8, 1, 8, 8)
        store.save(server_round, state)
    kept = store.load(before_round=4)["zskd-transfer-set"]["x"]
    assert len(calls) == 1 and kept.shape == (30, 1, 8, 8)
    assert trainer.num_examples(data) == 30
    # the synthesis is seeded by the client's key (a SuperNode with its own data: its node id)
    other = ZSKDTrainer(cfg)
    other.use_state({}, 12345)
    next(other.batches(data, torch.Generator().manual_seed(0)))
    assert len(calls) == 2 and not torch.equal(other.state["zskd-transfer-set"]["x"], kept)


def test_a_diverged_synthesis_is_a_clear_error_and_is_not_kept(monkeypatch):
    cfg = make_config({"trainer": "zskd", "zskd-samples": 6, "model": "lenet5-half"})

    def diverged(self, teacher, spec, n, *rest):
        x = torch.zeros(n, *spec.input_shape)
        x[1, 0, 2, 2] = float("nan")
        return x

    monkeypatch.setattr(ZSKDTrainer, "synthesise", diverged)
    monkeypatch.setattr(TransferSetTrainer, "teacher",
                        lambda self, device: build_model("lenet5", DIGITS, seed=0).eval())
    trainer = ZSKDTrainer(cfg)
    trainer.use_state({}, 4)
    with pytest.raises(RuntimeError, match="1 of 6 synthesised samples of client 4 have "
                                           "non-finite values.*synthesis-lr"):
        trainer.transfer_set(4, "cpu")
    assert "zskd-transfer-set" not in trainer.state


def test_evaluation_keeps_only_a_new_finite_transfer_set_in_the_client_state():
    from fedtl.clients.client_app import state_after_evaluation

    zskd = ZSKDTrainer(make_config({"trainer": "zskd"}))
    dafl = DAFLTrainer(make_config({"trainer": "dafl"}))
    loaded = {"pfedme-theta": {"w": torch.ones(2)}}
    made = {"zskd-transfer-set": {"x": torch.zeros(3, 1, 8, 8)},
            "dafl-generator": {"w": torch.ones(2)}}  # e.g. fine-tuned for FedAvg-FT
    kept = state_after_evaluation(loaded, {**loaded, **made}, zskd)
    assert set(kept) == {"pfedme-theta", "zskd-transfer-set"}
    # a generator evaluation trained is never kept: when a client is evaluated must not
    # change how it trains
    assert state_after_evaluation({}, {"dafl-generator": {"w": torch.ones(2)}}, dafl) is None
    assert state_after_evaluation(loaded, dict(loaded), zskd) is None  # nothing new
    poisoned = {"zskd-transfer-set": {"x": torch.full((3, 1, 8, 8), float("nan"))}}
    assert state_after_evaluation({}, poisoned, zskd) is None


# --- models and teachers -------------------------------------------------------------------


def test_student_models_have_the_papers_sizes():
    count = lambda m: sum(p.numel() for p in m.parameters())
    half = build_model("lenet5-half", MNIST)
    assert half(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    assert count(half) == (3 * 25 + 3) + (8 * 3 * 25 + 8) + (8 * 25 * 60 + 60) + \
        (60 * 42 + 42) + (42 * 10 + 10)
    cfg = make_config({"model": "mlp", "mlp-hidden": "800,800", "dataset": "mnist"})
    mlp = build_model("mlp", MNIST, cfg=cfg)
    assert count(mlp) == 784 * 800 + 800 + 800 * 800 + 800 + 800 * 10 + 10
    assert count(build_model("mlp", DIGITS, hidden=(20,))) == 64 * 20 + 20 + 20 * 10 + 10
    with pytest.raises(ConfigError, match="'mlp-hidden' = '800,x'"):
        make_config({"mlp-hidden": "800,x"})


def _teacher_run(tmp_path, model="lenet5", epochs=10):
    """A small teacher trained on all of digits, saved as a fedtl run directory."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16 - 0.3053) / 0.3760
    y = torch.tensor(digits.target)
    cfg = make_config({"model": model})
    teacher = build_model(model, DIGITS, seed=0, cfg=cfg)
    opt = torch.optim.Adam(teacher.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=g).split(64):
            opt.zero_grad()
            F.cross_entropy(teacher(x[idx]), y[idx]).backward()
            opt.step()
    run = RunDirectory.create(cfg, tmp_path / "teacher")
    run.save_model(teacher.state_dict())
    acc = float((teacher(x).argmax(1) == y).float().mean())
    return run.path, acc


def test_a_teacher_runs_batch_norm_setting_is_read_from_its_run(tmp_path):
    cfg = make_config({"model": "lenet5", "batch-norm": True})
    run = RunDirectory.create(cfg, tmp_path / "teacher")
    run.save_model(build_model("lenet5", DIGITS, seed=0, cfg=cfg).state_dict())
    teacher = load_teacher(make_config({"trainer": "kd", "model": "mlp",
                                        "teacher-checkpoint": str(run.path)}))
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in teacher.modules())


def test_a_batch_norm_teacher_outside_a_run_is_named_name_colon_bn(tmp_path):
    bn = make_config({"model": "lenet5", "batch-norm": True})
    loose = tmp_path / "weights.pt"
    torch.save(build_model("lenet5", DIGITS, seed=0, cfg=bn).state_dict(), loose)
    kd = {"trainer": "kd", "model": "mlp", "teacher-checkpoint": str(loose)}
    teacher = load_teacher(make_config({**kd, "teacher-model": "lenet5:bn"}))
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in teacher.modules())
    with pytest.raises(ConfigError, match="batch-norm layers: teacher-model=lenet5:bn"):
        preflight(make_config({**kd, "teacher-model": "lenet5"}))
    with pytest.raises(ConfigError, match="lenet5 takes only bn"):
        preflight(make_config({**kd, "teacher-model": "lenet5:gn"}))
    with pytest.raises(ConfigError, match="mlp takes widths"):
        preflight(make_config({**kd, "teacher-model": "mlr:bn"}))


def test_teacher_is_read_from_a_fedtl_run_and_bad_teachers_fail_before_ray(tmp_path):
    path, _ = _teacher_run(tmp_path, epochs=1)
    cfg = make_config({"trainer": "kd", "teacher-checkpoint": str(path), "model": "mlp"})
    teacher = load_teacher(cfg)  # architecture from the run's config.toml: lenet5
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    preflight(cfg)

    def error(**values) -> str:
        with pytest.raises(ConfigError) as info:
            preflight(make_config({"trainer": "kd", "model": "mlp", **values}))
        return str(info.value)

    assert "'teacher-checkpoint' = ''" in error()
    assert "does not exist" in error(**{"teacher-checkpoint": str(tmp_path / "nope.pt")})
    msg = error(**{"teacher-checkpoint": str(path), "teacher-model": "cnn"})
    assert "does not fit teacher-model 'cnn'" in msg and "size mismatch" in msg
    assert "Did you mean 'lenet5'" in error(**{"teacher-checkpoint": str(path),
                                               "teacher-model": "lenet"})
    assert "torchvision has no model" in error(**{"teacher-checkpoint": str(path),
                                                  "teacher-model": "torchvision:nonet"})
    loose = tmp_path / "weights.pt"
    torch.save({"state_dict": torch.load(path / "model.pt")}, loose)
    assert "name its architecture" in error(**{"teacher-checkpoint": str(loose)})
    preflight(make_config({"trainer": "kd", "model": "mlp", "teacher-checkpoint": str(loose),
                           "teacher-model": "lenet5"}))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    assert "not a readable PyTorch checkpoint" in error(**{
        "teacher-checkpoint": str(tmp_path / "junk.pt"), "teacher-model": "lenet5"})
    assert "synthesises images" in error(**{
        "trainer": "zskd", "dataset": "synthetic", "partitioner": "natural",
        "teacher-checkpoint": str(path)})


def test_kd_under_pfedme_keeps_a_personalized_student(tmp_path):
    from fedtl.clients.pfedme import THETA, PFedMeSolver

    path, _ = _teacher_run(tmp_path, epochs=2)
    cfg = make_config({"trainer": "kd", "strategy": "pfedme", "teacher-checkpoint": str(path),
                       "model": "mlp", "mlp-hidden": "32", "local-steps": 5, "num-clients": 3})
    trainer = KDTrainer(cfg)
    model = trainer.build_model(DIGITS, seed=0)
    global_weights = {k: v.clone() for k, v in model.state_dict().items()}
    state: dict = {}
    metrics = PFedMeSolver(cfg, trainer, torch.device("cpu")).train(
        model, federated_data(cfg).client(1), torch.Generator().manual_seed(0), state)
    assert math.isfinite(metrics["train-loss"])
    theta = state[THETA]  # the client's personalized student, distilled with KD
    assert any(not torch.equal(theta[k], global_weights[k]) for k in theta)
    assert any(not torch.equal(theta[k], model.state_dict()[k]) for k in theta)


# --- federated runs through Flower + Ray ----------------------------------------------------


@pytest.mark.e2e
def test_federated_kd_and_data_free_runs_through_flower_and_ray(tmp_path):
    from fedtl.plots import plot_run

    teacher, teacher_acc = _teacher_run(tmp_path)
    assert teacher_acc > 0.95
    common = {"dataset": "digits", "num-clients": 3, "num-rounds": 3, "model": "mlp",
              "mlp-hidden": "64", "teacher-checkpoint": str(teacher), "local-steps": 30,
              "lr": 0.05, "momentum": 0.5, "out-dir": str(tmp_path), "partitioner": "iid",
              "eval-every": 3}
    kd = make_config({**common, "trainer": "kd", "kd-temperature": 4.0, "kd-alpha": 0.1,
                      "run-name": "kd"})
    preflight(kd)
    summary = simulate(kd, RunDirectory.create(kd))
    assert summary["status"] == "completed" and summary["trainer"] == "kd"
    assert summary["final"]["global_accuracy"] > 0.75

    zskd = make_config({**common, "trainer": "zskd", "zskd-samples": 100, "zskd-steps": 15,
                        "synthesis-lr": 0.2, "kd-temperature": 20.0, "finetune-steps": 0, "run-name": "zskd",
                        "synthetic-dir": str(tmp_path / "zskd" / "synthetic")})
    preflight(zskd)
    summary = simulate(zskd, RunDirectory.create(zskd))
    assert summary["status"] == "completed"
    assert summary["final"]["global_accuracy"] > 0.3  # far above chance from 100 images each
    assert sorted(p.name for p in (tmp_path / "zskd" / "synthetic").iterdir()) == [
        "client-0.pt", "client-1.pt", "client-2.pt"]
    plots = {p.name for p in plot_run(tmp_path / "zskd")}
    assert "synthetic.png" in plots
