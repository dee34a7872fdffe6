"""Run a bench: every cell a fedtl run directory under ``<bench>/cells/``.

Cells that need running are grouped by federation size and client resources; each group runs
in ONE Flower simulation whose ServerApp runs the group's federations one after another
(``fedtl.server_app.run_federation``, the same loop as ``fedtl run``), so Ray starts once per
group rather than once per cell. Every random draw of a run derives from its own config (seed,
round, client), so a cell's results do not depend on which cells ran before it in the same
simulation.

On ``--resume``: a cell whose ``summary.json`` says ``completed`` is reused as it is; a cell
with a checkpoint continues from it (``fedtl run --resume``'s machinery); a cell without one
starts again. A cell whose saved config differs from the spec's is an error: the bench
directory belongs to one spec.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from fedtl.bench.spec import BenchSpec, Cell
from fedtl.config import DEFAULTS, ConfigError, read_toml
from fedtl.data import DATA_KEYS
from fedtl.results import RunDirectory, atomic_write

FINISHED, RESUME, FRESH = "finished", "resume", "fresh"
# Keys of a cell's config that name where it is written, not what it computes.
PLACE_KEYS = ("out-dir", "run-name")


@dataclass
class PlannedCell:
    cell: Cell
    path: Path
    action: str          # FINISHED, RESUME or FRESH
    rounds_done: int = 0


def _completed(path: Path) -> bool:
    try:
        return json.loads((path / "summary.json").read_text()).get("status") == "completed"
    except (OSError, ValueError):
        return False


def _checkpoint_round(run_dir: RunDirectory, config: dict) -> int | None:
    """The last checkpointed round of a cell, or None if it has no usable checkpoint."""
    if not (run_dir.path / "checkpoint.pt").exists():
        return None
    try:
        return int(run_dir.load_checkpoint(config)["round"])
    except ConfigError:
        return None


def plan(spec: BenchSpec, out: Path, resume: bool) -> list[PlannedCell]:
    """What to do with each cell; raises ConfigError when ``out`` cannot hold this bench."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out '{out}' is a file, not a folder")
    used = out.is_dir() and any(out.iterdir())
    if used and not resume:
        what = "a bench" if (out / "bench.toml").exists() else "files"
        raise ConfigError(f"--out '{out}' already holds {what}: add --resume to reuse its "
                          "finished cells, or choose another --out")
    if used and not (out / "bench.toml").exists():
        raise ConfigError(f"--out '{out}' is not empty and holds no bench (no bench.toml); "
                          "choose another --out")
    planned = []
    for cell in spec.cells:
        path = out / cell.relative_dir
        config = dict(cell.config)
        if not (path / "config.toml").is_file():
            planned.append(PlannedCell(cell, path, FRESH))
            continue
        saved = read_toml(path / "config.toml")
        # a key newer than the saved config counts as its default
        changed = sorted(k for k in set(saved) | set(config) if k not in PLACE_KEYS
                         and saved.get(k, DEFAULTS.get(k)) != config.get(k))
        if changed:
            shown = ", ".join(f"{k}: {saved.get(k)!r} -> {config.get(k)!r}" for k in changed[:3])
            raise ConfigError(f"cell {cell.id} in '{out}' was run with another config ({shown});"
                              " the spec changed: choose another --out")
        run_dir = RunDirectory(path)
        if _completed(path):
            planned.append(PlannedCell(cell, path, FINISHED, cell.config.num_rounds))
        elif (done := _checkpoint_round(run_dir, config)) is not None:
            planned.append(PlannedCell(cell, path, RESUME, done))
        else:
            planned.append(PlannedCell(cell, path, FRESH))
    return planned


class GridProgress:
    """Progress over the whole grid: one bar (tty) or one line per cell, counting rounds."""

    def __init__(self, planned: list[PlannedCell], stream: TextIO | None = None):
        self.stream = stream or sys.stderr
        self.cells = len(planned)
        self.total = sum(p.cell.config.num_rounds for p in planned)
        self.done_rounds = sum(p.rounds_done for p in planned)
        self.done_cells = sum(p.action == FINISHED for p in planned)
        self.started = time.perf_counter()
        self.bar: Any = None
        self.current: PlannedCell | None = None
        self.rounds_at_start = self.done_rounds
        if self.stream.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.total, initial=self.done_rounds, unit="round",
                            desc="bench", file=self.stream, dynamic_ncols=True)

    def cell_started(self, planned: PlannedCell) -> None:
        self.current = planned
        if self.bar is not None:
            self.bar.set_description(f"cell {self.done_cells + 1}/{self.cells} {planned.cell.id}")

    # fedtl.server_app.Progress
    def start(self, total: int) -> None:
        pass

    def update(self, record: dict) -> None:
        self.done_rounds += 1
        if self.bar is not None:
            post = {}
            for key, label in (("personalized_accuracy", "pers"), ("global_accuracy", "global")):
                if record.get(key) is not None:
                    post[label] = f"{record[key]:.3f}"
            self.bar.set_postfix(post, refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        pass

    def cell_finished(self, planned: PlannedCell, summary: dict | None, error: str | None) -> None:
        self.done_cells += 1
        if self.bar is not None and error is None:
            return
        elapsed = time.perf_counter() - self.started
        ran = self.done_rounds - self.rounds_at_start
        left = self.total - self.done_rounds
        eta = f", about {elapsed / ran * left / 60:.0f} min left" if ran and left else ""
        if error is not None:
            line = f"cell {planned.cell.id} FAILED: {error}"
        else:
            final = summary["final"]
            figures = "  ".join(f"{label} {final[key]:.4f}" for key, label in
                                (("personalized_accuracy", "personalized"),
                                 ("global_accuracy", "global")) if final.get(key) is not None)
            line = f"cell {planned.cell.id} done in {summary['wall_seconds']:.0f} s  {figures}"
        message = (f"[{self.done_cells}/{self.cells} cells, {self.done_rounds}/{self.total} "
                   f"rounds{eta}] {line}")
        if self.bar is not None:
            self.bar.write(message, file=self.stream)
        else:
            print(message, file=self.stream, flush=True)

    def finish(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _run_cells(group: list[PlannedCell], progress: GridProgress,
               failures: dict[str, str]) -> Callable[[Any], None]:
    """The ServerApp body for one simulation: the group's federations in turn."""
    from fedtl.server_app import RunFailed, describe_clients, run_federation

    def main(grid) -> None:
        try:  # start the actors and load the first data, so no cell's wall time holds that
            describe_clients(grid, group[0].cell.config)
        except Exception:
            pass  # the cell itself reports what is wrong
        for planned in group:
            progress.cell_started(planned)
            resume = planned.action == RESUME
            if not resume and planned.path.exists():
                shutil.rmtree(planned.path)  # an attempt that finished no round
            run_dir = (RunDirectory(planned.path) if resume
                       else RunDirectory.create(planned.cell.config, planned.path))
            try:
                summary = run_federation(grid, planned.cell.config, run_dir, progress,
                                         resume=resume)
            except RunFailed as exc:
                failures[planned.cell.id] = str(exc)
                progress.cell_finished(planned, None, str(exc))
                continue
            except Exception as exc:  # a bug or a broken client: record it, run the others
                reason = f"{type(exc).__name__}: {exc}"
                failures[planned.cell.id] = reason
                (planned.path / "error.txt").write_text(traceback.format_exc())
                progress.cell_finished(planned, None, reason)
                continue
            progress.cell_finished(planned, summary, None)

    return main


@dataclass
class BenchOutcome:
    """What a bench invocation did."""

    out: Path
    reused: int
    ran: int
    failures: dict[str, str]
    report_dir: Path | None
    wall_seconds: float


def run_bench(spec: BenchSpec, out: str | Path, *, resume: bool = False, verbose: bool = False,
              report: bool = True, stream: TextIO | None = None,
              command: str | None = None) -> BenchOutcome:
    """Run every unfinished cell of ``spec`` under ``out`` and write the report.

    Everything is checked before the first run starts: the bench directory, each cell's
    config (already in ``spec``) and ``fedtl.simulation.preflight`` for every distinct data
    setting. Raises ConfigError on a problem; a failing cell is recorded and the others run.
    """
    from fedtl.simulation import preflight, run_on_simulation

    started = time.perf_counter()
    stream = stream or sys.stderr
    out = Path(out)
    planned = plan(spec, out, resume)
    todo = [p for p in planned if p.action != FINISHED]
    checked = set()
    for p in todo:
        key = tuple(p.cell.config[k] for k in (*DATA_KEYS, "model", "trainer", "device",
                                                "client-num-cpus", "client-num-gpus"))
        if key not in checked:
            checked.add(key)
            try:
                preflight(p.cell.config)
            except ConfigError as exc:
                raise ConfigError(f"cell {p.cell.id}: {exc}") from None
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "bench.toml", spec.path.read_bytes())
    atomic_write(out / "bench.json", (json.dumps({
        "spec": str(spec.path), "overrides": list(spec.overrides), "command": command,
        "cells": [{"id": c.id, "dir": str(c.relative_dir)} for c in spec.cells],
    }, indent=2) + "\n").encode())
    reused = len(planned) - len(todo)
    print(f"fedtl: bench '{spec.title}': {len(planned)} cells ({reused} finished and reused, "
          f"{sum(p.action == RESUME for p in todo)} to resume, "
          f"{sum(p.action == FRESH for p in todo)} to run) -> {out}", file=stream, flush=True)
    failures: dict[str, str] = {}
    progress = GridProgress(planned, stream)
    groups: dict[tuple, list[PlannedCell]] = {}
    for p in todo:
        cfg = p.cell.config
        groups.setdefault((cfg.num_clients, cfg.client_num_cpus, cfg.client_num_gpus),
                          []).append(p)
    try:
        for (num_clients, cpus, gpus), group in groups.items():
            run_on_simulation(_run_cells(group, progress, failures), num_clients, cpus, gpus,
                              verbose=verbose)
    finally:
        progress.finish()
    report_dir = None
    if report:
        from fedtl.bench.report import write_report

        report_dir = write_report(spec, out, command)
    return BenchOutcome(out, reused, len(todo), failures, report_dir,
                        time.perf_counter() - started)
