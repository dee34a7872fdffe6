"""The run directory: everything a run produces, written so a crash never half-writes a file.

Layout of ``<out-dir>/<run-name>/``:

- ``config.toml``: the resolved configuration (re-runnable with ``fedtl run config.toml``);
- ``partition.csv``: samples per split and label counts per client, as clients reported them;
- ``rounds.jsonl``: one JSON object per round, appended and flushed as each round ends;
- ``clients.csv``: per-client numbers of the latest evaluated round;
- ``summary.json``: final and validation-selected ("best") figures, wall time, status;
- ``model.pt``: the final global weights (a torch state dict);
- ``checkpoint.pt``: after every round, what ``fedtl run --resume`` needs to continue;
- ``timings.jsonl``: wall time of every round (kept apart so rounds.jsonl is reproducible);
- ``client-state/``: simulated clients' persistent state (pFedMe's theta_i), per round;
- ``plots/``: PNG figures (``fedtl plot DIR`` redraws them).

Whole files are written to a temporary name and renamed into place; rounds are appended one
line at a time, so a killed run keeps every finished round.
"""

from __future__ import annotations

import csv
import io
import json
import os
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import tomli_w

from fedtl.config import RunConfig


CHECKPOINT_FORMAT = 1


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file and an atomic rename."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _csv_bytes(rows: Iterable[Mapping[str, Any]]) -> bytes:
    rows = list(rows)
    buf = io.StringIO()
    if rows:
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return buf.getvalue().encode()


def default_run_name(cfg: RunConfig) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return f"{cfg.strategy}-{cfg.dataset}-{cfg.partitioner}-{stamp}"


class RoundWriter:
    """Writes each finished round to a run directory on a background thread: its checkpoint,
    then its line in rounds.jsonl (in that order, as before), then its timing. The
    serialisation and the two fsyncs (about 2 ms on this machine's disk, far more on slow or
    network disks) then overlap the next round instead of delaying it.

    ``write`` first waits for the previous round's writes (raising their error, e.g. a full
    disk), so at most the newest round is in flight: a run killed then resumes from the round
    before it, and every draw derives from (seed, round, client), so the redone round is
    identical. ``close`` waits for the last one.
    """

    def __init__(self, run_dir: RunDirectory):
        from concurrent.futures import ThreadPoolExecutor

        self.run_dir = run_dir
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="fedtl-round-writer")
        self._pending = None

    def write(self, record: Mapping[str, Any], timing: Mapping[str, Any],
              arrays: Mapping[str, Any], rounds: list[Mapping[str, Any]],
              config: Mapping[str, Any], wall_seconds: float) -> None:
        """Checkpoint after ``record``'s round (``rounds`` ends with it), then append it to
        rounds.jsonl and ``timing`` to timings.jsonl. The caller must not modify ``arrays``
        or the records afterwards."""
        self.wait()
        self._pending = self._pool.submit(self._write, record, timing, arrays, list(rounds),
                                          dict(config), wall_seconds)

    def _write(self, record, timing, arrays, rounds, config, wall_seconds) -> None:
        # checkpoint first: it holds every round's record, so rounds.jsonl can be rebuilt
        self.run_dir.save_checkpoint(record["round"], arrays, rounds, config, wall_seconds)
        self.run_dir.append_round(record)
        self.run_dir.append_timing(timing)

    def wait(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._pool.shutdown()


class RunDirectory:
    """Writes (and reads back) the files of one run."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    @classmethod
    def create(cls, cfg: RunConfig, path: str | Path | None = None) -> RunDirectory:
        """A new, empty run directory: ``path``, or ``out-dir``/``run-name`` made unique."""
        if path is None:
            base = Path(cfg.out_dir).expanduser() / (cfg.run_name or default_run_name(cfg))
            path, n = base, 1
            while path.exists():
                n += 1
                path = base.with_name(f"{base.name}-{n}")
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        if any(path.iterdir()):
            raise FileExistsError(f"run directory {path} is not empty")
        run_dir = cls(path)
        run_dir.write_config(cfg)
        return run_dir

    # --- writing --------------------------------------------------------------------------

    def write_config(self, cfg: RunConfig) -> None:
        atomic_write(self.path / "config.toml", tomli_w.dumps(dict(cfg)).encode())

    def write_partition(self, stats: list[dict]) -> None:
        rows = []
        for s in stats:
            row = {k: v for k, v in s.items() if not isinstance(v, list)}
            for key, counts in s.items():  # "label-counts" -> label-0, label-1, ...
                if isinstance(counts, list):
                    row.update({f"{key.removesuffix('-counts')}-{i}": c
                                for i, c in enumerate(counts)})
            rows.append(row)
        atomic_write(self.path / "partition.csv", _csv_bytes(rows))

    def append_round(self, record: Mapping[str, Any]) -> None:
        with open(self.path / "rounds.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def append_timing(self, record: Mapping[str, Any]) -> None:
        """Per-round wall times (kept out of rounds.jsonl, which is identical across reruns)."""
        with open(self.path / "timings.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")

    def rewrite_rounds(self, rounds: list[Mapping[str, Any]]) -> None:
        """Replace rounds.jsonl with ``rounds`` (resuming from a checkpoint)."""
        text = "".join(json.dumps(r) + "\n" for r in rounds)
        atomic_write(self.path / "rounds.jsonl", text.encode())

    def save_checkpoint(self, server_round: int, arrays: Mapping[str, Any],
                        rounds: list[Mapping[str, Any]], config: Mapping[str, Any],
                        wall_seconds: float) -> None:
        """Everything needed to resume after ``server_round``: the global weights, every round's
        record and the config. Client state is versioned by round on the clients' side and
        every random draw derives from (seed, round, client), so no RNG state is needed."""
        import torch

        buf = io.BytesIO()
        torch.save({"format": CHECKPOINT_FORMAT, "round": server_round, "arrays": dict(arrays),
                    "rounds": list(rounds), "config": dict(config),
                    "wall_seconds": wall_seconds}, buf)
        atomic_write(self.path / "checkpoint.pt", buf.getvalue())

    def load_checkpoint(self, config: Mapping[str, Any]) -> dict:
        """The last checkpoint, checked against ``config``; ConfigError when unusable."""
        import torch

        from fedtl.config import DEFAULTS, ConfigError

        path = self.path / "checkpoint.pt"
        if not path.exists():
            raise ConfigError(f"cannot resume {self.path}: it has no checkpoint.pt "
                              "(no round finished yet, or not a fedtl run directory)")
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
            if ckpt.get("format") != CHECKPOINT_FORMAT:
                raise ValueError(f"format {ckpt.get('format')!r}")
            rounds = ckpt["rounds"]
            if not rounds or rounds[-1]["round"] != ckpt["round"]:
                raise ValueError("its round records do not end at its round")
        except Exception as exc:
            detail = (str(exc).strip().splitlines() or [""])[0]
            raise ConfigError(f"cannot resume {self.path}: checkpoint.pt is corrupt or not "
                              f"fedtl's ({type(exc).__name__}: {detail})") from None
        saved = ckpt["config"]
        # a key the checkpoint lacks at its default is one a newer fedtl added: not a change
        changed = sorted(k for k in set(config) | set(saved)
                         if config.get(k) != saved.get(k)
                         and not (k not in saved and config.get(k) == DEFAULTS.get(k)))
        if changed:
            raise ConfigError(f"cannot resume {self.path}: config.toml differs from the "
                              f"checkpoint's config in {', '.join(changed)}")
        return ckpt

    def write_clients(self, rows: list[Mapping[str, Any]]) -> None:
        atomic_write(self.path / "clients.csv", _csv_bytes(rows))

    def write_summary(self, summary: Mapping[str, Any]) -> None:
        atomic_write(self.path / "summary.json", (json.dumps(summary, indent=2) + "\n").encode())

    def save_model(self, state_dict: Mapping[str, Any]) -> None:
        import torch

        buf = io.BytesIO()
        torch.save(dict(state_dict), buf)
        atomic_write(self.path / "model.pt", buf.getvalue())

    # --- reading --------------------------------------------------------------------------

    def rounds(self) -> list[dict]:
        path = self.path / "rounds.jsonl"
        if not path.exists():
            return []
        out = []
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    break  # a line cut short by a kill; every line before it is whole
        return out

    def summary(self) -> dict:
        return json.loads((self.path / "summary.json").read_text(encoding="utf-8"))

    def config(self) -> dict:
        import tomllib

        return tomllib.loads((self.path / "config.toml").read_text(encoding="utf-8"))

    def table(self, name: str) -> list[dict[str, str]]:
        path = self.path / name
        if not path.exists():
            return []
        with open(path, newline="", encoding="utf-8") as fh:
            return list(csv.DictReader(fh))
