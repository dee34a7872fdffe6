"""Knowledge distillation on MNIST: federated KD against CE only, and data-free KD.

Every row is one ``fedtl run`` command (printed as it starts), run as a subprocess with its
own run directory under ``--out``; the figures are read back from its ``summary.json``:

1. ``teacher``: a centralised LeNet-5 (``simulations/mnist-teacher-lenet5.toml``), or the run
   directory given with ``--teacher``;
2. with the clients' data (``simulations/mnist-kd-lenet5-half.toml``: 10 clients, Dirichlet
   0.5, LeNet-5-half students, FedAvg): ``supervised`` (CE only, no teacher) and ``kd``;
   optionally ``kd-pfedme`` (each client keeps a personalized student);
3. data-free (``simulations/mnist-data-free-lenet5-half.toml``: the same 10 clients train on
   what they synthesise from the teacher, never on their data): ``kd-noise`` (the floor),
   ``class-impressions``, ``zskd``, ``dafl``; optionally ``dafl-central``: one data-free
   party and no federation, the papers' own setting.

Accuracy is ``final.centralized_accuracy``: the global student on MNIST's 10,000 test images.
The last line printed is one JSON object with every row.

    python benchmarks/distillation.py --data-dir ../shared/data
    python benchmarks/distillation.py --data-dir ../shared/data --teacher runs/teacher \\
        --only kd,supervised
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEACHER = "simulations/mnist-teacher-lenet5.toml"
WITH_DATA = "simulations/mnist-kd-lenet5-half.toml"
DATA_FREE = "simulations/mnist-data-free-lenet5-half.toml"

# name: (run-config file, overrides); the teacher is added where a row needs one.
ROWS: dict[str, tuple[str, dict[str, str]]] = {
    "supervised": (WITH_DATA, {"trainer": "supervised"}),
    "kd": (WITH_DATA, {"trainer": "kd"}),
    "kd-pfedme": (WITH_DATA, {"trainer": "kd", "strategy": "pfedme"}),
    "kd-noise": (DATA_FREE, {"trainer": "kd-noise"}),
    "class-impressions": (DATA_FREE, {"trainer": "class-impressions"}),
    "zskd": (DATA_FREE, {"trainer": "zskd"}),
    # DAFL's student learns at T = 1 as in the paper (so the SGD rate of CE suits it); each
    # client trains its own generator, so fewer local steps keep its cost in bounds.
    "dafl": (DATA_FREE, {"trainer": "dafl", "kd-temperature": "1.0", "lr": "0.05",
                         "local-steps": "20"}),
    # The papers' setting: one data-free party distils the teacher alone (no federation),
    # DAFL with 128 samples per step for 1,500 steps.
    "dafl-central": (DATA_FREE, {"trainer": "dafl", "kd-temperature": "1.0", "lr": "0.05",
                                 "num-clients": "1", "partitioner": "iid", "num-rounds": "30",
                                 "local-steps": "50", "dafl-batch-size": "128",
                                 "eval-every": "10"}),
}
DEFAULT_ROWS = ("supervised", "kd", "kd-noise", "class-impressions", "zskd", "dafl")


def fedtl_run(config: str, sets: dict[str, str], out: Path) -> tuple[list[str], dict, float]:
    """Run ``fedtl run config --set ... --out out``; returns the command, the summary and
    the command's wall time in seconds."""
    cmd = [sys.executable, "-m", "fedtl", "run", config, "--no-plots", "--out", str(out)]
    for key, value in sets.items():
        cmd += ["--set", f"{key}={value}"]
    shown = " ".join(shlex.quote(c) for c in ["fedtl", *cmd[3:]])
    print(f"\n$ {shown}", file=sys.stderr, flush=True)
    started = time.perf_counter()
    # the run's output goes to our stderr: our stdout is kept for the JSON line
    proc = subprocess.run(cmd, cwd=ROOT, stdout=sys.stderr, check=False)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{shown} failed with status {proc.returncode}")
    summary = json.loads((out / "summary.json").read_text())
    return cmd, summary, wall


def row_result(name: str, cmd: list[str], summary: dict, wall: float) -> dict:
    final = summary["final"]
    return {
        "row": name,
        "command": " ".join(shlex.quote(c) for c in ["fedtl", *cmd[3:]]),
        "trainer": summary["trainer"], "strategy": summary["strategy"],
        "rounds": summary["rounds_completed"],
        "centralized_accuracy": final["centralized_accuracy"],
        "global_accuracy": final["global_accuracy"],
        "personalized_accuracy": final["personalized_accuracy"],
        "wall_seconds": round(wall, 1),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default="data", help="folder holding MNIST/raw")
    p.add_argument("--out", default="runs/distillation", help="folder for the run directories")
    p.add_argument("--teacher", help="an existing teacher run directory (skips training one)")
    p.add_argument("--only", help="comma-separated rows (default: " + ",".join(DEFAULT_ROWS)
                   + "; also kd-pfedme, dafl-central)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra override for every student row (repeatable)")
    args = p.parse_args(argv)
    out = Path(args.out).resolve()
    data_dir = str(Path(args.data_dir).expanduser().resolve())
    rows = args.only.split(",") if args.only else list(DEFAULT_ROWS)
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        p.error(f"unknown rows {unknown}; known: {', '.join(ROWS)}")
    extra = dict(s.split("=", 1) for s in args.set)

    results = []
    stamp = time.strftime("%Y%m%d-%H%M%S")
    if args.teacher:
        teacher = Path(args.teacher).resolve()
        summary = json.loads((teacher / "summary.json").read_text())
        results.append({"row": "teacher", "command": f"(given: {teacher})",
                        "centralized_accuracy": summary["final"]["centralized_accuracy"],
                        "wall_seconds": round(summary["wall_seconds"], 1)})
    else:
        teacher = out / f"teacher-{stamp}"
        cmd, summary, wall = fedtl_run(TEACHER, {"data-dir": data_dir}, teacher)
        results.append(row_result("teacher", cmd, summary, wall))
    print(f"teacher: {results[0]['centralized_accuracy']:.4f}", file=sys.stderr, flush=True)

    for name in rows:
        config, sets = ROWS[name]
        sets = {"data-dir": data_dir, **sets, **extra}
        if name != "supervised":
            sets["teacher-checkpoint"] = str(teacher)
        run_dir = out / f"{name}-{stamp}"
        if config == DATA_FREE and name != "kd-noise":
            sets["synthetic-dir"] = str(run_dir / "synthetic")
        cmd, summary, wall = fedtl_run(config, sets, run_dir)
        results.append(row_result(name, cmd, summary, wall))
        r = results[-1]
        print(f"{name}: central {r['centralized_accuracy']:.4f} in {wall:.0f} s",
              file=sys.stderr, flush=True)

    print("\n| row | central test accuracy | wall time (s) |", file=sys.stderr)
    print("|---|---|---|", file=sys.stderr)
    for r in results:
        print(f"| {r['row']} | {r['centralized_accuracy']:.4f} | {r['wall_seconds']:.0f} |",
              file=sys.stderr)
    print(json.dumps({"rows": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
