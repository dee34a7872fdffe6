"""Simulation overhead: the same federated training through fedtl's simulation (Flower's
Simulation Engine on Ray) and as a plain sequential PyTorch loop in one process.

Both paths use the same data, partitions, model, optimiser, local steps, client sampling,
per-client random streams and aggregation order, so their final accuracies must agree (up to
the order of floating-point sums); only the transport differs. Prints per-round wall time of
both, their ratio, start-up time, peak resident memory of all processes, and the final
accuracies; the last line is one JSON object with every case.

    python benchmarks/overhead.py                                  # every case (MNIST: data-dir)
    python benchmarks/overhead.py --case digits-mlr --clients 10 --strategy fedavg
    python benchmarks/overhead.py --device cuda --client-num-gpus 0.25   # on a GPU machine
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import torch

from fedtl.clients import client_app as ca
from fedtl.config import make_config
from fedtl.data import federated_data
from fedtl.evaluation import pooled
from fedtl.registry import TRAINERS
from fedtl.results import RunDirectory
from fedtl.simulation import preflight, simulate
from fedtl.strategies.fedavg import sample_partitions

PLAIN_THREADS = 0  # torch threads of the plain loop; 0 = all cores (--plain-threads)

CASES = {
    # name: (dataset, model, local-steps, batch-size, lr, rounds)
    # digits + MLR rounds take ~50 ms: 100 of them, because for the first ~20 (1 s) Ray's own
    # processes (dashboard agent, log monitor) are still starting and take CPU from the run
    "digits-mlr": ("digits", "mlr", 10, 16, 0.05, 100),
    "mnist-cnn": ("mnist", "cnn", 10, 32, 0.05, 5),
}


class PeakMemory:
    """Peak summed memory (bytes) of this process and all its descendants: RSS every
    ``interval`` seconds, and with ``pss`` the proportional set size (shared library pages
    counted once) every ``pss_interval`` seconds.

    PSS is read from /proc/PID/smaps_rollup, which makes the kernel walk each process's page
    tables: sampled every 0.25 s across Ray's processes it took about a fifth of a core, CPU
    the measured run then lacks on a 2-core machine (py-spy, digits + MLR), so it is sampled
    less often than the cheap RSS.
    """

    def __init__(self, interval: float = 0.25, pss: bool = True, pss_interval: float = 2.0):
        self.interval, self.pss, self.pss_interval = interval, pss, pss_interval
        self.peak = self.peak_pss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        me = psutil.Process()
        last_pss = -float("inf")
        while not self._stop.is_set():
            with_pss = self.pss and time.monotonic() - last_pss >= self.pss_interval
            if with_pss:
                last_pss = time.monotonic()
            rss = pss = 0
            for p in [me, *me.children(recursive=True)]:
                try:
                    if with_pss:
                        info = p.memory_full_info()
                        rss, pss = rss + info.rss, pss + info.pss
                    else:
                        rss += p.memory_info().rss
                except psutil.Error:
                    pass
            self.peak, self.peak_pss = max(self.peak, rss), max(self.peak_pss, pss)
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def config_for(case: str, strategy: str, clients: int, args) -> dict:
    dataset, model, steps, batch, lr, rounds = CASES[case]
    return {
        "dataset": dataset, "model": model, "strategy": strategy, "data-dir": args.data_dir,
        "partitioner": "iid", "num-clients": clients, "fraction-train": 1.0,
        "num-rounds": args.rounds or rounds, "local-steps": steps, "batch-size": batch,
        "lr": lr, "eval-every": args.rounds or rounds, "finetune-steps": 5,
        "val-fraction": 0.1, "test-fraction": 0.2, "min-partition-size": 5,
        "client-num-cpus": args.client_num_cpus, "client-num-gpus": args.client_num_gpus,
        "device": args.device, "personal-lr": 0.02,
    }


def plain_loop(cfg) -> dict:
    """fedtl's client work, sequentially in this process: no Flower, no Ray."""
    started = time.perf_counter()
    torch.set_num_threads(PLAIN_THREADS or os.cpu_count() or 1)
    device = ca._device(cfg)
    fed = federated_data(cfg)
    trainer = TRAINERS.get(cfg.trainer)(cfg)
    model, scratch, _ = ca._models_for(cfg, trainer, device)
    global_state = {k: v.detach().cpu().clone()
                    for k, v in trainer.build_model(fed.spec, seed=cfg.seed).state_dict().items()}
    states: dict[int, dict] = {pid: {} for pid in range(cfg.num_clients)}
    clients = {pid: fed.client(pid) for pid in range(cfg.num_clients)}
    startup = time.perf_counter() - started
    round_seconds = []
    for rnd in range(1, cfg.num_rounds + 1):
        t0 = time.perf_counter()
        replies = []
        for pid in sample_partitions(cfg.seed, rnd, list(range(cfg.num_clients)),
                                     cfg.fraction_train):
            model.load_state_dict(global_state)
            ca._seed_everything(cfg, rnd, pid, 0)
            rule = ca._update_rule(cfg, trainer, device)
            rule.train(model, clients[pid], ca._generator(cfg, rnd, pid, 0), states[pid])
            replies.append(({k: v.detach().cpu().numpy().copy()
                             for k, v in model.state_dict().items()},
                            len(clients[pid].train)))
        # the same float operations, in the same order, as Flower's aggregate_arrayrecords
        total = sum(n for _, n in replies)
        agg: dict[str, np.ndarray] = {}
        for weights, n in replies:
            for k, v in weights.items():
                agg[k] = v * (n / total) if k not in agg else agg[k] + v * (n / total)
        if cfg.strategy == "pfedme" and cfg.beta != 1.0:
            agg = {k: ((1 - cfg.beta) * global_state[k].numpy() + cfg.beta * v) for k, v in agg.items()}
        global_state = {k: torch.from_numpy(np.asarray(v).astype(global_state[k].numpy().dtype))
                        for k, v in agg.items()}
        round_seconds.append(time.perf_counter() - t0)
    # final evaluation, as the ClientApp's evaluate does it
    correct = {"global": [], "personalized": []}
    totals = []
    for pid in range(cfg.num_clients):
        model.load_state_dict(global_state)
        ca._seed_everything(cfg, cfg.num_rounds, pid, 1)
        rule = ca._update_rule(cfg, trainer, device)
        personal = rule.personalized(model, scratch, clients[pid],
                                     ca._generator(cfg, cfg.num_rounds, pid, 1), states[pid])
        for kind, m in (("global", model), ("personalized", personal)):
            correct[kind].append(trainer.evaluate(m, clients[pid], device)["test"].correct)
        totals.append(len(clients[pid].test))
    return {"startup_seconds": startup, "round_seconds": round_seconds,
            "global_accuracy": pooled(correct["global"], totals),
            "personalized_accuracy": pooled(correct["personalized"], totals)}


def fedtl_simulation(cfg, out: Path) -> dict:
    t_call = time.time()
    preflight(cfg)
    run_dir = RunDirectory.create(cfg, out)
    summary = simulate(cfg, run_dir)
    timings = [json.loads(line) for line in (out / "timings.jsonl").read_text().splitlines()]
    first_start = timings[0]["time"] - timings[0]["round_seconds"]
    return {"startup_seconds": first_start - t_call,
            "round_seconds": [t["round_seconds"] for t in timings],
            "global_accuracy": summary["final"]["global_accuracy"],
            "personalized_accuracy": summary["final"]["personalized_accuracy"]}


def run_case(case: str, strategy: str, clients: int, args) -> dict:
    cfg = make_config(config_for(case, strategy, clients, args))
    # training rounds only: the last round also evaluates, so leave it out of the timing
    with PeakMemory() as mem_plain:
        plain = plain_loop(cfg)
    out = Path(tempfile.mkdtemp(prefix="fedtl-overhead-")) / "run"
    with PeakMemory() as mem_sim:
        sim = fedtl_simulation(cfg, out)
    p_round = float(np.median(plain["round_seconds"][:-1] or plain["round_seconds"]))
    s_round = float(np.median(sim["round_seconds"][:-1] or sim["round_seconds"]))
    row = {
        "case": case, "strategy": strategy, "clients_per_round": clients,
        "rounds": cfg.num_rounds, "device": str(ca._device(cfg)),
        "plain_round_seconds": p_round, "fedtl_round_seconds": s_round,
        "ratio": s_round / p_round,
        "plain_startup_seconds": plain["startup_seconds"],
        "fedtl_startup_seconds": sim["startup_seconds"],
        "plain_peak_rss_mb": mem_plain.peak / 2**20, "fedtl_peak_rss_mb": mem_sim.peak / 2**20,
        "plain_peak_pss_mb": mem_plain.peak_pss / 2**20,
        "fedtl_peak_pss_mb": mem_sim.peak_pss / 2**20,
        "plain_global_accuracy": plain["global_accuracy"],
        "fedtl_global_accuracy": sim["global_accuracy"],
        "plain_personalized_accuracy": plain["personalized_accuracy"],
        "fedtl_personalized_accuracy": sim["personalized_accuracy"],
    }
    print(f"{case:<11} {strategy:<7} {clients:>4} clients/round: plain {p_round:.3f} s/round, "
          f"fedtl {s_round:.3f} s/round (x{row['ratio']:.2f}); start-up plain "
          f"{plain['startup_seconds']:.1f} s, fedtl {sim['startup_seconds']:.1f} s; peak PSS "
          f"plain {row['plain_peak_pss_mb']:.0f} MB, fedtl {row['fedtl_peak_pss_mb']:.0f} MB; "
          f"global acc plain {plain['global_accuracy']:.4f} fedtl {sim['global_accuracy']:.4f}; "
          f"personalized plain {plain['personalized_accuracy']:.4f} "
          f"fedtl {sim['personalized_accuracy']:.4f}", flush=True)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--case", choices=sorted(CASES), action="append")
    p.add_argument("--strategy", choices=["fedavg", "pfedme"], action="append")
    p.add_argument("--clients", type=int, action="append", help="clients per round (10, 100)")
    p.add_argument("--rounds", type=int, default=None, help="override the case's rounds")
    p.add_argument("--data-dir", default="../shared/data")
    p.add_argument("--device", default="cpu")
    p.add_argument("--client-num-cpus", type=float, default=1.0)
    p.add_argument("--client-num-gpus", type=float, default=0.0)
    p.add_argument("--plain-threads", type=int, default=0,
                   help="torch threads of the plain loop (default: all cores)")
    args = p.parse_args()
    global PLAIN_THREADS
    PLAIN_THREADS = args.plain_threads
    rows = [run_case(case, strategy, clients, args)
            for case in args.case or sorted(CASES)
            for clients in args.clients or [10, 100]
            for strategy in args.strategy or ["fedavg", "pfedme"]]
    print(json.dumps({"machine": {"cpus": os.cpu_count(), "torch": torch.__version__,
                                  "cuda": torch.cuda.is_available()}, "cases": rows}))


if __name__ == "__main__":
    sys.exit(main())
