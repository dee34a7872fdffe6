"""End-to-end runs through Flower's Simulation Engine on Ray, on small offline data."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedtl.config import make_config
from fedtl.results import RunDirectory
from fedtl.simulation import preflight, simulate

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.e2e

RUN_FILES = ("config.toml", "partition.csv", "rounds.jsonl", "clients.csv", "summary.json",
             "model.pt")


def test_cli_run_improves_accuracy_and_writes_the_run_directory(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "fedtl", "run", "--out", str(out),
         "--set", "num-clients=4", "--set", "num-rounds=5", "--set", "model=mlr",
         "--set", "partitioner=iid", "--set", "clip-grad-norm=1000"],
        capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["run_dir"] == str(out)
    for name in RUN_FILES:
        assert (out / name).is_file(), name
    assert {p.name for p in (out / "plots").iterdir()} == {"accuracy.png", "clients.png",
                                                          "partition.png"}
    run = RunDirectory(out)
    rounds = run.rounds()
    assert [r["round"] for r in rounds] == [1, 2, 3, 4, 5]
    assert rounds[-1]["global_accuracy"] > rounds[0]["global_accuracy"] + 0.1
    assert all(r["clients_trained"] == 4 and not r["failures"] for r in rounds)
    assert all(r["clipped_share"] == 0.0 for r in rounds)  # a clip above every gradient norm
    summary = run.summary()
    assert summary["status"] == "completed"
    for key in ("global_accuracy", "personalized_accuracy", "centralized_accuracy",
                "personalized_accuracy_std", "personalized_accuracy_bottom10"):
        assert key in summary["final"] and key in summary["best"]
    assert summary["final"]["centralized_accuracy"] is None  # digits has no central test set
    assert summary["best"]["selected_on"] == "validation"
    assert summary["wall_seconds"] > 0
    assert len(run.table("clients.csv")) == 4
    assert sum(int(r["num-train"]) + int(r["num-val"]) + int(r["num-test"])
               for r in run.table("partition.csv")) == 1797


def test_pfedme_personalizes_beyond_the_global_model_on_a_pathological_split(tmp_path):
    cfg = make_config({
        "strategy": "pfedme", "model": "mlr", "partitioner": "pathological",
        "labels-per-client": 2, "num-clients": 5, "num-rounds": 8, "eval-every": 4,
        "out-dir": str(tmp_path),
    })
    preflight(cfg)
    summary = simulate(cfg, RunDirectory.create(cfg))
    final = summary["final"]
    assert summary["rounds_completed"] == 8
    assert final["personalized_accuracy"] > final["global_accuracy"] + 0.05
    assert final["personalized_accuracy"] > 0.9


def _stop_process_groups(flwr_home: Path) -> None:
    """Stop every process whose command line names this test's FLWR_HOME (the detached
    local SuperLink and anything it started), by process-group id."""
    for proc_dir in Path("/proc").iterdir():
        if not proc_dir.name.isdigit():
            continue
        try:
            cmdline = (proc_dir / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if str(flwr_home) in cmdline:
            pid = int(proc_dir.name)
            try:
                os.killpg(os.getpgid(pid), signal.SIGTERM)
            except (ProcessLookupError, PermissionError):
                pass


def test_flwr_run_completes_offline_with_four_supernodes(tmp_path, flwr_home):
    out = tmp_path / "runs"
    env = dict(os.environ, FLWR_HOME=str(flwr_home),
               FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    flwr = Path(sys.executable).parent / "flwr"
    try:
        proc = subprocess.run(
            [str(flwr), "run", ".", "--stream",
             "--run-config", f"num-clients=4 num-rounds=2 model='mlr' out-dir='{out}'",
             "--federation-config", "num-supernodes=4"],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
        # the ServerApp writes the same run directory as `fedtl run`
        runs = [p for p in out.iterdir() if p.is_dir()]
        assert len(runs) == 1
        deadline = time.monotonic() + 30
        while not (runs[0] / "summary.json").exists() and time.monotonic() < deadline:
            time.sleep(0.5)
        summary = RunDirectory(runs[0]).summary()
        assert summary["status"] == "completed" and summary["rounds_completed"] == 2
        assert summary["num_clients"] == 4
    finally:
        _stop_process_groups(flwr_home)
