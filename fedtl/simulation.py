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
import threading
import time
import warnings
from collections.abc import Callable, Iterator
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
    TRAINERS.get(cfg.trainer).preflight(cfg)  # e.g. a teacher that must load and fit
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
                           ("centralized_accuracy", "central"), ("probe_accuracy", "probe"),
                           ("knn_accuracy", "knn")):
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


def _pending_message_pump(state, queue, nodes_mapping, f_stop) -> None:
    """Flower 1.42's ``vce_api.add_messages_to_queue`` without its cost per node.

    Flower's loop asks the link state for each registered node's next message
    (``get_message_ins``) every 0.1 s; each ask scans all stored messages, so a pass costs
    nodes x messages, and a message waits up to 0.1 s to be picked up. This version does
    what those asks do in ONE scan: under the state's lock, expire what
    ``_check_stored_messages`` expires, take each node's first undelivered message (one per
    node per pass, as ``limit=1`` does), mark it delivered, and queue it. Delivery semantics
    are unchanged; a pass costs the number of stored messages, and the loop sleeps at least
    twice as long as its pass took (2 ms minimum) so it never starves the rest of the process.
    A message the server stores wakes it at once (Flower's loop, and this one before, found a
    round's messages up to 0.1 s, resp. 10 ms, late when the store had been empty).
    """
    from flwr.supercore.date import now  # the link state's own clock

    nodes = set(nodes_mapping)
    store = state.message_ins_store
    lock = getattr(state, "lock", contextlib.nullcontext())
    check = getattr(state, "_check_stored_messages", None)
    wake = threading.Event()
    store_message_ins = state.store_message_ins

    def store_and_wake(*args, **kwargs):
        stored = store_message_ins(*args, **kwargs)
        wake.set()
        return stored

    state.store_message_ins = store_and_wake  # this state object only, for this run
    try:
        while not f_stop.is_set():
            wake.clear()
            started = time.perf_counter()
            taken: dict[int, object] = {}
            with lock:
                for msg_id in list(store.keys()):
                    if check is not None:
                        check({msg_id})
                    msg = store.get(msg_id)
                    if msg is None:
                        continue
                    meta = msg.metadata
                    if meta.delivered_at == "" and meta.dst_node_id in nodes \
                            and meta.dst_node_id not in taken:
                        taken[meta.dst_node_id] = msg
                delivered_at = now().isoformat()
                for msg in taken.values():
                    msg.metadata.delivered_at = delivered_at
            for msg in taken.values():
                queue.put(msg)
            elapsed = time.perf_counter() - started
            wake.wait(max(0.002 if taken or store else 0.01, 2 * elapsed))
    finally:
        del state.store_message_ins  # the class's method again


@contextlib.contextmanager
def fast_message_pump() -> Iterator[None]:
    """Use ``_pending_message_pump`` in Flower's Simulation Engine for the duration (Flower
    1.42.x only, whose in-memory link state it reads; other versions keep their own loop)."""
    import flwr
    from flwr.server.superlink.fleet.vce import vce_api
    from flwr.server.superlink.linkstate import in_memory_linkstate

    original = vce_api.add_messages_to_queue
    usable = (flwr.__version__.startswith("1.42.")
              and hasattr(in_memory_linkstate.InMemoryLinkState, "get_message_ins"))
    if usable:
        vce_api.add_messages_to_queue = _pending_message_pump
    try:
        yield
    finally:
        vce_api.add_messages_to_queue = original


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
             verbose: bool = False, resume: bool = False) -> dict:
    """Run ``cfg`` on Flower's Simulation Engine; returns the run summary.

    With ``resume``, continue ``run_dir`` from its last checkpoint. Call ``preflight(cfg)``
    first for clear errors before Ray starts.
    """
    from fedtl.registry import TRAINERS

    outcome: dict[str, Any] = {}

    def main(grid) -> None:
        outcome["summary"] = run_federation(grid, cfg, run_dir, progress, resume=resume)

    run_on_simulation(main, cfg.num_clients, cfg.client_num_cpus, cfg.client_num_gpus,
                      verbose=verbose,
                      client_output=TRAINERS.get(cfg.trainer).shows_client_progress)
    if "summary" not in outcome:
        raise RuntimeError("the simulation ended without a result; rerun with --verbose")
    return outcome["summary"]


def run_on_simulation(main: Callable[[Any], None], num_supernodes: int, num_cpus: float,
                      num_gpus: float, *, verbose: bool = False,
                      client_output: bool = False) -> None:
    """Start ``num_supernodes`` virtual SuperNodes running fedtl's ClientApp on Ray and call
    ``main(grid)`` as the ServerApp; several federations may run one after another in one
    ``main`` (``fedtl bench`` does), sharing Ray's start-up. An exception ``main`` raises is
    re-raised here as itself. ``client_output`` forwards the clients' stdout/stderr (e.g. the
    progress of a data-free client's synthesis) even when not ``verbose``."""
    quiet_environment()
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    from fedtl.clients.client_app import app as client_app

    finished: dict[str, bool] = {}
    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context) -> None:
        main(grid)
        finished["ok"] = True

    backend_config = {
        "client_resources": {"num_cpus": num_cpus, "num_gpus": num_gpus},
        "init_args": {
            "logging_level": logging.INFO if verbose else logging.ERROR,
            "log_to_driver": verbose or client_output,
            "include_dashboard": False,
        },
    }
    with _quiet(verbose), fast_message_pump():
        try:
            run_simulation(server_app=server_app, client_app=client_app,
                           num_supernodes=num_supernodes, backend_config=backend_config,
                           verbose_logging=verbose)
        except RuntimeError as exc:
            # Flower wraps a ServerApp exception; surface the original one.
            cause = exc.__cause__
            if cause is not None and "ok" not in finished:
                raise cause from None
            raise
