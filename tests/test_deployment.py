"""A real deployment: a SuperLink and three SuperNodes as separate processes, TLS on,
SuperNode authentication on, each process with its own FLWR_HOME.

Run as root with iproute2, every SuperNode sits in its own network namespace with its own
address on a veth link to the SuperLink's bridge (a real network hop); otherwise (or with
FEDTL_TEST_NETNS=0) all listen on 127.0.0.1. The SuperNodes read their own .npz files
(``data-path``). One deployment serves all tests, in order: the refusals (an unregistered key;
no CA certificate), two rounds of FedAvg (the same numbers as the same clients in-process),
then two rounds of pFedMe during which one SuperNode is killed. The SuperLink's Grid polls
every 3 s and each message starts a ClientApp process, so rounds are few and the data tiny.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from sklearn.datasets import load_digits

from fedtl.deploy.localnet import LocalDeployment, process_tree
from fedtl.results import RunDirectory

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.e2e

SITES = ("site-1", "site-2", "site-3")
RUN = {"num-clients": 3, "num-rounds": 2, "eval-every": 2, "model": "mlr", "local-steps": 5,
       "finetune-steps": 2, "client-timeout": 150.0}


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    work = tmp_path_factory.mktemp("deployment")
    bunch = load_digits()
    x, y = bunch.images.astype(np.uint8), bunch.target
    configs = {}
    for i, name in enumerate(SITES):
        path = work / f"{name}.npz"
        np.savez(path, x=x[i::3][:150], y=y[i::3][:150])
        configs[name] = {"data-path": str(path)}
        if i < 2:  # site-3 holds only its data: the server assigns its partition id
            configs[name]["partition-id"] = i
    # FEDTL_TEST_NETNS=0 keeps everything on 127.0.0.1 even where namespaces could be made.
    isolate = {"0": False, "1": True}.get(os.environ.get("FEDTL_TEST_NETNS", ""))
    dep = LocalDeployment(work, node_keys=[*SITES, "spare", "stranger"], isolate=isolate)
    started: list[int] = []
    with dep:
        print(f"deployment: {'network namespaces' if dep.isolate else '127.0.0.1'}, "
              f"SuperLink at {dep.address}")
        node_ids = dict(zip([*SITES, "spare"], dep.register(*SITES, "spare")))
        nodes = {name: dep.start_supernode(name, configs[name]) for name in SITES}
        # Refused at once, so they run beside the real ones: a key the SuperLink does not
        # know, and a registered key on a node that lacks the CA certificate.
        refused = {
            "stranger": dep.start_supernode("stranger", {"data-path": "unused"}),
            "no-ca": dep.start_supernode("no-ca", {"data-path": "unused"}, key="spare",
                                         root_certificates=False),
        }
        dep.wait_connected(list(nodes.values()))
        yield {"dep": dep, "nodes": nodes, "refused": refused, "configs": configs,
               "node_ids": node_ids, "work": work}
        started = [q for p in dep.procs for q in process_tree(p.pid)]
    leftover = [p for p in started if Path(f"/proc/{p}").exists()
                and "flwr" in Path(f"/proc/{p}/cmdline").read_bytes().decode(errors="replace")]
    assert not leftover, f"processes left running: {leftover}"
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout \
        if dep.isolate else ""
    assert dep._tag not in namespaces


def _wait_exit(proc, timeout: float) -> str:
    try:
        proc.popen.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{proc.name} still running after {timeout:.0f} s:\n{proc.output()[-2000:]}")
    return proc.output()


def test_a_supernode_whose_key_is_not_registered_is_refused(deployment):
    out = _wait_exit(deployment["refused"]["stranger"], 120)
    assert "Failed to activate SuperNode" in out, out[-2000:]
    assert "SuperNode ID:" not in out
    assert "No SuperNode found with the given public key" in deployment["dep"].superlink.output()


def test_a_supernode_without_the_ca_certificate_cannot_connect(deployment):
    out = _wait_exit(deployment["refused"]["no-ca"], 120)
    assert "CERTIFICATE_VERIFY_FAILED" in out, out[-2000:]
    assert "SuperNode ID:" not in out


def _run(deployment, name: str, **values) -> tuple[object, Path]:
    out_dir = deployment["work"] / "runs"
    config = {**RUN, **values, "out-dir": str(out_dir), "run-name": name}
    return deployment["dep"].start_run(ROOT, config, name=f"flwr-run-{name}"), out_dir / name


def test_fedavg_two_rounds_gives_the_run_directory_and_the_numbers_of_an_in_process_run(
        deployment, tmp_path):
    proc, run_path = _run(deployment, "fedavg", strategy="fedavg")
    out = _wait_exit(proc, 600)
    assert proc.popen.returncode == 0, out[-3000:]
    assert "round 2/2" in out  # the ServerApp's log lines stream back to `flwr run`
    run = RunDirectory(run_path)
    summary = run.summary()
    assert summary["status"] == "completed" and summary["rounds_completed"] == 2
    for name in ("config.toml", "partition.csv", "rounds.jsonl", "clients.csv", "model.pt",
                 "plots/accuracy.png", "plots/clients.png", "plots/partition.png"):
        assert (run_path / name).is_file(), name
    rounds = run.rounds()
    assert all(r["clients_trained"] == 3 and not r["failures"] for r in rounds)
    assert rounds[-1]["clients_evaluated"] == 3
    partition = run.table("partition.csv")
    assert [int(r["num-train"]) + int(r["num-val"]) + int(r["num-test"]) for r in partition] \
        == [150, 150, 150]

    # The same clients (data, node ids, partition ids) in this process give the same numbers.
    from fedtl.config import make_config
    from fedtl.server_app import run_federation
    from test_deploy import InProcessGrid  # noqa: E402 (tests/ is on sys.path under pytest)
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    try:
        cfg = make_config({**RUN, "strategy": "fedavg", "out-dir": str(tmp_path)})
        grid = InProcessGrid({deployment["node_ids"][n]: deployment["configs"][n]
                              for n in SITES})
        local = RunDirectory.create(cfg)
        run_federation(grid, cfg, local)
    finally:
        TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved
    for deployed, here in zip(rounds, local.rounds()):
        for key in ("train_loss", "global_accuracy", "personalized_accuracy"):
            if here.get(key) is None:
                assert deployed.get(key) is None, key
            else:
                assert deployed.get(key) == pytest.approx(here[key], rel=1e-6), key
    assert rounds[-1]["global_accuracy"] is not None


def test_pfedme_two_rounds_go_on_when_a_supernode_is_killed_mid_run(deployment):
    proc, run_path = _run(deployment, "pfedme", strategy="pfedme")
    victim = deployment["nodes"]["site-3"]
    deadline = time.monotonic() + 600
    while not RunDirectory(run_path).rounds():
        assert proc.popen.poll() is None, proc.output()[-3000:]
        assert time.monotonic() < deadline, "round 1 did not finish"
        time.sleep(0.5)
    deployment["dep"].stop(victim, signal.SIGKILL)  # the machine dies with all it runs
    assert not victim.alive()
    out = _wait_exit(proc, 600)
    assert proc.popen.returncode == 0, out[-3000:]
    run = RunDirectory(run_path)
    assert run.summary()["status"] == "completed"
    first, second = run.rounds()
    assert first["clients_trained"] == 3 and not first["failures"]
    assert second["clients_trained"] == 2 and second["clients_evaluated"] == 2
    lost = {(f["partition_id"], f["stage"]) for f in second["failures"]}
    assert lost == {(2, "train"), (2, "evaluate")}, second["failures"]
    assert all("Node Unavailable" in f["reason"] or "client-timeout" in f["reason"]
               for f in second["failures"])
    assert second["global_accuracy"] is not None and len(run.table("clients.csv")) == 2
