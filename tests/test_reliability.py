"""Failing clients, killed runs, bad checkpoints and full disks lose nothing."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from fedtl import cli
from fedtl.config import make_config
from fedtl.results import RunDirectory
from fedtl.server_app import RunFailed
from fedtl.simulation import preflight, simulate


def _run(tmp_path, **values):
    cfg = make_config({"model": "mlr", "num-clients": 6, "out-dir": str(tmp_path), **values})
    preflight(cfg)
    run_dir = RunDirectory.create(cfg)
    return run_dir, simulate(cfg, run_dir)


@pytest.mark.e2e
def test_nan_inf_shape_and_crashing_clients_are_left_out_and_the_model_stays_finite(tmp_path):
    from fedtl.clients.client_app import injected_fault

    faults = {"fault-rate": 0.4, "fault-kinds": "nan,inf,shape,raise"}
    seed = next(s for s in range(100) if {"nan", "raise"} <= {
        injected_fault(make_config({**faults, "seed": s}), r, p)
        for r in range(1, 5) for p in range(6)})
    run_dir, summary = _run(tmp_path, **{"num-rounds": 4, "strategy": "pfedme", "seed": seed,
                                         **faults})
    assert summary["status"] == "completed" and summary["rounds_completed"] == 4
    reasons = [f["reason"] for f in summary["failures"]]
    assert any("non-finite" in r for r in reasons)
    assert any("crashed" in r for r in reasons)
    assert all(f["partition_id"] is not None and f["stage"] == "train"
               for f in summary["failures"])
    for r in run_dir.rounds():
        assert r["clients_trained"] == 6 - len(r["failures"])
    weights = torch.load(run_dir.path / "model.pt", weights_only=True)
    assert all(torch.isfinite(t).all() for t in weights.values())
    assert summary["final"]["global_accuracy"] > 0.5


@pytest.mark.e2e
def test_too_few_valid_replies_stop_the_run_with_a_clear_error(tmp_path):
    with pytest.raises(RunFailed, match="fewer than min-clients=6"):
        _run(tmp_path, **{"num-rounds": 3, "fault-rate": 0.5, "fault-kinds": "raise",
                          "min-clients": 6, "seed": 1})
    run = RunDirectory(next(p for p in tmp_path.iterdir() if p.is_dir()))
    summary = run.summary()
    assert summary["status"] == "failed" and "min-clients" in summary["error"]
    assert summary["rounds_completed"] == len(run.rounds())


@pytest.mark.e2e
def test_a_client_past_client_timeout_is_left_out(tmp_path):
    from fedtl.clients.client_app import injected_fault

    faults = {"fault-rate": 0.3, "fault-kinds": "timeout", "client-timeout": 10.0}
    # a seed where exactly one of the four clients hangs in the single round
    seed = next(s for s in range(200) if sum(
        injected_fault(make_config({**faults, "seed": s}), 1, p) == "timeout"
        for p in range(4)) == 1)
    run_dir, summary = _run(tmp_path, **{"num-rounds": 1, "num-clients": 4, "seed": seed,
                                         **faults})
    assert summary["status"] == "completed"
    assert [f["reason"] for f in summary["failures"]] == ["no reply within client-timeout = 10 s"]
    assert run_dir.rounds()[0]["clients_trained"] == 3


def _fedtl(args, cwd, **kw):
    return subprocess.Popen([sys.executable, "-m", "fedtl", *args], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


@pytest.mark.e2e
def test_sigkill_mid_run_then_resume_gives_the_uninterrupted_result(tmp_path):
    common = ["--no-plots", "--set", "strategy=pfedme", "--set", "num-clients=5",
              "--set", "num-rounds=6", "--set", "model=mlr", "--set", "partitioner=pathological",
              "--set", "fraction-train=0.6"]
    whole = tmp_path / "whole"
    killed = tmp_path / "killed"
    first = _fedtl(["run", "--out", str(whole), *common], tmp_path)
    victim = _fedtl(["run", "--out", str(killed), *common], tmp_path, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            rounds = (killed / "rounds.jsonl")
            if rounds.exists() and len(rounds.read_text().splitlines()) >= 3:
                break
            assert victim.poll() is None, victim.communicate()[1][-2000:]
            time.sleep(0.05)
        os.killpg(victim.pid, signal.SIGKILL)  # the run and its Ray processes, mid-round
        victim.wait()
    finally:
        if victim.poll() is None:
            os.killpg(victim.pid, signal.SIGKILL)
    assert first.wait(timeout=300) == 0, first.communicate()[1][-2000:]
    before = RunDirectory(killed).rounds()
    assert 3 <= len(before) < 6, "killed mid-run with finished rounds on disk"
    resumed = _fedtl(["run", "--resume", str(killed), "--no-plots"], tmp_path)
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-2000:]
    assert (killed / "rounds.jsonl").read_text() == (whole / "rounds.jsonl").read_text()
    a, b = RunDirectory(whole).summary(), RunDirectory(killed).summary()
    assert a["final"] == b["final"] and a["best"] == b["best"]
    wa = torch.load(whole / "model.pt", weights_only=True)
    wb = torch.load(killed / "model.pt", weights_only=True)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.e2e
def test_sigint_mid_run_exits_promptly_and_leaves_a_resumable_run(tmp_path):
    # SIGINT to the run's process alone, as `timeout -s INT` or a job scheduler sends it:
    # the run used to print its message, then hang at exit on Flower's message workers
    out = tmp_path / "run"
    run = _fedtl(["run", "--out", str(out), "--no-plots", "--set", "num-clients=4",
                  "--set", "num-rounds=500", "--set", "model=mlr"], tmp_path,
                 start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            rounds = out / "rounds.jsonl"
            if rounds.exists() and len(rounds.read_text().splitlines()) >= 2:
                break
            assert run.poll() is None, run.communicate()[1][-2000:]
            time.sleep(0.05)
        run.send_signal(signal.SIGINT)
        _, err = run.communicate(timeout=60)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
    assert run.returncode == 130, err[-2000:]
    assert "fedtl: interrupted; finished rounds are in" in err
    assert 2 <= len(RunDirectory(out).rounds()) < 500
    assert (out / "checkpoint.pt").is_file()


def test_corrupt_checkpoint_is_one_clear_error(tmp_path, capsys):
    cfg = make_config({"out-dir": str(tmp_path)})
    run_dir = RunDirectory.create(cfg)
    (run_dir.path / "checkpoint.pt").write_bytes(b"\x00garbage")
    assert cli.main(["run", "--resume", str(run_dir.path)]) == 2
    err = capsys.readouterr().err
    assert "checkpoint.pt is corrupt" in err and len(err.strip().splitlines()) == 1


def test_resume_refuses_a_directory_without_checkpoint_or_config(tmp_path, capsys):
    assert cli.main(["run", "--resume", str(tmp_path)]) == 2
    assert "not a fedtl run directory" in capsys.readouterr().err
    run_dir = RunDirectory.create(make_config({"out-dir": str(tmp_path / "x")}))
    assert cli.main(["run", "--resume", str(run_dir.path)]) == 2
    assert "no checkpoint.pt" in capsys.readouterr().err


def test_checkpoint_must_match_the_config(tmp_path):
    cfg = make_config({"out-dir": str(tmp_path)})
    run_dir = RunDirectory.create(cfg)
    rounds = [{"round": 1, "evaluated": False}]
    run_dir.save_checkpoint(1, {"w": torch.zeros(2)}, rounds, dict(cfg), 1.0)
    assert run_dir.load_checkpoint(dict(cfg))["round"] == 1
    from fedtl.config import ConfigError

    with pytest.raises(ConfigError, match="differs from the checkpoint's config in lr"):
        run_dir.load_checkpoint(dict(cfg.replace(lr=0.5)))
    # a checkpoint written before a key existed: fine while the key is at its default
    older = {k: v for k, v in dict(cfg).items() if k != "kd-temperature"}
    run_dir.save_checkpoint(1, {"w": torch.zeros(2)}, rounds, older, 1.0)
    assert run_dir.load_checkpoint(dict(cfg))["round"] == 1
    with pytest.raises(ConfigError, match="differs from the checkpoint's config in kd-temperature"):
        run_dir.load_checkpoint(dict(cfg.replace(kd_temperature=9.0)))


def test_round_writer_writes_in_order_and_reports_a_failed_write(tmp_path, monkeypatch):
    from fedtl.results import RoundWriter

    cfg = make_config({"model": "mlr"})
    run_dir = RunDirectory.create(cfg, tmp_path / "run")
    writer = RoundWriter(run_dir)
    rounds = []
    for rnd in (1, 2):
        rounds.append({"round": rnd})
        writer.write(rounds[-1], {"round": rnd, "round_seconds": 0.1}, {"w": torch.full((2,), rnd)},
                     rounds, dict(cfg), float(rnd))
    writer.wait()
    assert run_dir.rounds() == rounds
    assert run_dir.load_checkpoint(dict(cfg))["round"] == 2
    assert len((run_dir.path / "timings.jsonl").read_text().splitlines()) == 2

    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(run_dir, "save_checkpoint", full)
    rounds.append({"round": 3})
    writer.write(rounds[-1], {"round": 3}, {"w": torch.zeros(2)}, rounds, dict(cfg), 3.0)
    with pytest.raises(OSError, match="No space left"):  # the next write reports it
        writer.write({"round": 4}, {"round": 4}, {"w": torch.zeros(2)}, rounds, dict(cfg), 4.0)
    writer.close()
    assert [r["round"] for r in run_dir.rounds()] == [1, 2]  # no record without its checkpoint


@pytest.mark.e2e
def test_full_disk_gives_one_clear_message_and_keeps_finished_rounds(tmp_path, monkeypatch,
                                                                      capsys):
    from fedtl import results

    real = results.RunDirectory.append_round
    calls = {"n": 0}

    def append_round(self, record):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(errno.ENOSPC, "No space left on device", str(self.path / "rounds.jsonl"))
        return real(self, record)

    monkeypatch.setattr(results.RunDirectory, "append_round", append_round)
    out = tmp_path / "run"
    code = cli.main(["run", "--out", str(out), "--no-plots", "--set", "num-rounds=4",
                     "--set", "model=mlr", "--set", "num-clients=4"])
    assert code == 1
    err = capsys.readouterr().err
    assert "No space left on device" in err and "--resume" in err and "Traceback" not in err
    run = RunDirectory(out)
    assert [r["round"] for r in run.rounds()] == [1, 2]
    # the checkpoint of round 3 was written before the append failed: resume rebuilds it
    monkeypatch.setattr(results.RunDirectory, "append_round", real)
    assert cli.main(["run", "--resume", str(out), "--no-plots"]) == 0
    assert [r["round"] for r in run.rounds()] == [1, 2, 3, 4]
    assert json.loads((out / "summary.json").read_text())["status"] == "completed"


def test_fault_injection_is_reproducible_and_near_its_rate():
    from fedtl.clients.client_app import injected_fault

    cfg = make_config({"fault-rate": 0.2, "fault-kinds": "raise,nan"})
    draws = [injected_fault(cfg, r, p) for r in range(1, 51) for p in range(40)]
    assert draws == [injected_fault(cfg, r, p) for r in range(1, 51) for p in range(40)]
    rate = np.mean([d is not None for d in draws])
    assert 0.17 < rate < 0.23
    assert {d for d in draws if d} == {"raise", "nan"}


def test_a_diverged_round_is_not_saved_so_the_client_recovers(tmp_path):
    from torch import nn

    from fedtl.clients.client_app import LOCAL_PARTS, _commit
    from fedtl.clients.state import ClientStateStore

    store = ClientStateStore(tmp_path, partition_id=3)
    model = nn.Linear(2, 2)
    head = {"domain_head.0.weight": torch.ones(2, 2)}
    assert _commit(store, 1, {LOCAL_PARTS: head}, model)
    # round 2 diverged in the model: its state (and the NaN it might carry) is not saved
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    assert not _commit(store, 2, {LOCAL_PARTS: {"domain_head.0.weight": torch.zeros(2, 2)}},
                       model)
    # round 3 diverged only in the client's own part (a nested state entry)
    finite = nn.Linear(2, 2)
    poisoned = {LOCAL_PARTS: {"domain_head.0.weight": torch.full((2, 2), float("inf"))},
                "counts": {"step": torch.tensor(3)}}
    assert not _commit(store, 3, poisoned, finite)
    # round 4 starts from round 1's finite state
    loaded = store.load(before_round=4)
    assert torch.equal(loaded[LOCAL_PARTS]["domain_head.0.weight"], torch.ones(2, 2))
    # integer tensors never count as divergence
    assert _commit(store, 4, {"counts": {"seen": torch.tensor([1, 2])}}, finite)
    assert store.load(before_round=5)["counts"]["seen"].tolist() == [1, 2]


def test_client_state_survives_a_kill_while_the_previous_checkpoint_was_in_flight(tmp_path):
    from fedtl.clients.state import ClientStateStore

    # a client trained in rounds 4, 5 and 6; the run was killed during round 6 while round
    # 5's checkpoint was still being written, so it resumes after round 4 and redoes round 5
    store = ClientStateStore(tmp_path, partition_id=1)
    for server_round in (4, 5, 6):
        store.save(server_round, {"theta": {"w": torch.tensor([float(server_round)])}})
    assert float(store.load(before_round=5)["theta"]["w"]) == 4.0
