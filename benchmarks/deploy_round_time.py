"""Time per round: the same run config simulated (Ray) and deployed (SuperLink + SuperNodes).

The deployment is the README's secure one on this machine (TLS, SuperNode authentication,
one process per SuperNode, each in its own network namespace when run as root with iproute2),
with demo partitions (``--node-config "partition-id=i num-partitions=N"``) so both runs train
the very same clients. Prints the per-round seconds of both (from each run's timings.jsonl),
their start-up, the load average, and as the last line one JSON object.

    python benchmarks/deploy_round_time.py [--clients 3] [--rounds 5] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fedtl.config import parse_override
from fedtl.deploy.localnet import LocalDeployment, toml_pairs
from fedtl.results import RunDirectory

ROOT = Path(__file__).resolve().parents[1]


def _seconds(run: RunDirectory) -> dict:
    rounds = run.rounds()
    summary = run.summary()
    # round times live in timings.jsonl, apart from the reproducible rounds.jsonl
    timings = (run.path / "timings.jsonl").read_text(encoding="utf-8").splitlines()
    times = [json.loads(line)["round_seconds"] for line in timings if line.strip()]
    return {"status": summary["status"], "rounds": len(rounds),
            "round_seconds_median": statistics.median(times),
            "round_seconds_mean": statistics.fmean(times),
            "round_seconds": [round(t, 2) for t in times],
            "startup_seconds": summary.get("startup_seconds"),
            "wall_seconds": summary["wall_seconds"],
            "final_global_accuracy": summary["final"]["global_accuracy"],
            "final_personalized_accuracy": summary["final"]["personalized_accuracy"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=3)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--workdir", help="keep logs and run directories here (default: temporary)")
    args = p.parse_args()

    config = {"num-clients": args.clients, "num-rounds": args.rounds}
    config.update(dict(parse_override(s) for s in args.set))
    work = Path(args.workdir or tempfile.mkdtemp(prefix="fedtl-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()

    sim_dir = work / "simulated"
    sim_cmd = [sys.executable, "-m", "fedtl", "run", "--out", str(sim_dir), "--no-plots",
               *(a for k, v in config.items() for a in ("--set", f"{k}={v}"))]
    print("simulated:", " ".join(sim_cmd), file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    subprocess.run(sim_cmd, check=True, stdout=subprocess.DEVNULL)
    sim_wall = time.perf_counter() - t0
    simulated = _seconds(RunDirectory(sim_dir))

    names = [f"supernode-{i + 1}" for i in range(args.clients)]
    t0 = time.perf_counter()
    with LocalDeployment(work / "deployment", node_keys=names) as dep:
        dep.register(*names)
        nodes = [dep.start_supernode(n, {"partition-id": i, "num-partitions": args.clients})
                 for i, n in enumerate(names)]
        dep.wait_connected(nodes)
        ready = time.perf_counter() - t0
        run_config = {**config, "out-dir": str(work / "deployed-runs"), "run-name": "deployed"}
        print(f"deployed ({'network namespaces' if dep.isolate else '127.0.0.1'}, TLS, node "
              f"auth): flwr run {ROOT} fedtl --stream --run-config '{toml_pairs(run_config)}'",
              file=sys.stderr, flush=True)
        run = dep.start_run(ROOT, run_config)
        run.popen.wait(timeout=3600)
        if run.popen.returncode != 0:
            sys.exit(f"flwr run failed:\n{run.output()[-3000:]}")
        isolated = dep.isolate
    dep_wall = time.perf_counter() - t0
    deployed = _seconds(RunDirectory(work / "deployed-runs" / "deployed"))

    result = {
        "config": config, "machine_cpus": os.cpu_count(),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "simulated": {**simulated, "command_wall_seconds": sim_wall},
        "deployed": {**deployed, "network_namespaces": isolated,
                     "deployment_ready_seconds": ready, "total_wall_seconds": dep_wall},
        "workdir": str(work),
    }
    for name in ("simulated", "deployed"):
        r = result[name]
        print(f"{name:>9}: {r['rounds']} rounds, median {r['round_seconds_median']:.2f} s per "
              f"round (each: {r['round_seconds']}), start-up {r['startup_seconds']:.1f} s, "
              f"final global {r['final_global_accuracy']:.4f}, personalized "
              f"{r['final_personalized_accuracy']:.4f}", file=sys.stderr)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
