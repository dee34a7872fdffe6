"""Domain adaptation benchmark: source-only, DANN, ADDA and the target oracle per shift.

Every run is one ``python -m fedtl run`` command (printed before it starts), on Flower's
Simulation Engine with Ray, 10 clients, the shared-target scenario and Dirichlet(0.5) label
skew. For each shift the script prints a Markdown table (target accuracy of the global model
on the clients' target test splits, pooled; the personalized models; the target domain's own
test set where it has one; source accuracy; wall time) and, last, one JSON object with every
figure. With ``--seeds`` every run is repeated per seed (another partition, other MNIST-M crops,
another initialisation), and a table of each method's gain over source-only per seed follows,
with the mean over the seeds whose runs finished and the count of failed runs.

    python benchmarks/domain_adaptation.py --data-dir ../shared/data            # all shifts
    python benchmarks/domain_adaptation.py --data-dir ../shared/data --shift mnist-mnistm \\
        --methods source-only dann --seeds 0 1 2 3 4

MNIST and MNIST-M (built from MNIST) need ``--data-dir`` holding ``MNIST/raw``; digits needs
nothing.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

from fedtl.config import format_override

ROOT = Path(__file__).resolve().parents[1]

# Settings every run of a shift shares: DANN's MNIST network, SGD with momentum 0.9 as in
# DANN's paper; batch-size is per domain, so a DANN step sees 64 source + 64 target images as
# the paper's 128.
COMMON = {
    "model": "dann-mnist", "num-clients": 10, "partitioner": "dirichlet", "alpha": 0.5,
    "da-scenario": "shared-target", "batch-size": 64, "momentum": 0.9, "eval-every": 5,
    "finetune-steps": 10,
}

# Per shift. MNIST -> MNIST-M runs without batch norm and with 100 local steps a round: the
# setting with the strongest source-only floor (batch norm's running statistics fit MNIST-M
# poorly: source-only 42.4 with it against 63.1 without, at 20 local steps), and DANN needs
# the longer training to align the domains (60.2 at 20 local steps, 76.2 at 100). On MNIST ->
# digits batch norm puts source-only at chance, so that shift runs without it too; digits ->
# MNIST keeps it. The README shows the other settings beside each.
SHIFTS = {
    "mnist-mnistm": {"dataset": "mnist", "target-dataset": "mnist-m", "batch-norm": False,
                     "num-rounds": 30, "local-steps": 100, "lr": 0.05, "adda-source-rounds": 15},
    "digits-mnist": {"dataset": "digits", "target-dataset": "mnist", "batch-norm": True,
                     "num-rounds": 30, "local-steps": 10, "lr": 0.05, "adda-source-rounds": 15},
    "mnist-digits": {"dataset": "mnist", "target-dataset": "digits", "batch-norm": False,
                     "num-rounds": 30, "local-steps": 10, "lr": 0.05, "adda-source-rounds": 15},
    # The digits shifts again with the digits in MNIST's layout (digits-28: ink box scaled to
    # 20x20 and centred by mass, as MNIST's digits are) instead of stretched over 28x28;
    # the settings are their stretched counterparts'.
    "digits28-mnist": {"dataset": "digits-28", "target-dataset": "mnist", "batch-norm": True,
                       "num-rounds": 30, "local-steps": 10, "lr": 0.05, "adda-source-rounds": 15},
    "mnist-digits28": {"dataset": "mnist", "target-dataset": "digits-28", "batch-norm": False,
                       "num-rounds": 30, "local-steps": 10, "lr": 0.05, "adda-source-rounds": 15},
}

METHODS = ("source-only", "dann", "adda", "target-oracle")

# DANN's domain term in this benchmark: tllib's pooled mean, the term its lr and clip were
# chosen with and every DANN table in the README was measured with. The paper's sum of
# per-domain means (fedtl's default) gained 3-6 points less on MNIST -> MNIST-M, seeds 0-2
# (README); override with --set dann-domain-loss=sum-of-domain-means.
DANN_DOMAIN_LOSS = "pooled-mean"


def command(shift: str, method: str, out: Path, data_dir: str, extra: list[str]) -> list[str]:
    """The ``fedtl run`` command of one (shift, method) run."""
    settings = {**COMMON, **SHIFTS[shift], "trainer": method, "data-dir": data_dir}
    if method == "dann":
        settings["dann-domain-loss"] = DANN_DOMAIN_LOSS
    args = [sys.executable, "-m", "fedtl", "run", "--out", str(out), "--no-plots"]
    for key, value in settings.items():
        args += ["--set", format_override(key, value)]
    for item in extra:
        args += ["--set", item]
    return args


def shown(args: list[str]) -> str:
    """The command as a user types it (``python -m fedtl run ...``)."""
    return shlex.join(["python", *args[1:]])


def run_one(args: list[str]) -> dict:
    """Run one command; returns its summary figures and its wall time in seconds."""
    started = time.perf_counter()
    proc = subprocess.run(args, check=False, cwd=ROOT, stdout=subprocess.PIPE, stderr=sys.stderr,
                          text=True)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        return {"status": "failed", "returncode": proc.returncode, "wall_seconds": wall}
    run_dir = Path(json.loads(proc.stdout.strip().splitlines()[-1])["run_dir"])
    summary = json.loads((run_dir / "summary.json").read_text())
    final = summary["final"]
    return {
        "status": summary["status"], "run_dir": str(run_dir), "wall_seconds": round(wall, 1),
        "target_accuracy": final["target_accuracy"],
        "target_personalized_accuracy": final["target_personalized_accuracy"],
        "target_central_accuracy": final["centralized_accuracy"],
        "source_accuracy": final["source_accuracy"],
        "best_target_accuracy": summary["best"].get("target_accuracy"),
    }


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def table(shift: str, rows: dict[str, dict]) -> str:
    """A Markdown table of one shift's runs."""
    head = ("| method | target acc. (global) | target acc. (personalized) | target test set "
            "| source acc. | wall time |\n|---|---|---|---|---|---|")
    lines = [f"{SHIFTS[shift]['dataset']} -> {SHIFTS[shift]['target-dataset']}", "", head]
    for method, r in rows.items():
        if r.get("status") != "completed":
            lines.append(f"| {method} | failed | | | | {r['wall_seconds']:.0f} s |")
            continue
        lines.append(
            f"| {method} | {_pct(r['target_accuracy'])} | {_pct(r['target_personalized_accuracy'])}"
            f" | {_pct(r['target_central_accuracy'])} | {_pct(r['source_accuracy'])} "
            f"| {r['wall_seconds']:.0f} s |")
    return "\n".join(lines)


def gains(shift: str, by_seed: dict[int, dict[str, dict]]) -> str:
    """A Markdown table of each method's target accuracy minus source-only's, per seed."""
    seeds = sorted(by_seed)
    methods = [m for m in METHODS if m != "source-only"
               and any(m in rows for rows in by_seed.values())]
    head = ("| method | " + " | ".join(f"seed {s}" for s in seeds) + " | mean of finished "
            "| failed |\n|---" + "|---" * (len(seeds) + 2) + "|")
    lines = [f"{SHIFTS[shift]['dataset']} -> {SHIFTS[shift]['target-dataset']}: target "
             "accuracy minus source-only's (points)", "", head]
    for method in methods:
        cells, finished, failed = [], [], 0
        for seed in seeds:
            rows = by_seed[seed]
            run, floor = rows.get(method), rows.get("source-only")
            if run is None or floor is None:
                cells.append("")
            elif run.get("status") != "completed" or floor.get("status") != "completed":
                failed += 1
                cells.append("failed")
            else:
                gain = 100 * (run["target_accuracy"] - floor["target_accuracy"])
                finished.append(gain)
                cells.append(f"{gain:+.2f}")
        mean = f"{sum(finished) / len(finished):+.2f}" if finished else "-"
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {mean} | {failed} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default="../shared/data", help="folder holding MNIST/raw")
    p.add_argument("--shift", nargs="+", choices=list(SHIFTS), default=list(SHIFTS))
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--out", default="runs/domain-adaptation", help="folder for the run dirs")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra config override for every run (repeatable)")
    p.add_argument("--seeds", nargs="+", type=int, metavar="SEED",
                   help="repeat every run with each of these seeds (default: one run with the "
                        "config's seed)")
    args = p.parse_args(argv)
    if args.seeds is not None and any(item.split("=", 1)[0].strip() == "seed"
                                      for item in args.set):
        p.error("give the seeds with --seeds or one seed with --set seed=N, not both")
    if args.seeds is not None and (min(args.seeds) < 0 or len(set(args.seeds)) < len(args.seeds)):
        p.error(f"--seeds {' '.join(map(str, args.seeds))}: expected distinct seeds >= 0")
    from tqdm import tqdm

    seeds: list[int | None] = list(args.seeds) if args.seeds is not None else [None]
    results: dict[str, dict] = {}
    jobs = [(s, seed, m) for s in args.shift for seed in seeds for m in args.methods]
    stamp = time.strftime("%Y%m%d-%H%M%S")
    bar = tqdm(jobs, desc="runs", unit="run", file=sys.stderr)
    for shift, seed, method in bar:
        bar.set_postfix_str(f"{shift} {method}" + ("" if seed is None else f" seed {seed}"))
        name = f"{shift}-{method}-{stamp}" + ("" if seed is None else f"-seed{seed}")
        extra = args.set + ([] if seed is None else [f"seed={seed}"])
        cmd = command(shift, method, (Path(args.out) / name).resolve(), args.data_dir, extra)
        print(f"\n$ {shown(cmd)}", file=sys.stderr, flush=True)
        result = run_one(cmd)
        result["command"] = shown(cmd)
        rows = results.setdefault(shift, {})
        (rows if seed is None else rows.setdefault(seed, {}))[method] = result
        print(json.dumps({"shift": shift, "method": method,
                          **({} if seed is None else {"seed": seed}), **result}),
              file=sys.stderr, flush=True)
    for shift, rows in results.items():
        if args.seeds is None:
            print(table(shift, rows) + "\n")
            continue
        for seed, by_method in rows.items():
            print(table(shift, by_method).replace("\n", f" (seed {seed})\n", 1) + "\n")
        if "source-only" in args.methods and len(args.methods) > 1:
            print(gains(shift, rows) + "\n")
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
