"""Reliability benchmark: faulty clients and a SIGKILL at a random moment.

1. The same run twice, without faults and with ``fault-rate`` of the sampled clients failing
   in mixed ways every round (crash, NaN, Inf, wrong shape); prints both final accuracies.
2. The same run once more, killed with SIGKILL at a random moment inside the run (after a
   random number of finished rounds, 1 to num-rounds - 1, plus a random part of a round), then
   resumed with ``fedtl run --resume``; prints whether its rounds.jsonl and final summary equal
   the uninterrupted run's.

    python benchmarks/reliability.py --data-dir ../shared/data            # MNIST, 100 clients
    python benchmarks/reliability.py --dataset digits --num-clients 20    # offline, quick
    python benchmarks/reliability.py --out DIR --reuse    # keep DIR's finished runs, redo the rest

The last line printed is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def fedtl(args: list[str], **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "fedtl", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def finish(proc: subprocess.Popen) -> None:
    out, err = proc.communicate()
    if proc.returncode != 0:
        sys.exit(f"fedtl failed ({proc.returncode}):\n{err[-3000:]}")


def summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="mnist")
    p.add_argument("--data-dir", default="../shared/data")
    p.add_argument("--model", default="mlr")
    p.add_argument("--num-clients", type=int, default=100)
    p.add_argument("--num-rounds", type=int, default=20)
    p.add_argument("--fault-rate", type=float, default=0.2)
    p.add_argument("--fault-kinds", default="raise,nan,inf,shape")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="keep the run directories here")
    p.add_argument("--reuse", action="store_true",
                   help="reuse the clean and faulty runs already finished in --out")
    args = p.parse_args()

    out = Path(args.out or tempfile.mkdtemp(prefix="fedtl-reliability-"))
    out.mkdir(parents=True, exist_ok=True)
    common = ["--no-plots", "--set", f"dataset={args.dataset}", "--set",
              f"data-dir={args.data_dir}", "--set", f"model={args.model}", "--set",
              f"num-clients={args.num_clients}", "--set", f"num-rounds={args.num_rounds}",
              "--set", "partitioner=dirichlet", "--set", "alpha=0.5", "--set", "min-partition-size=20",
              "--set", f"seed={args.seed}", "--set", "eval-every=5"]
    figures: dict = {"dataset": args.dataset, "num_clients": args.num_clients,
                     "num_rounds": args.num_rounds, "fault_rate": args.fault_rate,
                     "fault_kinds": args.fault_kinds}

    def timed_run(name: str, extra: list[str]) -> float:
        """The run's own wall time (summary.json: the federation, without Ray's start-up),
        the same figure whether the run is fresh or reused."""
        if not (args.reuse and (out / name / "summary.json").exists()):
            finish(fedtl(["run", "--out", str(out / name), *common, *extra]))
        return round(summary(out / name)["wall_seconds"], 1)

    figures["clean_seconds"] = timed_run("clean", [])
    figures["faulty_seconds"] = timed_run("faulty", [
        "--set", f"fault-rate={args.fault_rate}", "--set", f"fault-kinds={args.fault_kinds}"])
    clean, faulty = summary(out / "clean"), summary(out / "faulty")
    figures["clean_global_accuracy"] = clean["final"]["global_accuracy"]
    figures["faulty_global_accuracy"] = faulty["final"]["global_accuracy"]
    figures["clean_centralized_accuracy"] = clean["final"]["centralized_accuracy"]
    figures["faulty_centralized_accuracy"] = faulty["final"]["centralized_accuracy"]
    figures["failures_recorded"] = len(faulty["failures"])
    figures["failures_per_round"] = round(len(faulty["failures"]) / args.num_rounds, 1)
    print(f"without faults: global {clean['final']['global_accuracy']:.4f}  "
          f"central {clean['final']['centralized_accuracy']}  ({figures['clean_seconds']} s)")
    print(f"with {args.fault_rate:.0%} faulty clients per round: global "
          f"{faulty['final']['global_accuracy']:.4f}  central "
          f"{faulty['final']['centralized_accuracy']}  ({figures['faulty_seconds']} s; "
          f"{figures['failures_recorded']} failures recorded)")

    # SIGKILL inside the run: after a random number of finished rounds plus part of a round
    rng = random.Random(args.seed)
    target_rounds = rng.randint(1, args.num_rounds - 1)
    round_times = sorted(json.loads(line)["round_seconds"] for line in
                         (out / "clean" / "timings.jsonl").read_text().splitlines())
    extra = rng.uniform(0.0, 1.0) * round_times[len(round_times) // 2]  # part of a median round
    if (out / "killed").exists():
        shutil.rmtree(out / "killed")
    rounds_file = out / "killed" / "rounds.jsonl"
    t0 = time.perf_counter()
    victim = fedtl(["run", "--out", str(out / "killed"), *common], start_new_session=True)
    while victim.poll() is None and (
            not rounds_file.exists() or len(rounds_file.read_text().splitlines()) < target_rounds):
        time.sleep(0.2)
    time.sleep(extra)
    kill_at = time.perf_counter() - t0
    figures["killed"] = victim.poll() is None
    if figures["killed"]:
        os.killpg(victim.pid, signal.SIGKILL)
    victim.wait()
    killed_rounds = len(rounds_file.read_text().splitlines()) if rounds_file.exists() else 0
    figures["killed_after_seconds"] = round(kill_at, 1)
    figures["rounds_on_disk_when_killed"] = killed_rounds
    if (out / "killed" / "checkpoint.pt").exists():
        finish(fedtl(["run", "--resume", str(out / "killed"), "--no-plots"]))
        resumed = summary(out / "killed")
        figures["resumed_equals_uninterrupted"] = (
            resumed["final"] == clean["final"] and resumed["best"] == clean["best"]
            and (out / "killed" / "rounds.jsonl").read_text()
            == (out / "clean" / "rounds.jsonl").read_text())
    else:
        figures["resumed_equals_uninterrupted"] = None  # killed before the first round ended
    print(f"SIGKILL after {kill_at:.1f} s ({'killed' if figures['killed'] else 'NOT killed: ended'}"
          f" with {killed_rounds} of {args.num_rounds} rounds on disk), resumed: "
          f"identical to the uninterrupted run = {figures['resumed_equals_uninterrupted']}")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
