"""Run a federation on Flower's Simulation Engine (Ray backend), from Python or the CLI.

``preflight`` checks everything that can be checked before Ray starts (config, dataset
files, partition feasibility, GPUs); ``simulate`` then runs fedtl's ServerApp loop against
``num-clients`` virtual SuperNodes, each a fedtl ClientApp call on a pool of Ray actors.
Flower's deprecation notices and Ray's start-up noise are hidden unless ``verbose``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from collections.abc import Iterator
from typing import Any

from fedtl.config import ConfigError, RunConfig
from fedtl.results import RunDirectory
from fedtl.server_app import Progress, round_line, run_federation


def preflight(cfg: RunConfig) -> None:
    """Raise ConfigError for anything that would make the run fail, before Ray starts."""
    import torch

    from fedtl.data import federated_data

    cpus = os.cpu_count() or 1
    if cfg.client_num_cpus > cpus:
        raise ConfigError(
            f"config key 'client-num-cpus' = {cfg.client_num_cpus}: this machine has {cpus} "
            f"CPUs, so no client could be scheduled (accepted: up to {cpus})"
        )
    cuda = torch.cuda.is_available()
    if cfg.client_num_gpus > 0 and not cuda:
        raise ConfigError(
            f"config key 'client-num-gpus' = {cfg.client_num_gpus}: no CUDA GPU is visible "
            "to PyTorch here (accepted without a GPU: 0)"
        )
    if cfg.device.startswith("cuda") and not cuda:
        raise ConfigError(f"config key 'device' = {cfg.device!r}: no CUDA GPU is visible "
                          "(accepted: auto, cpu)")
    from fedtl.registry import TRAINERS
    from fedtl.server_app import phase_schedule

    federated_data(cfg)  # loads the files and builds the partition: their errors come now
    phase_schedule(cfg, TRAINERS.get(cfg.trainer)(cfg).phases())


class TqdmProgress:
    """A progress bar over rounds with the latest accuracies."""

    def __init__(self, desc: str = "rounds"):
        self.desc = desc
        self.bar: Any = None

    def start(self, total: int) -> None:
        from tqdm.auto import tqdm

        self.total = total
        self.bar = tqdm(total=total, desc=self.desc, unit="round", file=sys.stderr,
                        dynamic_ncols=True)

    def update(self, record: dict) -> None:
        if self.bar is None:
            return
        post = {}
        if record.get("phase") not in (None, "train"):
            post["phase"] = record["phase"]
        for key, label in (("global_accuracy", "global"), ("personalized_accuracy", "pers"),
                           ("centralized_accuracy", "central")):
            if record.get(key) is not None:
                post[label] = f"{record[key]:.3f}"
        if record.get("failures"):
            post["failed"] = len(record["failures"])
        self.bar.set_postfix(post, refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class LineProgress:
    """One printed line per round, for logs and non-interactive runs."""

    def start(self, total: int) -> None:
        self.total = total

    def update(self, record: dict) -> None:
        print(round_line(record, self.total), file=sys.stderr, flush=True)

    def close(self) -> None:
        pass


def quiet_environment() -> None:
    """Environment that keeps Flower and Ray offline-safe and quiet (set before Ray starts)."""
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    os.environ.setdefault("TQDM_MININTERVAL", "0.5")


@contextlib.contextmanager
def _quiet(verbose: bool) -> Iterator[None]:
    if verbose:
        yield
        return
    loggers = [logging.getLogger(n) for n in ("flwr", "ray")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)


def simulate(cfg: RunConfig, run_dir: RunDirectory, *, progress: Progress | None = None,
             verbose: bool = False) -> dict:
    """Run ``cfg`` on Flower's Simulation Engine; returns the run summary.

    Call ``preflight(cfg)`` first for clear errors before Ray starts.
    """
    quiet_environment()
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    from fedtl.clients.client_app import app as client_app

    outcome: dict[str, Any] = {}
    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context) -> None:
        outcome["summary"] = run_federation(grid, cfg, run_dir, progress)

    backend_config = {
        "client_resources": {"num_cpus": cfg.client_num_cpus, "num_gpus": cfg.client_num_gpus},
        "init_args": {
            "logging_level": logging.INFO if verbose else logging.ERROR,
            "log_to_driver": verbose,
            "include_dashboard": False,
        },
    }
    with _quiet(verbose):
        try:
            run_simulation(server_app=server_app, client_app=client_app,
                           num_supernodes=cfg.num_clients, backend_config=backend_config,
                           verbose_logging=verbose)
        except RuntimeError as exc:
            # Flower wraps a ServerApp exception; surface the original one.
            cause = exc.__cause__
            if cause is not None and "summary" not in outcome:
                raise cause from None
            raise
    if "summary" not in outcome:
        raise RuntimeError("the simulation ended without a result; rerun with --verbose")
    return outcome["summary"]
