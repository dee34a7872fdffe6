"""DANN and ADDA end to end through Flower's Simulation Engine on Ray, offline:
scikit-learn's digits (source) -> digits-m (MNIST-M's recipe on them, the target)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from fedtl.config import make_config
from fedtl.data import dataset_spec
from fedtl.registry import TRAINERS
from fedtl.results import RunDirectory
from fedtl.simulation import preflight, simulate

pytestmark = pytest.mark.e2e

SHIFT = ["--set", "target-dataset=digits-m", "--set", "model=dnn", "--set", "num-clients=3",
         "--set", "batch-size=32", "--set", "local-steps=15", "--set", "momentum=0.9",
         "--set", "lr=0.02"]
DA_KEYS = ("target_accuracy", "target_personalized_accuracy", "source_accuracy")


def test_adda_runs_its_stages_as_server_phases(tmp_path):
    out = tmp_path / "adda"
    proc = subprocess.run(
        [sys.executable, "-m", "fedtl", "run", "--out", str(out), "--no-plots", *SHIFT,
         "--set", "trainer=adda", "--set", "num-rounds=5", "--set", "adda-source-rounds=3",
         "--set", "eval-every=2"],
        check=False, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "round 4/5  [adapt]" in proc.stderr  # the progress display names the phase
    run = RunDirectory(out)
    rounds = run.rounds()
    assert [r["phase"] for r in rounds] == ["source"] * 3 + ["adapt"] * 2
    # evaluated: every eval-every rounds and at the end of each phase
    assert [r["round"] for r in rounds if r["evaluated"]] == [2, 3, 4, 5]
    stage1 = rounds[2]
    assert stage1["source_test_global_accuracy"] > 0.5  # stage 1 learned the source labels
    summary = run.summary()
    for figures in (summary["final"], summary["best"]):
        assert all(figures[k] is not None for k in DA_KEYS)
    assert summary["best"]["global_round"] in (4, 5)  # chosen within the adapt phase
    assert summary["final"]["target_accuracy"] == rounds[-1]["global_accuracy"]
    assert summary["final"]["source_accuracy"] == rounds[-1]["source_test_global_accuracy"]
    # the frozen source encoder is the stage-1 encoder; the target encoder moved away from it
    weights = torch.load(out / "model.pt")
    enc = [k for k in weights if k.startswith("encoder.")]
    assert all(k.replace("encoder.", "source_encoder.", 1) in weights for k in enc)
    assert any(not torch.equal(weights[k], weights["source_" + k]) for k in enc)
    assert json.loads(proc.stdout.strip().splitlines()[-1])["final"]["global_accuracy"] > 0.1


def test_dann_under_pfedme_with_client_owned_domain_heads(tmp_path):
    values = {"trainer": "dann", "strategy": "pfedme", "target-dataset": "digits-m",
              "model": "dnn", "num-clients": 3, "num-rounds": 3, "local-steps": 10,
              "batch-size": 32, "lr": 0.02, "personal-lr": 0.02, "eval-every": 3,
              "dann-share-domain-head": False, "out-dir": str(tmp_path)}
    cfg = make_config(values)
    preflight(cfg)
    run_dir = RunDirectory.create(cfg)
    summary = simulate(cfg, run_dir)
    assert summary["status"] == "completed" and summary["rounds_completed"] == 3
    final = summary["final"]
    assert all(final[k] is not None for k in DA_KEYS)
    assert final["source_accuracy"] > 0.3 and final["target_accuracy"] > 0.15
    assert final["target_personalized_accuracy"] > 0.15
    # each client kept its own domain head: the server's copy never left its initial values
    initial = TRAINERS.get("dann")(cfg).build_model(dataset_spec(cfg), seed=cfg.seed)
    initial = initial.state_dict()
    final_weights = torch.load(run_dir.path / "model.pt")
    for key, value in final_weights.items():
        if key.startswith("domain_head."):
            torch.testing.assert_close(value, initial[key], rtol=0, atol=1e-5)
    assert any(not torch.allclose(final_weights[k], initial[k]) for k in initial
               if k.startswith("features."))
    rows = run_dir.table("clients.csv")
    assert len(rows) == 3 and all(r["source_test_global_accuracy"] for r in rows)
