"""ADDA's server phases on the Federation loop, with fedtl's ClientApp run in this process
(no Ray): weightless replies of clients without the phase's data, and a run resumed across
the phase boundary that ends exactly as an uninterrupted one."""

from __future__ import annotations

import pytest
import torch
from test_deploy import InProcessGrid

from fedtl.config import make_config
from fedtl.results import RunDirectory
from fedtl.server_app import run_federation

DA = {"trainer": "adda", "target-dataset": "digits-m", "model": "dnn", "num-clients": 4,
      "num-rounds": 4, "adda-source-rounds": 2, "local-steps": 4, "batch-size": 16,
      "finetune-steps": 2, "eval-every": 4, "lr": 0.05}


pytestmark = pytest.mark.usefixtures("task_identity")


def _grid(n: int) -> InProcessGrid:
    return InProcessGrid({100 + i: {"partition-id": i, "num-partitions": n} for i in range(n)})


def _cfg(tmp_path, **values):
    values = {k.replace("_", "-"): v for k, v in values.items()}
    return make_config({**DA, "out-dir": str(tmp_path), **values})


def test_clients_without_the_phases_data_reply_weightless_not_failed(tmp_path):
    """split: clients 0-1 hold only source data, 2-3 only target data. In ADDA's source stage
    the target clients have nothing to learn from: they count as idle, not as failures."""
    cfg = _cfg(tmp_path, da_scenario="split")
    run_dir = RunDirectory.create(cfg)
    summary = run_federation(_grid(4), cfg, run_dir)
    assert summary["status"] == "completed" and not summary["failures"]
    rounds = run_dir.rounds()
    assert [r["phase"] for r in rounds] == ["source", "source", "adapt", "adapt"]
    assert [(r["clients_trained"], r.get("clients_idle")) for r in rounds] == [
        (2, 2), (2, 2), (4, None), (4, None)]
    assert [r["round"] for r in rounds if r["evaluated"]] == [2, 4]  # phase ends
    assert summary["final"]["target_accuracy"] == rounds[-1]["global_accuracy"]
    assert summary["best"]["global_round"] == 4  # chosen among the adapt rounds only


class StopAfter(InProcessGrid):
    """Raises KeyboardInterrupt on the ``n``-th train exchange (a run killed mid-round)."""

    def __init__(self, n: int, *args):
        super().__init__(*args)
        self.left = n

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        if messages and messages[0].metadata.message_type == "train":
            self.left -= 1
            if self.left == 0:
                raise KeyboardInterrupt
        return super().send_and_receive(messages, timeout=timeout)


@pytest.mark.parametrize("stop", [3, 4])
def test_a_run_resumed_across_the_phases_ends_as_an_uninterrupted_one(tmp_path, stop):
    """Killed in round 3 (adapt begins on resume) or 4 (the checkpoint already holds the
    frozen source encoder, which must not be replaced by the adapted one)."""
    whole_cfg = _cfg(tmp_path, run_name="whole")
    whole = RunDirectory.create(whole_cfg)
    run_federation(_grid(4), whole_cfg, whole)

    cfg = _cfg(tmp_path, run_name="killed")
    killed = RunDirectory.create(cfg)
    grid = StopAfter(stop, {100 + i: {"partition-id": i, "num-partitions": 4} for i in range(4)})
    with pytest.raises(KeyboardInterrupt):
        run_federation(grid, cfg, killed)
    assert [r["phase"] for r in killed.rounds()] == ["source", "source", "adapt"][:stop - 1]
    run_federation(_grid(4), cfg, killed, resume=True)

    assert killed.rounds() == whole.rounds()
    a, b = torch.load(whole.path / "model.pt"), torch.load(killed.path / "model.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the frozen source encoder was set once, when adapt began; the target encoder moved on
    assert any(not torch.equal(b[k], b["source_" + k]) for k in b if k.startswith("encoder."))
