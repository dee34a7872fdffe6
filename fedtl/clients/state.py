"""A client's persistent state (e.g. pFedMe's theta_i), kept on the client's own disk.

State is versioned by the round that wrote it: ``<state-dir>/client-<partition>/round-<r>.pt``.
A client working on round r reads the newest version written before r (training) or up to r
(evaluation). A run resumed from its round-r checkpoint therefore sees exactly the state it
had after round r, even if a killed attempt had already written versions for rounds r+1 and
r+2 (the server writes round r+1's checkpoint while round r+2 runs). Files are written
atomically; the three newest versions are kept, enough for that.

Why not Flower's ``Context.state``: in simulation it lives in the engine's memory (a model per
client for thousands of clients) and cannot be checkpointed with the run.
"""

from __future__ import annotations

import io
import os
import re
from pathlib import Path

import torch

from fedtl.clients.update_rule import ClientState
from fedtl.results import atomic_write

# A kill during round r+2 can leave round r as the last checkpoint (round r+1's is written in
# the background during r+2); a client that trained in r+1 and r+2 still needs its round-r
# version then.
KEEP_VERSIONS = 3
_VERSION = re.compile(r"^round-(\d+)\.pt$")


class ClientStateStore:
    """Versioned state files of one client."""

    def __init__(self, root: str | Path, partition_id: int):
        self.dir = Path(root) / f"client-{partition_id}"

    def _versions(self) -> list[int]:
        if not self.dir.is_dir():
            return []
        found = (_VERSION.match(p.name) for p in self.dir.iterdir())
        return sorted(int(m.group(1)) for m in found if m)

    def load(self, before_round: int) -> ClientState:
        """The newest state written in a round < ``before_round`` (empty if none)."""
        usable = [r for r in self._versions() if r < before_round]
        if not usable:
            return {}
        path = self.dir / f"round-{usable[-1]}.pt"
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # a truncated or foreign file: say which one
            raise RuntimeError(f"client state file {path} cannot be read: {exc}") from None

    def save(self, server_round: int, state: ClientState) -> None:
        """Write the state produced in ``server_round``; prune older versions."""
        if not state:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        torch.save({k: {n: t.detach().cpu() for n, t in v.items()} for k, v in state.items()},
                   buf)
        atomic_write(self.dir / f"round-{server_round}.pt", buf.getvalue())
        for old in self._versions()[:-KEEP_VERSIONS]:
            try:
                os.unlink(self.dir / f"round-{old}.pt")
            except FileNotFoundError:
                pass
