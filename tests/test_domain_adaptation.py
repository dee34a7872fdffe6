"""Domain adaptation: the gradient reversal layer, DANN's schedules, the MNIST-M recipe, the
federated scenarios, ADDA's stages and the server's phases (unit tests, offline data)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from fedtl.clients.trainers.adda import ADDATrainer, init_target_encoder
from fedtl.clients.trainers.base import Phase
from fedtl.clients.trainers.dann import (
    DANNTrainer,
    annealed_lr_factor,
    grad_reverse,
    grl_lambda,
)
from fedtl.clients.trainers.domain import DomainBatch, TargetOracleTrainer
from fedtl.clients.update_rule import sgd_steps
from fedtl.config import ConfigError, make_config
from fedtl.data import Split, check_compatible, dataset_spec, federated_data
from fedtl.data.domain_shift import (
    CROP,
    blend_with_photos,
    follow_label_skew,
    load_photos,
    resize_images,
)
from fedtl.server_app import phase_schedule, select_best
from fedtl.simulation import preflight

DA = {"dataset": "digits", "target-dataset": "digits-m", "trainer": "dann", "model": "lenet5",
      "num-clients": 4}


# --- gradient reversal and DANN's schedules ---------------------------------------------------

@pytest.mark.parametrize("lam", [0.0, 0.3, 1.0, 2.5])
def test_gradient_reversal_is_identity_forward_and_minus_lambda_backward(lam):
    x = torch.randn(5, 7, requires_grad=True)
    y = grad_reverse(x, lam)
    assert torch.equal(y, x)
    incoming = torch.randn(5, 7)
    y.backward(incoming)
    assert torch.equal(x.grad, incoming * -lam)


def test_gradient_reversal_flips_the_domain_gradient_reaching_the_features():
    features = torch.randn(8, 3, requires_grad=True)
    head = torch.nn.Linear(3, 2)
    labels = torch.randint(0, 2, (8,))
    torch.nn.functional.cross_entropy(head(features), labels).backward()
    plain = features.grad.clone()
    features.grad = None
    torch.nn.functional.cross_entropy(head(grad_reverse(features, 0.7)), labels).backward()
    torch.testing.assert_close(features.grad, -0.7 * plain)


def test_lambda_schedule_values():
    assert grl_lambda(0.0) == 0.0
    assert grl_lambda(0.5) == pytest.approx(2 / (1 + math.exp(-5)) - 1)
    assert grl_lambda(0.1) == pytest.approx(0.46211716, abs=1e-8)
    assert grl_lambda(1.0) == pytest.approx(0.99990920, abs=1e-8)
    values = [grl_lambda(p) for p in np.linspace(0, 1, 11)]
    assert all(a < b for a, b in itertools.pairwise(values))


def test_learning_rate_annealing_values():
    assert annealed_lr_factor(0.0) == 1.0
    assert annealed_lr_factor(1.0) == pytest.approx(11 ** -0.75)
    assert 0.01 * annealed_lr_factor(0.5) == pytest.approx(0.01 / 6 ** 0.75)


def test_progress_runs_over_the_whole_federated_training():
    cfg = make_config({**DA, "num-rounds": 4, "local-steps": 5})
    trainer = DANNTrainer(cfg)
    trainer.begin(1)
    assert trainer.progress(0) == 0.0
    trainer.begin(3)
    assert trainer.progress(2) == pytest.approx((2 * 5 + 2) / 20)
    trainer.begin(4)
    assert trainer.progress(5) == 1.0
    # each batch carries the progress of its local step
    data = federated_data(cfg).client(0)
    trainer.begin(2)
    batches = trainer.batches(data, torch.Generator().manual_seed(0))
    assert [next(batches).progress for _ in range(3)] == pytest.approx([5 / 20, 6 / 20, 7 / 20])
    assert trainer.lr_scale(next(batches)) == pytest.approx(annealed_lr_factor(8 / 20))


class _Linear(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))


class _ScaledTrainer:
    """loss = -w, so one SGD step moves w by exactly lr * scale."""

    def __init__(self, scale):
        self.scale = scale

    def batches(self, data, generator, device="cpu"):
        while True:
            yield None

    def loss(self, model, batch):
        return -model.w

    def lr_scale(self, batch):
        return self.scale


@pytest.mark.parametrize("scale", [1.0, 0.25])
def test_local_sgd_applies_the_trainers_learning_rate_factor(scale):
    model = _Linear()
    cfg = make_config({"lr": 0.1})
    sgd_steps(model, _ScaledTrainer(scale), None, torch.Generator(), 3, cfg, torch.device("cpu"))
    assert float(model.w.detach()) == pytest.approx(3 * 0.1 * scale)


def test_dann_never_reads_target_labels():
    cfg = make_config({**DA, "local-steps": 4})
    data = federated_data(cfg).client(1)
    shuffled = type(data)(data.partition_id, data.train, data.val, data.test,
                          Split(data.target_train.x, data.target_train.y.flip(0)),
                          data.target_val, data.target_test)
    weights = []
    for d in (data, shuffled):
        trainer = DANNTrainer(cfg)
        trainer.begin(2)
        model = trainer.build_model(dataset_spec(cfg), seed=0)
        sgd_steps(model, trainer, d, torch.Generator().manual_seed(0), 4, cfg,
                  torch.device("cpu"))
        weights.append(model.state_dict())
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


# --- MNIST-M ------------------------------------------------------------------------------

def _stroke_digits(n: int) -> np.ndarray:
    """Synthetic 28x28 'digits': a vertical bar at a different column each, with grey edges."""
    digits = np.zeros((n, CROP, CROP), dtype=np.uint8)
    for i in range(n):
        c = 4 + i % 20
        digits[i, 5:23, c:c + 3] = 255
        digits[i, 5:23, c + 3] = 40  # antialiased edge: ink under MNIST-M's x > 0 rule
    return digits


def test_mnist_m_blend_is_absolute_difference_with_the_binarised_digit():
    photo = np.empty((40, 50, 3), dtype=np.uint8)
    photo[:] = (10, 100, 200)
    digits = _stroke_digits(3)
    out = blend_with_photos(digits, [photo], np.random.default_rng(0))
    assert out.shape == (3, 3, CROP, CROP) and out.dtype == np.uint8
    ink = digits > 0
    for ch, value in enumerate((10, 100, 200)):
        assert np.all(out[:, ch][ink] == 255 - value)
        assert np.all(out[:, ch][~ink] == value)
    # binarising at a higher threshold leaves the grey edge out of the ink
    mid = blend_with_photos(digits, [photo], np.random.default_rng(0), threshold=127)
    assert np.all(mid[:, 0][digits == 40] == 10)


def test_mnist_m_backgrounds_are_28x28_crops_of_the_photos():
    rng = np.random.default_rng(1)
    photos = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((30, 40), (60, 29))]
    blank = np.zeros((50, CROP, CROP), dtype=np.uint8)  # no ink: the output IS the crop
    out = blend_with_photos(blank, photos, np.random.default_rng(2)).transpose(0, 2, 3, 1)
    used = set()
    for img in out:
        found = [(k, t, left) for k, p in enumerate(photos)
                 for t in range(p.shape[0] - CROP + 1) for left in range(p.shape[1] - CROP + 1)
                 if np.array_equal(p[t:t + CROP, left:left + CROP], img)]
        assert found, "every background is a crop of one photo"
        used.add(found[0][0])
    assert used == {0, 1}


def test_mnist_m_is_deterministic_from_the_seed():
    digits = _stroke_digits(20)
    photos = load_photos("")
    a = blend_with_photos(digits, photos, np.random.default_rng([0, 1]))
    b = blend_with_photos(digits, photos, np.random.default_rng([0, 1]))
    c = blend_with_photos(digits, photos, np.random.default_rng([1, 1]))
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_digits_m_from_upsampled_digits_and_sample_photos():
    from fedtl.registry import DATASETS

    load = DATASETS.get("digits-m").load
    a = load(make_config({"seed": 3})).train
    assert a.x.shape == (1797, 3, CROP, CROP) and a.x.dtype == torch.uint8
    assert int(a.x.min()) >= 0 and int(a.x.max()) <= 255 and a.x.float().std() > 30
    assert torch.equal(a.x, load(make_config({"seed": 3})).train.x)
    assert not torch.equal(a.x, load(make_config({"seed": 4})).train.x)
    up = resize_images(torch.full((1, 1, 8, 8), 16, dtype=torch.uint8), CROP, 1 / 16)
    assert up.shape == (1, 1, CROP, CROP) and bool((up == 255).all())


def test_mnist_layout_scales_the_ink_box_to_20_pixels_and_centres_its_mass():
    from fedtl.data.domain_shift import mnist_layout
    from fedtl.registry import DATASETS

    # a 4x2 block of ink in the corner of an 8x8 image: longer side 4 -> 20 pixels
    img = torch.zeros((2, 1, 8, 8), dtype=torch.uint8)
    img[0, 0, 4:8, 6:8] = 16
    out = mnist_layout(img, 1 / 16)
    assert out.shape == (2, 1, CROP, CROP) and out.dtype == torch.uint8
    rows = torch.nonzero(out[0, 0].sum(1) > 0).flatten()
    cols = torch.nonzero(out[0, 0].sum(0) > 0).flatten()
    assert rows.numel() == 20 and cols.numel() == 10
    mass = out[0, 0].float()
    cy = (mass.sum(1) * torch.arange(CROP)).sum() / mass.sum()
    cx = (mass.sum(0) * torch.arange(CROP)).sum() / mass.sum()
    assert abs(cy.item() - 13.5) <= 0.5 and abs(cx.item() - 13.5) <= 0.5
    assert int(out[0].max()) == 255 and int(out[1].max()) == 0  # a blank image stays blank
    spec = DATASETS.get("digits-28")
    train = spec.load(make_config({})).train
    assert train.x.shape == (1797, 1, CROP, CROP) and spec.input_shape == (1, CROP, CROP)
    boxes = [(torch.nonzero(x[0].sum(1) > 0).flatten(), torch.nonzero(x[0].sum(0) > 0).flatten())
             for x in train.x[:50]]
    assert all(max(r[-1] - r[0] + 1, c[-1] - c[0] + 1) == 20 for r, c in boxes)
    assert torch.equal(train.y, DATASETS.get("digits").load(make_config({})).train.y)


@pytest.mark.parametrize("name", ["mnist-m", "digits-m", "digits-28", "usps", "svhn"])
def test_a_domain_datasets_normalisation_is_the_one_its_spec_declares(name):
    # what SSL views, data-free input bounds and a SuperNode's own files are normalised with
    from fedtl.registry import DATASETS

    spec = DATASETS.get(name)
    assert spec.raw_scale == 1 / 255
    assert spec.mean == (0.5,) * spec.input_shape[0] and spec.std == spec.mean
    if name in ("digits-m", "digits-28"):  # the ones that load offline
        train = spec.load(make_config({"seed": 3})).train
        assert (train.scale, train.mean, train.std) == (spec.raw_scale, spec.mean, spec.std)
        x = train.inputs(torch.arange(50))
        assert float(x.min()) >= -1 and float(x.max()) <= 1


def test_photo_dir_is_read_and_checked(tmp_path):
    from PIL import Image

    with pytest.raises(ConfigError, match="not a folder"):
        load_photos(str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="no images"):
        load_photos(str(tmp_path))
    Image.fromarray(np.full((30, 31, 3), 7, dtype=np.uint8)).save(tmp_path / "a.png")
    photos = load_photos(str(tmp_path))
    assert len(photos) == 1 and photos[0].shape == (30, 31, 3)
    Image.fromarray(np.zeros((10, 10, 3), dtype=np.uint8)).save(tmp_path / "b.png")
    load_photos.cache_clear()
    with pytest.raises(ConfigError, match="at least 28x28"):
        load_photos(str(tmp_path))


# --- scenarios -----------------------------------------------------------------------------

def test_shared_target_follows_each_clients_source_label_skew():
    cfg = make_config({**DA, "num-clients": 5, "alpha": 0.3})
    fed = federated_data(cfg)
    for s in fed.client_stats():
        assert s["num-target-train"] > 0 and s["num-train"] > 0
        # digits-m has digits' labels: the same counts per client and class
        assert s["target-label-counts"] == s["label-counts"]
    # with a target pool of another size the counts stay proportional
    src_labels = np.repeat(np.arange(3), 10)
    parts = [np.arange(0, 15), np.arange(15, 30)]
    tgt = follow_label_skew(parts, src_labels, np.repeat(np.arange(3), 20), 3, seed=0)
    counts = [np.bincount(np.repeat(np.arange(3), 20)[p], minlength=3).tolist() for p in tgt]
    assert counts == [[20, 10, 0], [0, 10, 20]]
    assert len(np.intersect1d(tgt[0], tgt[1])) == 0


@pytest.mark.parametrize("scenario", ["split", "domain-per-client"])
def test_split_scenarios_put_each_domain_on_its_own_clients(scenario):
    cfg = make_config({**DA, "num-clients": 5, "da-scenario": scenario,
                       "target-client-share": 0.4})
    stats = federated_data(cfg).client_stats()
    assert [s["num-train"] > 0 for s in stats] == [True, True, True, False, False]
    assert [s["num-target-train"] > 0 for s in stats] == [False, False, False, True, True]
    assert sum(s["num-train"] + s["num-val"] + s["num-test"] for s in stats) == 1797
    if scenario == "domain-per-client":  # IID within a domain: every client sees every label
        assert all(min(s["label-counts"] or [0]) > 0 for s in stats[:3])


def test_source_and_target_share_one_input_shape():
    spec = dataset_spec(make_config({**DA, "target-dataset": "digits-m"}))
    assert spec.input_shape == (3, CROP, CROP)
    data = federated_data(make_config(DA)).client(0)
    assert data.train.x.shape[1:] == data.target_train.x.shape[1:] == (3, CROP, CROP)
    # grey source shown as colour: the channels are equal; both domains lie in [-1, 1]
    assert torch.equal(data.train.x[:, 0], data.train.x[:, 2])
    for x in (data.train.x, data.target_train.x):
        assert float(x.min()) >= -1 and float(x.max()) <= 1
    # digits against MNIST: grey, 28x28, no channel added
    assert dataset_spec(make_config({**DA, "target-dataset": "mnist"})).input_shape == \
        (1, CROP, CROP)


@pytest.mark.parametrize("values, fragment", [
    ({"trainer": "dann", "target-dataset": ""}, "set 'target-dataset'"),
    ({"trainer": "supervised"}, "read only by the domain-adaptation trainers"),
    ({"target-dataset": "synthetic"}, "pairs image datasets"),
    ({"da-scenario": "split", "num-clients": 1}, "num-clients >= 2"),
])
def test_domain_adaptation_config_errors(values, fragment):
    with pytest.raises(ConfigError) as info:
        check_compatible(make_config({**DA, **values}))
    assert fragment in str(info.value)


def test_bad_scenario_and_missing_files_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="must be one of 'shared-target', 'split', 'domain-per-client'"):
        make_config({**DA, "da-scenario": "mixed"})
    with pytest.raises(ConfigError, match="unknown dataset"):
        make_config({**DA, "target-dataset": "mnistm"})
    with pytest.raises(ConfigError, match="no USPS files") as info:
        preflight(make_config({**DA, "target-dataset": "usps", "data-dir": str(tmp_path)}))
    assert "usps.bz2" in str(info.value)
    with pytest.raises(ConfigError, match="phases"):
        preflight(make_config({**DA, "trainer": "adda", "num-rounds": 3,
                               "adda-source-rounds": 3}))


# --- ADDA and the server's phases -------------------------------------------------------------

def _adda(phase: str):
    cfg = make_config({**DA, "trainer": "adda", "num-rounds": 4, "adda-source-rounds": 2})
    trainer = ADDATrainer(cfg)
    trainer.begin(3, phase)
    return cfg, trainer, trainer.build_model(dataset_spec(cfg), seed=0)


def test_adda_phases_and_target_encoder_initialisation():
    cfg, trainer, model = _adda("adapt")
    phases = trainer.phases()
    assert [(p.name, p.rounds) for p in phases] == [("source", 2), ("adapt", 2)]
    assert phases[1].config == {"optimizer": "adam", "lr": 0.0002, "momentum": 0.5}  # paper
    state = {k: v.clone() for k, v in model.state_dict().items()}
    first = next(k for k in state if k.startswith("encoder."))
    state[first] += 1.0  # the trained source encoder differs from its initialisation
    begun = phases[1].begin(state)
    for key, value in state.items():
        if key.startswith("encoder."):
            assert torch.equal(begun["source_" + key], value)
            assert torch.equal(begun[key], value)
    assert init_target_encoder is phases[1].begin


def test_adda_adaptation_trains_only_the_target_encoder_and_discriminator():
    cfg, trainer, model = _adda("adapt")
    data = federated_data(cfg).client(0)
    batch = next(trainer.batches(data, torch.Generator().manual_seed(0)))
    assert batch.source_x is not None and batch.target_x is not None
    trainer.loss(model, batch).backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(grads[n] is None for n in grads if n.startswith(("classifier.", "source_")))
    assert all(grads[n] is not None for n in grads if n.startswith(("encoder.", "discrim")))
    # the discriminator's gradient is that of its own loss alone (the inverted-label term
    # reaches the target encoder only)
    model.zero_grad()
    fs = model.source_encoder(batch.source_x)
    ft = model.encoder(batch.target_x).detach()
    logits = model.discriminator(torch.cat([fs, ft]))
    labels = torch.cat([torch.zeros(len(fs)), torch.ones(len(ft))]).long()
    torch.nn.functional.cross_entropy(logits, labels).backward()
    for n, p in model.discriminator.named_parameters():
        torch.testing.assert_close(grads["discriminator." + n], p.grad)


@pytest.mark.parametrize("strategy", ["ditto", "local"])
def test_a_model_kept_on_the_client_enters_adaptation_with_its_own_source_encoder(strategy):
    from fedtl.clients.ditto import PERSONAL, Ditto
    from fedtl.clients.local_only import OWN, LocalOnly

    cfg = make_config({**DA, "trainer": "adda", "strategy": strategy, "num-rounds": 4,
                       "adda-source-rounds": 2, "local-steps": 3})
    rule, key = (Ditto, PERSONAL) if strategy == "ditto" else (LocalOnly, OWN)
    data, spec, state = federated_data(cfg).client(0), dataset_spec(cfg), {}

    def client_round(server_round, phase, weights):
        trainer = ADDATrainer(cfg)
        trainer.begin(server_round, phase)
        model = trainer.build_model(spec, seed=0)
        model.load_state_dict(weights)
        rule(cfg, trainer, torch.device("cpu")).train(
            model, data, torch.Generator().manual_seed(server_round), state)
        return {k: v.clone() for k, v in state[key].items()}

    initial = ADDATrainer(cfg).build_model(spec, seed=0).state_dict()
    stage1 = client_round(2, "source", initial)
    encoder = [k for k in stage1 if k.startswith("encoder.")]
    assert not torch.equal(stage1[encoder[0]], stage1["source_" + encoder[0]])
    # stage 2 begins: the server froze the GLOBAL source encoder in the model it sends; the
    # kept model freezes its own, as it was at the end of stage 1, and keeps it frozen
    sent = init_target_encoder(initial)
    for server_round in (3, 4):
        kept = client_round(server_round, "adapt", sent)
        assert all(torch.equal(kept["source_" + k], stage1[k]) for k in encoder)
    assert not torch.equal(kept[encoder[0]], stage1[encoder[0]])  # M_t trained


def test_adda_stage_one_is_source_classification():
    cfg, trainer, model = _adda("source")
    assert trainer.domains() == (True, False)
    data = federated_data(cfg).client(0)
    batch = next(trainer.batches(data, torch.Generator().manual_seed(0)))
    assert batch.target_x is None
    expected = torch.nn.functional.cross_entropy(model(batch.source_x), batch.source_y)
    assert torch.equal(trainer.loss(model, batch), expected)
    assert trainer.num_examples(data) == len(data.train)


def test_oracle_learns_target_labels_and_validates_on_the_target():
    cfg = make_config({**DA, "trainer": "target-oracle"})
    data = federated_data(cfg).client(0)
    trainer = TargetOracleTrainer(cfg)
    x, _ = next(trainer.batches(data, torch.Generator().manual_seed(0)))
    assert x.shape[1:] == data.target_train.x.shape[1:]
    assert trainer.num_examples(data) == len(data.target_train)
    model = trainer.build_model(dataset_spec(cfg), seed=0)
    assert trainer.evaluate(model, data)["val"].total == len(data.target_val)


def test_phase_schedule_overrides_config_and_checks_rounds():
    cfg = make_config({"num-rounds": 3, "lr": 0.1})
    schedule = phase_schedule(cfg, [Phase("a", 1), Phase("b", 2, {"lr": 0.5})])
    assert [(p.name, c["lr"], c["phase"]) for p, c in schedule] == \
        [("a", 0.1, "a"), ("b", 0.5, "b"), ("b", 0.5, "b")]
    with pytest.raises(ConfigError, match="add up"):
        phase_schedule(cfg, [Phase("a", 1)])
    with pytest.raises(ConfigError, match="'lr' = -1"):
        phase_schedule(cfg, [Phase("a", 3, {"lr": -1.0})])


def test_best_round_is_chosen_within_the_last_phase():
    rounds = [
        {"round": 1, "phase": "source", "evaluated": True, "global_val_accuracy": 0.9,
         "global_accuracy": 0.5, "personalized_val_accuracy": 0.9},
        {"round": 2, "phase": "adapt", "evaluated": True, "global_val_accuracy": 0.7,
         "global_accuracy": 0.6, "personalized_val_accuracy": 0.6},
        {"round": 3, "phase": "adapt", "evaluated": True, "global_val_accuracy": 0.6,
         "global_accuracy": 0.8, "personalized_val_accuracy": 0.8},
    ]
    best = select_best(rounds)
    assert best["global_round"] == 2 and best["global_accuracy"] == 0.6
    assert best["personalized_round"] == 3
    assert best["selected_on"] == "validation"
    # val-fraction = 0: no round has a validation score, so "best" is the last round, and
    # says so
    blind = [{k: v for k, v in r.items() if "_val_" not in k} for r in rounds]
    best = select_best(blind)
    assert best["global_round"] == best["personalized_round"] == 3
    assert best["selected_on"] == "last round (no validation split)"


def test_dann_batch_without_target_still_trains_the_domain_head():
    cfg = make_config(DA)
    trainer = DANNTrainer(cfg)
    model = trainer.build_model(dataset_spec(cfg), seed=0)
    x = torch.zeros(4, 3, CROP, CROP)
    loss = trainer.loss(model, DomainBatch(x, torch.zeros(4, dtype=torch.long), None, 0.5))
    loss.backward()
    assert model.domain_head[0].weight.grad is not None


@pytest.mark.parametrize("batch_norm", [False, True])
def test_dann_normalises_each_domain_with_its_own_batch_statistics(batch_norm):
    cfg = make_config({**DA, "model": "dann-mnist", "batch-norm": batch_norm})
    trainer = DANNTrainer(cfg)
    model = trainer.build_model(dataset_spec(cfg), seed=0).train()
    g = torch.Generator().manual_seed(0)
    xs, xt = torch.randn(6, 3, CROP, CROP, generator=g), torch.randn(5, 3, CROP, CROP, generator=g) + 2
    ys = torch.arange(6) % 10
    fs, ft = model.features(xs), model.features(xt)  # one pass per domain
    ce = torch.nn.functional.cross_entropy
    # the paper's domain term: one mean per domain, summed
    expected = (ce(model.classifier(fs), ys) + ce(model.domain_head(fs), torch.zeros(6).long())
                + ce(model.domain_head(ft), torch.ones(5).long()))
    loss = trainer.loss(model, DomainBatch(xs, ys, xt, 0.5))
    assert torch.allclose(loss, expected, atol=1e-6)
    joint = model.features(torch.cat([xs, xt]))  # one pass over both: differs only with BN
    assert torch.allclose(joint, torch.cat([fs, ft]), atol=1e-5) == (not batch_norm)


def test_local_optimizer_is_sgd_or_adam_with_momentum_as_beta1():
    from fedtl.clients.update_rule import local_optimizer

    params = [torch.nn.Parameter(torch.zeros(3))]
    sgd = local_optimizer(params, make_config({"lr": 0.1, "momentum": 0.9}))
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["momentum"] == 0.9
    adam = local_optimizer(params, make_config({"optimizer": "adam", "lr": 2e-4, "momentum": 0.5}))
    assert isinstance(adam, torch.optim.Adam)
    assert adam.defaults["betas"] == (0.5, 0.999) and adam.defaults["lr"] == 2e-4


def test_adam_is_refused_where_pfedme_runs_its_own_solver():
    with pytest.raises(ConfigError, match="optimizer.*pFedMe's clients run"):
        make_config({"strategy": "pfedme", "optimizer": "adam"})
    with pytest.raises(ConfigError, match="adda-adapt-optimizer=sgd"):
        make_config({**DA, "trainer": "adda", "strategy": "pfedme"})
    make_config({**DA, "trainer": "adda", "strategy": "pfedme", "adda-adapt-optimizer": "sgd",
                 "adda-adapt-lr": 0.01})


def test_dann_domain_term_is_the_papers_sum_of_domain_means_or_tllibs_pooled_mean():
    xs, xt = torch.randn(6, 3, CROP, CROP), torch.randn(2, 3, CROP, CROP) + 1
    ys = torch.arange(6) % 10
    ce = torch.nn.functional.cross_entropy
    terms = {}
    for choice in ("sum-of-domain-means", "pooled-mean"):
        cfg = make_config({**DA, "dann-domain-loss": choice})
        trainer = DANNTrainer(cfg)
        model = trainer.build_model(dataset_spec(cfg), seed=0)
        fs, ft = model.features(xs), model.features(xt)
        label_loss = ce(model.classifier(fs), ys)
        terms[choice] = trainer.loss(model, DomainBatch(xs, ys, xt, 0.5)) - label_loss
        source_ce = ce(model.domain_head(fs), torch.zeros(6).long(), reduction="sum")
        target_ce = ce(model.domain_head(ft), torch.ones(2).long(), reduction="sum")
        expected = (source_ce / 6 + target_ce / 2 if choice == "sum-of-domain-means"
                    else (source_ce + target_ce) / 8)
        torch.testing.assert_close(terms[choice], expected)
    # unequal batches: the two differ by more than a factor of two
    assert not torch.allclose(terms["sum-of-domain-means"], 2 * terms["pooled-mean"])
    with pytest.raises(ConfigError, match="dann-domain-loss"):
        make_config({**DA, "dann-domain-loss": "sum"})
