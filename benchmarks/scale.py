"""Scale: thousands of simulated clients on one machine.

For each number of clients (default 1,000 and 10,000; MNIST, label skew Dir(0.3), 100 clients
sampled per round) runs fedtl's simulation and prints: the time to load and partition the
data (the partition is cached on disk, so a rerun only loads it), start-up (from the call
until the first round starts: Ray, the actors, and the describe handshake with every
client), the median per-round time, and the peak memory of all processes (RSS, and PSS,
which counts shared library pages once). The last line is one JSON object.

    python benchmarks/scale.py --data-dir ../shared/data
    python benchmarks/scale.py --clients 1000 --clients 10000 --rounds 5 --model cnn

Label skew: flwr-datasets' DirichletPartitioner cannot give 10,000 MNIST clients (6 samples
each on average) at least one sample under Dir(0.3) (it gives up after 10 draws), so the
default is ``inner-dirichlet`` (equal client sizes, each client's labels ~ Dir(0.3)) at every
scale; pass ``--partitioner dirichlet`` for the per-class variant where it can succeed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from overhead import PeakMemory  # noqa: E402

from fedtl.config import make_config  # noqa: E402
from fedtl.data import federated_data  # noqa: E402
from fedtl.results import RunDirectory  # noqa: E402
from fedtl.simulation import preflight, simulate  # noqa: E402


def run(num_clients: int, args) -> dict:
    cfg = make_config({
        "dataset": "mnist", "data-dir": args.data_dir, "model": args.model,
        "partitioner": args.partitioner, "alpha": 0.3, "min-partition-size": 1,
        "num-clients": num_clients, "fraction-train": args.per_round / num_clients,
        "num-rounds": args.rounds, "eval-every": args.rounds,
        "eval-fraction": min(1.0, args.per_round / num_clients), "local-steps": 10,
        "batch-size": 16, "lr": 0.05, "val-fraction": 0.0, "test-fraction": 0.2,
        "finetune-steps": 5,
    })
    t0 = time.perf_counter()
    federated_data(cfg)  # partition (or load the cached partition)
    partition_seconds = time.perf_counter() - t0
    out = Path(tempfile.mkdtemp(prefix="fedtl-scale-")) / "run"
    with PeakMemory(pss=True) as mem:
        t_call = time.time()
        preflight(cfg)
        summary = simulate(cfg, RunDirectory.create(cfg, out))
    timings = [json.loads(line) for line in (out / "timings.jsonl").read_text().splitlines()]
    startup = timings[0]["time"] - timings[0]["round_seconds"] - t_call
    train_rounds = [t["round_seconds"] for t in timings[:-1]] or [timings[0]["round_seconds"]]
    row = {
        "num_clients": num_clients, "clients_per_round": args.per_round, "model": args.model,
        "partitioner": args.partitioner, "partition_seconds": partition_seconds,
        "startup_seconds": startup, "round_seconds_median": float(np.median(train_rounds)),
        "peak_rss_mb": mem.peak / 2**20, "peak_pss_mb": mem.peak_pss / 2**20,
        "global_accuracy": summary["final"]["global_accuracy"],
        "centralized_accuracy": summary["final"]["centralized_accuracy"],
    }
    print(f"{num_clients:>6} clients: data + partition {partition_seconds:.1f} s, start-up "
          f"{startup:.1f} s, {row['round_seconds_median']:.2f} s/round "
          f"({args.per_round} clients/round), peak memory RSS {row['peak_rss_mb']:.0f} MB / "
          f"PSS {row['peak_pss_mb']:.0f} MB, central accuracy "
          f"{summary['final']['centralized_accuracy']}", flush=True)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, action="append")
    p.add_argument("--per-round", type=int, default=100)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--model", default="mlr")
    p.add_argument("--partitioner", default="inner-dirichlet")
    p.add_argument("--data-dir", default="../shared/data")
    args = p.parse_args()
    rows = [run(n, args) for n in args.clients or [1000, 10000]]
    if len(rows) > 1:
        a, b = rows[0], rows[-1]
        growth = {k: b[k] / a[k] for k in ("startup_seconds", "round_seconds_median",
                                           "peak_rss_mb", "peak_pss_mb")}
        print(f"from {a['num_clients']} to {b['num_clients']} clients: "
              + ", ".join(f"{k} x{v:.2f}" for k, v in growth.items()))
    else:
        growth = {}
    print(json.dumps({"machine": {"cpus": os.cpu_count(),
                                  "memory_gb": psutil.virtual_memory().total / 2**30},
                      "runs": rows, "growth": growth}))


if __name__ == "__main__":
    main()
