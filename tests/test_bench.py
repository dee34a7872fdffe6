"""fedtl bench: spec validation, grid expansion, resume, the report, one short real bench."""

from __future__ import annotations

import csv
import json
import re
import tomllib
from pathlib import Path

import pytest

from fedtl import cli
from fedtl.bench.runner import FINISHED, FRESH, RESUME, plan, run_bench
from fedtl.bench.spec import load_spec
from fedtl.config import ConfigError
from fedtl.results import RunDirectory
from fedtl.server_app import FINAL_KEYS

ROOT = Path(__file__).resolve().parents[1]

SPEC = """
[bench]
title = "t"
seeds = [0, 1]
[report]
target-accuracy = 0.8
[base]
dataset = "digits"
model = "mlr"
num-clients = 4
num-rounds = 2
unseen-clients = 0.25
[methods.fedavg]
strategy = "fedavg"
[methods.ditto]
strategy = "ditto"
ditto-lambda = 0.5
[methods.local]
strategy = "local"
[settings.iid]
partitioner = "iid"
[settings."dir-0.3"]
partitioner = "dirichlet"
alpha = 0.3
"""


def spec_file(tmp_path: Path, text: str = SPEC) -> Path:
    path = tmp_path / "spec.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("edit, fragment", [
    (lambda s: s + "[bogus]\nx = 1\n", "unknown table [bogus]"),
    (lambda s: s.replace("seeds = [0, 1]", ""), "needs 'seeds'"),
    (lambda s: s.replace("seeds = [0, 1]", "seeds = [0, 0]"), "a seed is listed twice"),
    (lambda s: s.replace("seeds = [0, 1]", "seeds = 3"), "expected a non-empty list"),
    (lambda s: s.replace("num-rounds = 2", "num-rouns = 2"), "Did you mean 'num-rounds'"),
    (lambda s: s.replace("num-rounds = 2", "seed = 2"), "list the seeds in [bench] seeds"),
    (lambda s: s.replace("ditto-lambda = 0.5", "partitioner = 'iid'"),
     "every method must see the same per-client splits"),
    (lambda s: s.replace("ditto-lambda = 0.5", "unseen-clients = 0.5"),
     "every method must see the same per-client splits"),
    (lambda s: s.replace("ditto-lambda = 0.5", "lr = 0.1").replace("alpha = 0.3",
                                                                   "alpha = 0.3\nlr = 0.2"),
     "'lr' is set both in [settings] and in [methods]"),
    (lambda s: s + "[sweep]\nalpha = [0.1]\n", "also set in [settings] or [methods]"),
    (lambda s: s + "[sweep]\nlr = 0.1\n", "expected a non-empty list"),
    (lambda s: s.replace("alpha = 0.3", "alpha = 0.0"),
     "config key 'alpha' = 0.0 (cell dir-0.3/fedavg/seed-0): must be > 0"),
    (lambda s: s.replace('strategy = "local"', 'strategy = "lcoal"'), "Did you mean 'local'"),
    (lambda s: s.replace("target-accuracy = 0.8", "target-accuracy = 80"), "in (0, 1]"),
    (lambda s: s + "[references.fedavgg]\npersonalized = 0.9\n", "no method 'fedavgg'"),
    (lambda s: s + "[references.fedavg]\npersonalized = 94.5\n", "accuracy in [0, 1]"),
    (lambda s: s + "[references.fedavg]\nsetting = 'mlr'\n", "no such setting"),
    (lambda s: re.sub(r"\[methods\.\w+\]\nstrategy = \"\w+\"\n(ditto-lambda = 0.5\n)?", "", s),
     "no methods"),
    (lambda s: s.replace("[base]", "[base]\nlr = [0.1]"), "lists go in [sweep]"),
    (lambda s: s + "[settings.'a b']\npartitioner = 'iid'\n", "letters, digits"),
    (lambda s: s + "broken = [", "not valid TOML"),
])
def test_spec_errors_are_one_clear_line_naming_the_file(tmp_path, edit, fragment):
    path = spec_file(tmp_path, edit(SPEC))
    with pytest.raises(ConfigError) as info:
        load_spec(path)
    message = str(info.value)
    assert fragment in message, message
    assert message.startswith(f"bench spec {path}") and "\n" not in message.strip()


def test_set_may_not_touch_the_seed_and_overrides_every_cell(tmp_path):
    path = spec_file(tmp_path)
    with pytest.raises(ConfigError, match="sets 'seed' itself"):
        load_spec(path, ("seed=3",))
    spec = load_spec(path, ("num-rounds=7", "ditto-lambda=2.0"))
    assert {c.config.num_rounds for c in spec.cells} == {7}
    assert {c.config.ditto_lambda for c in spec.cells} == {2.0}


def test_grid_expands_settings_sweep_seeds_and_methods_in_data_order(tmp_path):
    spec = load_spec(spec_file(tmp_path, SPEC + "[sweep]\nbatch-size = [16, 32]\n"))
    assert len(spec.cells) == 2 * 2 * 2 * 3  # sweep x settings x seeds x methods
    first = spec.cells[:3]
    assert [c.method for c in first] == ["fedavg", "ditto", "local"]  # methods innermost
    assert {(c.setting, c.seed) for c in first} == {("iid", 0)}
    ids = [c.id for c in spec.cells]
    assert len(set(ids)) == len(ids)
    assert ids[0] == "iid+batch-size=16/fedavg/seed-0"
    cell = next(c for c in spec.cells if c.id == "dir-0.3+batch-size=32/ditto/seed-1")
    cfg = cell.config
    assert (cfg.partitioner, cfg.alpha, cfg.batch_size, cfg.ditto_lambda, cfg.seed) == \
        ("dirichlet", 0.3, 32, 0.5, 1)
    assert (cfg.num_clients, cfg.model, cfg.strategy) == (4, "mlr", "ditto")
    assert cell.relative_dir == Path("cells/dir-0.3+batch-size=32/ditto/seed-1")
    assert Path(cfg.out_dir) / cfg.run_name == cell.relative_dir
    # every method of a setting and seed shares the data keys (same per-client splits)
    from fedtl.data import DATA_KEYS

    same = [c for c in spec.cells if c.setting_label == cell.setting_label and c.seed == 1]
    assert len({tuple(c.config[k] for k in DATA_KEYS) for c in same}) == 1


def test_a_spec_without_settings_has_one_default_setting(tmp_path):
    text = SPEC.split("[settings.iid]")[0]
    spec = load_spec(spec_file(tmp_path, text))
    assert {c.setting for c in spec.cells} == {"default"} and len(spec.cells) == 6


def test_shipped_bench_specs_are_valid():
    specs = [p for p in sorted((ROOT / "simulations").glob("*.toml"))
             if "bench" in tomllib.loads(p.read_text())]
    assert {p.name for p in specs} >= {"bench-digits.toml", "pfedme-mnist.toml",
                                       "pfedme-synthetic.toml", "bench-mnist-alpha.toml"}
    for path in specs:
        spec = load_spec(path)
        assert spec.cells
    digits = load_spec(ROOT / "simulations" / "bench-digits.toml")
    assert len(digits.seeds) == 3 and digits.base["dataset"] == "digits"


# --- fabricated run directories: plan, resume and the report without Ray -----------------

def _fake_run(path: Path, cell, personalized: float, global_: float | None,
              status: str = "completed") -> None:
    run = RunDirectory.create(cell.config, path)
    rounds = []
    for rnd in range(1, cell.config.num_rounds + 1):
        scale = rnd / cell.config.num_rounds
        rounds.append({"round": rnd, "evaluated": True, "failures": [],
                       "personalized_accuracy": personalized * scale,
                       "global_accuracy": None if global_ is None else global_ * scale,
                       "unseen_personalized_accuracy": personalized * scale * 0.9,
                       "bytes_sent": 1000, "bytes_received": 500})
    for r in rounds:
        run.append_round(r)
    final = {k: None for k in FINAL_KEYS}
    final.update({"round": len(rounds), "personalized_accuracy": personalized,
                  "global_accuracy": global_, "unseen_personalized_accuracy": 0.5,
                  "personalized_accuracy_bottom10": personalized - 0.1})
    best = {**final, "selected_on": "validation", "global_round": 1, "personalized_round": 2}
    run.write_clients([{"partition_id": p, "test_global_accuracy": global_ if global_ else "",
                        "test_personalized_accuracy": personalized, "unseen": int(p == 3)}
                       for p in range(4)])
    run.write_summary({"status": status, "final": final, "best": best,
                       "rounds_completed": len(rounds), "wall_seconds": 2.0,
                       "bytes_sent": 1000 * len(rounds), "bytes_received": 500 * len(rounds),
                       "error": None if status == "completed" else "RunFailed: boom"})


def test_plan_reuses_finished_cells_resumes_checkpoints_and_restarts_the_rest(tmp_path):
    spec = load_spec(spec_file(tmp_path))
    out = tmp_path / "bench"
    assert {p.action for p in plan(spec, out, resume=False)} == {FRESH}
    out.mkdir()
    (out / "bench.toml").write_text(SPEC)
    finished, checkpointed, started = spec.cells[:3]
    _fake_run(out / finished.relative_dir, finished, 0.9, 0.8)
    run = RunDirectory.create(checkpointed.config, out / checkpointed.relative_dir)
    run.save_checkpoint(1, {}, [{"round": 1}], dict(checkpointed.config), 1.0)
    RunDirectory.create(started.config, out / started.relative_dir)  # no round finished
    actions = {p.cell.id: (p.action, p.rounds_done) for p in plan(spec, out, resume=True)}
    assert actions[finished.id] == (FINISHED, 2)
    assert actions[checkpointed.id] == (RESUME, 1)
    assert actions[started.id] == (FRESH, 0)
    with pytest.raises(ConfigError, match="add --resume"):
        plan(spec, out, resume=False)
    changed = load_spec(spec_file(tmp_path, SPEC.replace("num-rounds = 2", "num-rounds = 3")))
    with pytest.raises(ConfigError, match=r"another config \(num-rounds: 2 -> 3\)"):
        plan(changed, out, resume=True)
    other = tmp_path / "other"
    other.mkdir()
    (other / "x.txt").write_text("mine")
    with pytest.raises(ConfigError, match="holds no bench"):
        plan(spec, other, resume=True)


def test_resume_of_a_finished_bench_computes_nothing_and_writes_the_report(tmp_path,
                                                                            monkeypatch):
    spec = load_spec(spec_file(tmp_path))
    out = tmp_path / "bench"
    out.mkdir()
    (out / "bench.toml").write_text(SPEC)
    for i, cell in enumerate(spec.cells):
        has_global = cell.method != "local"
        _fake_run(out / cell.relative_dir, cell, 0.9 - 0.01 * i, 0.7 if has_global else None)
    before = {p: p.stat().st_mtime_ns for p in (out / "cells").rglob("*") if p.is_file()}

    def no_simulation(*args, **kwargs):
        raise AssertionError("a finished bench started a simulation")

    monkeypatch.setattr("fedtl.simulation.run_on_simulation", no_simulation)
    monkeypatch.setattr("fedtl.simulation.preflight", no_simulation)
    outcome = run_bench(spec, out, resume=True)
    assert (outcome.reused, outcome.ran, outcome.failures) == (len(spec.cells), 0, {})
    after = {p: p.stat().st_mtime_ns for p in (out / "cells").rglob("*") if p.is_file()}
    assert after == before, "no cell file was touched"
    report = out / "report"
    names = {p.name for p in report.iterdir()}
    assert {"report.md", "report.html", "results.csv", "curves-iid.png",
            "clients-iid.png", "curves-dir-0.3.png", "heterogeneity.png"} <= names
    rows = list(csv.DictReader(open(report / "results.csv")))
    assert len(rows) == len(spec.cells)
    assert {(r["method"], r["setting"], r["seed"]) for r in rows} == {
        (c.method, c.setting_label, str(c.seed)) for c in spec.cells}
    local = next(r for r in rows if r["method"] == "local")
    assert local["last_global_accuracy"] == "" and local["has_global_model"] == "False"
    md = (report / "report.md").read_text()
    assert "n/a (no global model)" in md and "Model selection on validation only" in md
    assert "n/a (no central test set)" in md  # digits has none
    # iid fedavg: seeds 0 and 1 are cells 0 and 3 -> personalized 0.90 and 0.87
    assert "| iid | fedavg | fine-tuned global model (FedAvg-FT) | 88.50 ± 1.50 | 70.00 ± 0.00" \
        in md
    html = (report / "report.html").read_text()
    assert html.count("data:image/png;base64,") == md.count("![") and 'src="http' not in html


def test_failed_cells_are_listed_and_counted(tmp_path):
    spec = load_spec(spec_file(tmp_path))
    out = tmp_path / "bench"
    for i, cell in enumerate(spec.cells):
        _fake_run(out / cell.relative_dir, cell, 0.9, None if cell.method == "local" else 0.7,
                  status="failed" if i == 0 else "completed")
    from fedtl.bench.report import write_report

    md = (write_report(spec, out) / "report.md").read_text()
    assert "1 failed" in md and "RunFailed: boom" in md
    assert "90.00 (1 of 2 seeds)" in md


# --- one short real bench through Flower + Ray ------------------------------------------------

TINY = """
[bench]
title = "tiny"
seeds = [0]
[base]
dataset = "digits"
model = "mlr"
num-clients = 4
num-rounds = 2
local-steps = 5
unseen-clients = 0.25
partitioner = "pathological"
[methods.fedavg]
strategy = "fedavg"
[methods.ditto]
strategy = "ditto"
[methods.local]
strategy = "local"
"""


@pytest.mark.e2e
def test_a_tiny_bench_runs_reports_and_resumes_without_recomputing(tmp_path, monkeypatch,
                                                                    capsys):
    path = spec_file(tmp_path, TINY)
    out = tmp_path / "bench"
    assert cli.main(["bench", str(path), "--out", str(out)]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (result["cells_run"], result["cells_failed"]) == (3, 0)
    spec = load_spec(path)
    runs = {c.method: RunDirectory(out / c.relative_dir) for c in spec.cells}
    for method, run in runs.items():
        summary = run.summary()
        assert summary["status"] == "completed" and summary["rounds_completed"] == 2
        assert summary["final"]["personalized_accuracy"] > 0.5
        assert summary["final"]["unseen_personalized_accuracy"] is not None
    # Ditto's global model is FedAvg's, exactly; local-only has none
    ditto, fedavg = runs["ditto"].rounds(), runs["fedavg"].rounds()
    assert [r["global_accuracy"] for r in ditto] == [r["global_accuracy"] for r in fedavg]
    assert all(r["global_accuracy"] is None for r in runs["local"].rounds())
    assert {"report.md", "report.html", "results.csv"} <= {p.name for p in
                                                          (out / "report").iterdir()}
    stamps = {p: p.stat().st_mtime_ns for p in (out / "cells").rglob("*") if p.is_file()}
    monkeypatch.setattr("fedtl.simulation.run_on_simulation",
                        lambda *a, **k: pytest.fail("resume recomputed a cell"))
    assert cli.main(["bench", str(path), "--out", str(out), "--resume"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (result["cells_reused"], result["cells_run"]) == (3, 0)
    assert stamps == {p: p.stat().st_mtime_ns for p in (out / "cells").rglob("*")
                      if p.is_file()}


def test_bench_cli_errors_are_one_line_and_write_nothing(tmp_path, capsys):
    path = spec_file(tmp_path, SPEC.replace("alpha = 0.3", "alpha = -1"))
    assert cli.main(["bench", str(path), "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert "must be > 0" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "b").exists()
    path = spec_file(tmp_path, SPEC.replace('"digits"', '"mnist"\ndata-dir = "nowhere"'))
    assert cli.main(["bench", str(path), "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert "data-dir" in err and "cell iid/fedavg/seed-0" in err
    assert not (tmp_path / "b").exists()


def test_report_only_writes_the_report_of_a_partial_bench_and_runs_nothing(tmp_path, capsys,
                                                                            monkeypatch):
    path = spec_file(tmp_path)
    spec = load_spec(path)
    out = tmp_path / "bench"
    assert cli.main(["bench", str(path), "--out", str(out), "--report-only"]) == 2
    assert "holds no bench" in capsys.readouterr().err
    out.mkdir()
    (out / "bench.toml").write_text(SPEC)
    for cell in spec.cells[:3]:  # the first setting and seed only
        _fake_run(out / cell.relative_dir, cell, 0.9, None if cell.method == "local" else 0.7)
    monkeypatch.setattr("fedtl.simulation.run_on_simulation",
                        lambda *a, **k: pytest.fail("--report-only ran a cell"))
    assert cli.main(["bench", str(path), "--out", str(out), "--report-only"]) == 0
    md = (out / "report" / "report.md").read_text()
    assert f"3 completed, {len(spec.cells) - 3} not run" in md
    assert "| dir-0.3 | fedavg | fine-tuned global model (FedAvg-FT) | not run |" in md
