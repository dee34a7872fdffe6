"""Run several run-configs and print one Markdown table of their results.

    python benchmarks/runs_table.py simulations/digits-pathological-fedavg.toml \\
        simulations/digits-pathological-pfedme.toml
    python benchmarks/runs_table.py simulations/pfedme-mnist-mlr.toml --target 0.9459

For each config: the last round's and the validation-selected ("best") global and
personalized accuracy (pooled over clients' test splits), the highest personalized accuracy of
any evaluated round (what papers that pick the best round on test data report, shown for
comparison only), the first evaluated round reaching ``--target`` personalized accuracy, and
the wall time. Runs that already finished in ``--out`` are reused. Last line: JSON.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path


def run(config: Path, out: Path, overrides: list[str]) -> dict:
    run_dir = out / config.stem
    summary_file = run_dir / "summary.json"
    if not (summary_file.exists() and json.loads(summary_file.read_text())["status"] == "completed"):
        if run_dir.exists() and (run_dir / "checkpoint.pt").exists():
            cmd = ["run", "--resume", str(run_dir)]
        else:
            cmd = ["run", str(config), "--out", str(run_dir)] + [
                a for o in overrides for a in ("--set", o)]
        proc = subprocess.run([sys.executable, "-m", "fedtl", *cmd, "--no-plots"],
                              stderr=subprocess.PIPE, text=True)
        if proc.returncode != 0:
            sys.exit(f"{config}: fedtl failed\n{proc.stderr[-3000:]}")
    summary = json.loads(summary_file.read_text())
    rounds = [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()]
    return {"config": str(config), "summary": summary,
            "evaluated": [r for r in rounds if r.get("evaluated")]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("configs", nargs="+", type=Path)
    p.add_argument("--out", type=Path, default=Path("runs/table"))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override applied to every config")
    p.add_argument("--target", type=float, default=None,
                   help="personalized accuracy whose first round is reported")
    args = p.parse_args()
    rows = []
    print("| config | rounds | global (last) | personalized (last) | global (best on val) | "
          "personalized (best on val) | personalized (max over rounds) | first round >= "
          f"{args.target if args.target else '-'} | wall time |")
    print("|---|---|---|---|---|---|---|---|---|")
    for config in args.configs:
        r = run(config, args.out, args.set)
        s, ev = r["summary"], r["evaluated"]
        f, b = s["final"], s["best"]
        peak = max((e["personalized_accuracy"] for e in ev), default=None)
        first = next((e["round"] for e in ev
                      if args.target and e["personalized_accuracy"] >= args.target), None)
        row = {"config": str(config), "rounds": s["rounds_completed"],
               "global_last": f["global_accuracy"], "personalized_last": f["personalized_accuracy"],
               "global_best": b["global_accuracy"], "personalized_best": b["personalized_accuracy"],
               "personalized_max": peak, "first_round_at_target": first,
               "centralized_last": f["centralized_accuracy"], "wall_seconds": s["wall_seconds"]}
        rows.append(row)
        print(f"| `{config.name}` | {row['rounds']} | {row['global_last']:.4f} | "
              f"{row['personalized_last']:.4f} | {row['global_best']:.4f} | "
              f"{row['personalized_best']:.4f} | {peak:.4f} | {first if first else '-'} | "
              f"{row['wall_seconds']:.0f} s |", flush=True)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
