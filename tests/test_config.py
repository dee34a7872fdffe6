"""Config keys: defaults, types, impossible values, and the Flower App's defaults."""

from __future__ import annotations

import importlib.util
import math
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

from fedtl.config import (
    DEFAULTS,
    ConfigError,
    format_override,
    make_config,
    parse_override,
    resolve,
)
from fedtl.data import check_compatible
from fedtl.simulation import preflight

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_are_valid_and_attribute_access_uses_snake_case():
    cfg = make_config()
    assert cfg.num_clients == DEFAULTS["num-clients"]
    assert cfg["pfedme-lambda"] == cfg.pfedme_lambda


def test_pyproject_flower_config_holds_every_default():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["tool"]["flwr"]["app"]["config"] == DEFAULTS


def test_simulation_files_are_valid_run_configs():
    files = sorted((ROOT / "simulations").glob("*.toml"))
    assert files, "simulations/ holds the named experiments"
    for path in files:
        if "bench" in tomllib.loads(path.read_text()):
            continue  # a bench spec (fedtl bench), checked in tests/test_bench.py
        resolve(path)


def _benchmark(name: str):
    """benchmarks/<name>.py as a module (the benchmarks are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"{name}_benchmark",
                                                  ROOT / "benchmarks" / f"{name}.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


@pytest.mark.parametrize("method", ["dann", "adda"])
def test_domain_adaptation_experiment_files_are_the_benchmarks_setting(method):
    bench = _benchmark("domain_adaptation")
    args = bench.command("mnist-mnistm", method, Path("out"), "../shared/data", [])
    overrides = [args[i + 1] for i, arg in enumerate(args) if arg == "--set"]
    named = dict(resolve(ROOT / "simulations" / f"da-mnist-mnistm-{method}.toml"))
    benchmarked = dict(resolve(None, overrides))
    if method != "adda":  # the benchmark sets ADDA's keys for every method; DANN ignores them
        benchmarked = {k: v for k, v in benchmarked.items() if not k.startswith("adda-")}
        named = {k: v for k, v in named.items() if not k.startswith("adda-")}
    assert named == benchmarked


def test_every_domain_adaptation_shift_is_a_valid_config_of_registered_datasets():
    from fedtl.registry import DATASETS

    bench = _benchmark("domain_adaptation")
    for shift in bench.SHIFTS:
        for method in bench.METHODS:
            args = bench.command(shift, method, Path("out"), "../shared/data", [])
            cfg = dict(resolve(None, [args[i + 1] for i, a in enumerate(args) if a == "--set"]))
            assert cfg["trainer"] == method
            DATASETS.get(cfg["dataset"]), DATASETS.get(cfg["target-dataset"])
            if method == "dann":  # the term the README's DANN tables were measured with
                assert cfg["dann-domain-loss"] == "pooled-mean"
    # a user's --set comes after the benchmark's own and wins
    args = bench.command("mnist-mnistm", "dann", Path("out"), "../shared/data",
                         ["dann-domain-loss=sum-of-domain-means"])
    cfg = dict(resolve(None, [args[i + 1] for i, a in enumerate(args) if a == "--set"]))
    assert cfg["dann-domain-loss"] == "sum-of-domain-means"


@pytest.mark.parametrize("dataset, method", [
    ("mnist", "instance-spreading"), ("mnist", "barlow-twins"), ("digits", "barlow-twins"),
])
def test_self_supervised_experiment_files_are_the_benchmarks_setting(dataset, method):
    bench = _benchmark("self_supervised")
    fraction = {"mnist": 0.01, "digits": 0.1}[dataset]
    benchmarked = bench.config_for(dataset, method, fraction, "../shared/data")
    named = resolve(ROOT / "simulations" / f"ssl-{dataset}-{method}.toml")
    assert dict(named) == dict(make_config(benchmarked))


@pytest.mark.parametrize("name, value", [
    ("batch-norm", True), ("batch-norm", False), ("num-rounds", 30), ("lr", 0.05),
    ("model", "dann-mnist"),
])
def test_format_override_is_read_back_by_parse_override(name, value):
    text = format_override(name, value)
    assert parse_override(text) == (name, value)
    assert text != f"{name}=True"


@pytest.mark.parametrize("values, fragment", [
    ({"strategy": "fedsgd"}, "Accepted: fedavg, pfedme"),
    ({"trainer": "nope"}, "unknown trainer"),
    ({"dataset": "mnst"}, "Did you mean 'mnist'"),
    ({"partitioner": "dirchlet"}, "Did you mean 'dirichlet'"),
    ({"model": "vgg"}, "unknown model"),
    ({"alpha": 0.0}, "'alpha' = 0.0 (config): must be > 0"),
    ({"alpha": -1}, "must be > 0"),
    ({"fraction-train": 0.0}, "(0, 1]"),
    ({"fraction-train": 1.5}, "(0, 1]"),
    ({"num-rounds": 0}, "must be >= 1"),
    ({"beta": 0.0}, "'beta'"),
    ({"val-fraction": 0.5, "test-fraction": 0.5}, "sum < 1"),
    ({"num-clients": "ten"}, "expected an integer"),
    ({"lr": True}, "expected a number"),
    ({"lr": float("nan")}, "must be finite"),
    ({"num-rondus": 3}, "Did you mean 'num-rounds'"),
])
def test_bad_values_name_key_value_and_what_is_accepted(values, fragment):
    with pytest.raises(ConfigError, match=None) as info:
        make_config(values)
    assert fragment in str(info.value)


def test_integer_accepted_for_float_keys():
    assert make_config({"lr": 1}).lr == 1.0


def test_override_parsing_uses_the_keys_type():
    assert parse_override("num-rounds=5") == ("num-rounds", 5)
    assert parse_override("lr=0.1") == ("lr", 0.1)
    assert parse_override("dataset='mnist'") == ("dataset", "mnist")
    with pytest.raises(ConfigError, match="expected an integer"):
        parse_override("num-rounds=five")
    with pytest.raises(ConfigError, match="key=value"):
        parse_override("num-rounds")
    with pytest.raises(ConfigError, match="unknown config key 'rounds'"):
        parse_override("rounds=3")


def test_toml_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("num-rounds = = 3\n")
    with pytest.raises(ConfigError, match="bad.toml' is not valid TOML"):
        resolve(bad)
    nested = tmp_path / "nested.toml"
    nested.write_text("[section]\nnum-rounds = 3\n")
    with pytest.raises(ConfigError, match="flat key = value"):
        resolve(nested)
    with pytest.raises(ConfigError, match="does not exist"):
        resolve(tmp_path / "missing.toml")


def test_errors_name_where_a_value_came_from_and_overrides_mend_a_file(tmp_path):
    path = tmp_path / "exp.toml"
    path.write_text('alpha = -2.0\nnum-rounds = "five"\n')
    with pytest.raises(ConfigError, match="'num-rounds' = 'five' \\(in .*exp.toml\\)"):
        resolve(path)
    with pytest.raises(ConfigError, match="'alpha' = -2.0 \\(in .*exp.toml\\): must be > 0"):
        resolve(path, ["num-rounds=5"])
    with pytest.raises(ConfigError, match="'alpha' = 0.0 \\(--set\\): must be > 0"):
        resolve(path, ["num-rounds=5", "alpha=0"])
    # keys that clash in the file alone: an override settles it, as in `fedtl bench`
    path.write_text('strategy = "pfedme"\noptimizer = "adam"\n')
    with pytest.raises(ConfigError, match="'optimizer' = 'adam'"):
        resolve(path)
    assert resolve(path, ["optimizer=sgd"]).optimizer == "sgd"


@pytest.mark.parametrize("values, fragment", [
    ({"partitioner": "pathological", "labels-per-client": 11}, "has 10 classes"),
    ({"num-clients": 5000}, "more clients than the 1797 samples"),
    ({"dataset": "synthetic", "model": "cnn", "partitioner": "natural"}, "needs images"),
    ({"partitioner": "natural"}, "has no natural clients"),
])
def test_dataset_aware_checks(values, fragment):
    with pytest.raises(ConfigError) as info:
        check_compatible(make_config(values))
    assert fragment in str(info.value)


def test_missing_dataset_files_are_a_config_error(tmp_path):
    cfg = make_config({"dataset": "mnist", "data-dir": str(tmp_path)})
    with pytest.raises(ConfigError) as info:
        preflight(cfg)
    assert "MNIST/raw" in str(info.value) and "data-dir" in str(info.value)


def test_corrupt_dataset_files_are_a_config_error(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                 "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        (raw / name).write_bytes(b"not an idx file")
    with pytest.raises(ConfigError, match="cannot be read"):
        preflight(make_config({"dataset": "mnist", "data-dir": str(tmp_path)}))


def test_impossible_partition_is_reported_before_ray():
    cfg = make_config({"num-clients": 200, "partitioner": "dirichlet", "alpha": 0.05,
                       "min-partition-size": 20})
    with pytest.raises(ConfigError, match="partitioner"):
        preflight(cfg)


def test_gpu_share_without_gpu_is_refused():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(ConfigError, match="client-num-gpus"):
        preflight(make_config({"client-num-gpus": 0.5}))


@pytest.mark.parametrize("args, fragment", [
    (["run", "--set", "strategy=fedprox"], "unknown strategy"),
    (["run", "--set", "alpha=-2"], "'alpha' = -2.0 (--set): must be > 0"),
    (["run", "--set", "partitioner=pathological", "--set", "labels-per-client=12"],
     "labels-per-client"),
    (["run", "--set", "bogus=1"], "unknown config key 'bogus'"),
    (["run", "--out", ".."], "--out .. is not empty: name a new or empty folder"),
])
def test_cli_exits_nonzero_with_one_clear_line_within_seconds(args, fragment, tmp_path):
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "fedtl", *args], capture_output=True,
                          text=True, cwd=tmp_path, timeout=60)
    assert proc.returncode == 2
    assert fragment in proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert time.monotonic() - started < 30
    assert not (tmp_path / "runs").exists(), "nothing is written for an invalid config"


def test_readme_documents_every_key_with_its_default():
    readme = (ROOT / "README.md").read_text()
    for name, default in DEFAULTS.items():
        shown = repr(default) if isinstance(default, str) else str(default)
        assert f"| `{name}` | `{shown}` |" in readme, name


def test_gpu_check_covers_every_trainer_and_strategy_with_valid_configs():
    from fedtl.registry import STRATEGIES, TRAINERS

    bench = _benchmark("gpu_check")
    configs = [{**bench.SMALL, **{k: (v.format(teacher="teacher-run") if isinstance(v, str)
                                      else v) for k, v in case.items()}}
               for case in bench.CASES.values()]
    for values in configs:
        make_config(values)  # every case is a valid run config
    assert {c.get("trainer", "supervised") for c in configs} == set(TRAINERS)
    assert {c.get("strategy", "fedavg") for c in configs} == set(STRATEGIES)


def test_domain_adaptation_gains_table_counts_failed_seeds_and_averages_the_rest():
    bench = _benchmark("domain_adaptation")
    ok = {"status": "completed"}
    rows = {0: {"source-only": {**ok, "target_accuracy": 0.6},
                "dann": {**ok, "target_accuracy": 0.8}},
            1: {"source-only": {**ok, "target_accuracy": 0.62},
                "dann": {"status": "failed", "wall_seconds": 1.0}},
            2: {"source-only": {**ok, "target_accuracy": 0.6},
                "dann": {**ok, "target_accuracy": 0.7}}}
    table = bench.gains("mnist-mnistm", rows)
    assert "| dann | +20.00 | failed | +10.00 | +15.00 | 1 |" in table


def test_domain_adaptation_seeds_and_a_set_seed_are_refused_together(capsys):
    bench = _benchmark("domain_adaptation")
    with pytest.raises(SystemExit) as exc:
        bench.main(["--seeds", "0", "1", "--set", "seed=3"])
    assert exc.value.code == 2
    assert "--seeds or one seed with --set seed=N, not both" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.main(["--seeds", "1", "1"])
    assert "expected distinct seeds >= 0" in capsys.readouterr().err


def test_domain_adaptation_seeds_run_each_method_per_seed_and_print_the_gains(tmp_path,
                                                                             monkeypatch, capsys):
    bench = _benchmark("domain_adaptation")
    commands = []

    def fake_run(cmd):
        commands.append(cmd)
        seed = 1 if "seed=1" in cmd else 0
        accuracy = 0.6 + 0.1 * seed if "trainer=dann" in cmd else 0.5
        return {"status": "completed", "wall_seconds": 1.0, "target_accuracy": accuracy,
                "target_personalized_accuracy": None, "target_central_accuracy": None,
                "source_accuracy": 0.9}

    monkeypatch.setattr(bench, "run_one", fake_run)
    assert bench.main(["--shift", "digits-mnist", "--methods", "source-only", "dann",
                       "--seeds", "0", "1", "--out", str(tmp_path)]) == 0
    assert len(commands) == 4  # two methods, two seeds
    out = capsys.readouterr().out
    assert "digits -> mnist (seed 1)" in out
    assert "| dann | +10.00 | +20.00 | +15.00 | 0 |" in out


def test_ssl_ceiling_starts_from_the_random_encoder_and_trains_it():
    from fedtl.clients.trainers.self_supervised import encoder_scores

    bench = _benchmark("ssl_ceiling")
    values = bench._benchmark_settings()("digits", "barlow-twins", 0.1, "")
    cfg = make_config({**values, "num-clients": 3, "batch-size": 16})
    rows = bench.ceiling(cfg, steps=3, eval_every=2, threads=1)
    assert [r["step"] for r in rows] == [0, 2, 3]
    assert rows[0]["train_loss"] is None and all(math.isfinite(r["train_loss"]) for r in rows[1:])
    # step 0 is the benchmark's random-encoder baseline: the same seeded initialisation
    random = encoder_scores(cfg)
    assert rows[0]["pooled_probe_accuracy"] == random["pooled_probe_accuracy"]
    assert rows[-1]["pooled_knn_accuracy"] != random["pooled_knn_accuracy"]  # it trained
    with pytest.raises(SystemExit):
        bench.main(["--dataset", "digits", "--steps", "0"])
