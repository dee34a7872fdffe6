"""Deployment pieces that need no SuperLink: certificates and keys, and how the server loop
copes with clients that fail, hang or hold bad data (fedtl's ClientApp run in-process)."""

from __future__ import annotations

import ipaddress
import json
import uuid
from collections.abc import Iterable

import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key
from flwr.app import Context, Error, Message, RecordDict
from flwr.serverapp import Grid
from sklearn.datasets import load_digits

from fedtl.clients.client_app import app as client_app
from fedtl.config import make_config
from fedtl.deploy.certs import make_certs
from fedtl.results import RunDirectory
from fedtl.server_app import RunFailed, assign_partition_ids, error_reason, run_federation

# --- certificates ---------------------------------------------------------------------------


def test_certs_sign_the_superlink_for_its_hosts_and_make_flower_readable_node_keys(tmp_path):
    from flwr.cli.supernode.register import try_load_public_key

    certs = make_certs(tmp_path / "certs", ["link.example.org", "10.1.2.3"], ["a", "b"])
    ca = x509.load_pem_x509_certificate(certs.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(certs.superlink_cert.read_bytes())
    server.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"localhost", "link.example.org"} <= set(san.get_values_for_type(x509.DNSName))
    assert {ipaddress.ip_address("10.1.2.3"), ipaddress.ip_address("127.0.0.1")} <= set(
        san.get_values_for_type(x509.IPAddress))
    for private, public in certs.supernode_keys.values():
        key = load_ssh_private_key(private.read_bytes(), None)  # what flower-supernode does
        assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
        assert try_load_public_key(public)  # what `flwr supernode register` does
        assert private.stat().st_mode & 0o077 == 0
    assert certs.ca_key.stat().st_mode & 0o077 == 0
    first_ca = certs.ca_cert.read_bytes()
    with pytest.raises(FileExistsError, match="--force"):
        make_certs(tmp_path / "certs", [], ["a"])
    assert certs.ca_cert.read_bytes() == first_ca
    make_certs(tmp_path / "certs", [], ["a"], force=True)
    assert certs.ca_cert.read_bytes() != first_ca


def test_certs_command_and_bad_hosts(tmp_path, capsys):
    from fedtl.cli import main

    out = tmp_path / "c"
    assert main(["deploy", "certs", str(out), "--host", "10.0.0.7", "--supernodes", "3"]) == 0
    assert sorted(p.name for p in (out / "supernodes").iterdir()) == [
        f"supernode-{i}.{ext}" for i in (1, 2, 3) for ext in ("key", "pub")]
    assert "flwr supernode register" in capsys.readouterr().out
    assert main(["deploy", "certs", str(tmp_path / "d"), "--host", "https://x:8000"]) == 2
    assert "not a host name or an IP address" in capsys.readouterr().err


# --- the server loop against misbehaving clients ------------------------------------------


class InProcessGrid(Grid):
    """Runs fedtl's ClientApp in this process for each node, like a SuperNode would.

    ``silent``: node id -> message types it never answers (a hung or lost client).
    """

    def __init__(self, node_configs: dict[int, dict], silent: dict[int, set[str]] | None = None):
        self.contexts = {n: Context(run_id=1, node_id=n, node_config=c, state=RecordDict(),
                                    run_config={}) for n, c in node_configs.items()}
        self.silent = silent or {}
        self.timeouts: list[float | None] = []

    def set_run(self, run) -> None:
        raise NotImplementedError

    @property
    def run(self):
        raise NotImplementedError

    def create_message(self, *args, **kwargs) -> Message:
        raise NotImplementedError

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        raise NotImplementedError

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        raise NotImplementedError

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None
                         ) -> Iterable[Message]:
        self.timeouts.append(timeout)
        replies = []
        for m in messages:
            m.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            node = m.metadata.dst_node_id
            if m.metadata.message_type in self.silent.get(node, set()):
                continue
            try:
                replies.append(client_app(m, self.contexts[node]))
            except Exception as exc:  # as a SuperNode's ClientApp runtime reports it
                reason = str(type(exc)) + ":<'" + str(exc) + "'>"
                replies.append(Message(Error(code=2, reason=reason), reply_to=m))
        return replies


@pytest.fixture(scope="module")
def sites(tmp_path_factory):
    """Three .npz files of digits, as three SuperNodes would hold them."""
    bunch = load_digits()
    x, y = bunch.images.astype(np.uint8), bunch.target
    folder = tmp_path_factory.mktemp("sites")
    paths = []
    for i in range(3):
        np.savez(folder / f"site{i}.npz", x=x[i::3][:200], y=y[i::3][:200])
        paths.append(str(folder / f"site{i}.npz"))
    return paths


pytestmark = pytest.mark.usefixtures("task_identity")


def _cfg(tmp_path, **values):
    base = {"num-clients": 3, "num-rounds": 2, "model": "mlr", "local-steps": 5,
            "finetune-steps": 2, "out-dir": str(tmp_path)}
    base.update({k.replace("_", "-"): v for k, v in values.items()})
    return make_config(base)


def test_a_client_with_missing_data_is_left_out_and_the_run_goes_on(tmp_path, sites):
    cfg = _cfg(tmp_path, client_timeout=120.0)
    grid = InProcessGrid({11: {"data-path": sites[0]}, 12: {"data-path": sites[1]},
                          13: {"data-path": str(tmp_path / "gone.npz")}})
    run_dir = RunDirectory.create(cfg)
    summary = run_federation(grid, cfg, run_dir)
    assert summary["status"] == "completed" and summary["rounds_completed"] == 2
    rounds = run_dir.rounds()
    (failure,) = rounds[0]["failures"]
    assert failure["stage"] == "describe" and failure["node_id"] == 13
    assert failure["reason"].endswith("gone.npz': does not exist on this SuperNode")
    assert all(r["clients_trained"] == 2 for r in rounds) and not rounds[1]["failures"]
    assert rounds[1]["clients_evaluated"] == 2
    assert [r["partition-id"] for r in run_dir.table("partition.csv")] == ["0", "1"]
    assert set(grid.timeouts) == {120.0}  # client-timeout bounds every wait


def test_a_client_that_stops_replying_is_recorded_as_timed_out(tmp_path, sites):
    cfg = _cfg(tmp_path, client_timeout=5.0)
    grid = InProcessGrid({n: {"data-path": p} for n, p in zip((21, 22, 23), sites)},
                         silent={23: {"train", "evaluate"}})
    run_dir = RunDirectory.create(cfg)
    run_federation(grid, cfg, run_dir)
    rounds = run_dir.rounds()
    for r in rounds:
        assert r["clients_trained"] == 2
        assert {(f["partition_id"], f["stage"]) for f in r["failures"]} >= {(2, "train")}
        assert all(f["reason"] == "no reply within client-timeout = 5 s" for f in r["failures"])
    assert rounds[-1]["clients_evaluated"] == 2
    assert {f["partition_id"] for f in rounds[0]["failures"]} == {2}


def test_the_run_stops_with_a_clear_error_when_no_client_is_left(tmp_path, sites):
    cfg = _cfg(tmp_path, num_clients=2)
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=np.zeros((20, 28, 28), np.uint8), y=np.zeros(20, int))
    grid = InProcessGrid({1: {"data-path": str(bad)}, 2: {"data-path": str(tmp_path / "no")}})
    run_dir = RunDirectory.create(cfg)
    with pytest.raises(RunFailed, match="no client could describe its data: .*needs images of "
                                        r"shape .*; data-path .* does not exist"):
        run_federation(grid, cfg, run_dir)
    assert run_dir.summary()["status"] == "failed"

    grid = InProcessGrid({1: {"data-path": sites[0]}, 2: {"data-path": sites[1]}},
                         silent={1: {"train"}, 2: {"train"}})
    with pytest.raises(RunFailed, match="round 1: 0 valid training replies, fewer than min-clients"):
        run_federation(grid, _cfg(tmp_path, num_clients=2, client_timeout=1.0),
                       RunDirectory.create(_cfg(tmp_path, num_clients=2)))


def test_a_local_only_client_whose_training_diverged_reports_it(tmp_path, sites):
    # local-only replies with the weights it received, finite whatever it trained: the
    # client itself must say that its round failed
    cfg = _cfg(tmp_path, strategy="local", lr=1e38, num_clients=2)
    state = tmp_path / "state"
    grid = InProcessGrid({n: {"data-path": sites[n - 1], "state-dir": str(state)}
                          for n in (1, 2)})
    with pytest.raises(RunFailed, match="training diverged in round 1"):
        run_federation(grid, cfg, RunDirectory.create(cfg))
    assert not list(state.rglob("round-*.pt"))  # nothing non-finite was kept
    # the same clients at a sane lr keep their own models there
    sane = _cfg(tmp_path, strategy="local", num_clients=2, num_rounds=1, run_name="sane")
    run_federation(grid, sane, RunDirectory.create(sane))
    assert len(list(state.rglob("round-*.pt"))) == 2


def test_error_reasons_are_read_from_both_of_flowers_wrappings():
    request = Message(RecordDict(), dst_node_id=3, message_type="train")
    request.metadata.__dict__["_message_id"] = "m"
    ray = ("\nException ClientAppException occurred. Message: \x1b[36mray::ClientAppActor.run()"
           "\x1b[39m (pid=1, ...)\n  File \"client_app.py\", line 316, in train\nRuntimeError: "
           "data-path 'x': bad\n\nflwr.clientapp.client_app.ClientAppException: \nException "
           "ClientAppException occurred. Message: data-path 'x': bad")
    nested = f"<class 'flwr.clientapp.client_app.ClientAppException'>:<'{ray.strip()}'>"
    for wrapped in ("<class 'fedtl.data.local.LocalDataError'>:<'data-path 'x': bad'>",
                    "\nException LocalDataError occurred. Message: data-path 'x': bad", ray,
                    nested):
        reply = Message(Error(code=2, reason=wrapped), reply_to=request)
        assert error_reason(reply) == "data-path 'x': bad"


def test_own_data_and_demo_partitions_get_distinct_partition_ids():
    assert assign_partition_ids({30: -1, 10: -1, 20: 0}) == {10: 1, 20: 0, 30: 2}
    assert assign_partition_ids({5: 1, 6: 0}) == {5: 1, 6: 0}
    with pytest.raises(RunFailed, match="same partition-id"):
        assign_partition_ids({5: 1, 6: 1})


def test_the_same_client_data_gives_the_same_run(tmp_path, sites):
    """Deterministic from the seed: two runs over the same local data agree exactly."""
    finals = []
    for name in ("a", "b"):
        cfg = _cfg(tmp_path, run_name=name)
        grid = InProcessGrid({n: {"data-path": p, "partition-id": i}
                              for i, (n, p) in enumerate(zip((7, 8, 9), sites))})
        finals.append(run_federation(grid, cfg, RunDirectory.create(cfg))["final"])
    assert finals[0] == finals[1]
    assert json.dumps(finals[0])  # JSON-safe
