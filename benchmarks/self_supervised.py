"""Federated self-supervised pre-training against the few-label baselines, on one dataset.

Runs, on the same clients (Dirichlet label skew) and the same labelled samples:

- ``instance-spreading`` and ``barlow-twins``: FedAvg pre-training on the clients' unlabelled
  train splits, then a linear probe and kNN fitted on ``--label-fraction`` of each client's
  train split (centrally: the union of those samples; per client: its own);
- ``supervised``: FedAvg with cross-entropy on the same labelled samples only
  (``label-fraction``);
- ``random-encoder``: the probe and kNN on the untrained, seeded initial encoder.

Each federated run is ``python -m fedtl run`` in its own process (its own Ray); the printed
command repeats it. Columns: ``central`` = the central test set (probe / kNN fitted on the
union of the clients' labelled parts; supervised: its ``centralized_accuracy``); ``pooled`` =
the same probe scored on the union of the clients' test splits (supervised: its
``global_accuracy``, the same samples); ``clients`` = each client's own probe on its own
labels, pooled. The targets compare ``central`` where the dataset has a central test set
(MNIST) and ``pooled`` otherwise (digits). The last line printed is one JSON object.

    python benchmarks/self_supervised.py --dataset mnist --data-dir /work/shared/data
    python benchmarks/self_supervised.py --dataset digits --label-fraction 0.1
    python benchmarks/self_supervised.py --dataset digits --methods barlow-twins --set seed=1
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from fedtl.config import format_override

ROOT = Path(__file__).resolve().parents[1]

# Per dataset: the shared setting and each method's optimiser, chosen as the README says.
# Barlow Twins' batch-standardised loss gives a small-activation encoder without BatchNorm
# very large gradients: SGD needs a tiny lr (3e-5), Adam's per-parameter steps train at 1e-3.
SETTINGS = {
    "mnist": {
        "common": {"dataset": "mnist", "model": "lenet5", "num-clients": 10,
                   "partitioner": "dirichlet", "alpha": 0.5, "seed": 0},
        "ssl": {"num-rounds": 20, "local-steps": 20, "batch-size": 128, "momentum": 0.9,
                "eval-every": 5, "finetune-steps": 0},
        "instance-spreading": {"lr": 0.03},
        # the setting chosen on digits (below), applied unchanged
        "barlow-twins": {"lr": 1e-3, "optimizer": "adam", "ssl-shared": "encoder"},
        "supervised": {"num-rounds": 50, "local-steps": 20, "batch-size": 32, "lr": 0.05,
                       "momentum": 0.9, "eval-every": 5},
    },
    "digits": {
        "common": {"dataset": "digits", "model": "lenet5", "num-clients": 10,
                   "partitioner": "dirichlet", "alpha": 0.5, "seed": 0},
        # as many rounds and local steps as the supervised baseline
        "ssl": {"num-rounds": 100, "local-steps": 20, "batch-size": 64, "momentum": 0.9,
                "eval-every": 10, "finetune-steps": 0},
        "instance-spreading": {"lr": 0.03},
        # Adam (beta1 = momentum) instead of SGD, each client keeping its projector: chosen
        # on validation accuracy in a screen of optimisers and ssl-shared (README)
        "barlow-twins": {"lr": 1e-3, "optimizer": "adam", "ssl-shared": "encoder"},
        # lr 0.05 with momentum 0.9 diverges on ~11 labels per client
        "supervised": {"num-rounds": 100, "local-steps": 20, "batch-size": 32, "lr": 0.01,
                       "momentum": 0.9, "eval-every": 5},
    },
}
METHODS = ("instance-spreading", "barlow-twins", "supervised", "random-encoder")


def config_for(dataset: str, method: str, label_fraction: float, data_dir: str) -> dict:
    """The run-config of one method in this benchmark's setting."""
    s = SETTINGS[dataset]
    cfg = dict(s["common"])
    if dataset != "digits":
        cfg["data-dir"] = data_dir
    if method == "supervised":
        cfg.update(s["supervised"], trainer="supervised", **{"label-fraction": label_fraction})
    else:
        trainer = "instance-spreading" if method == "random-encoder" else method
        cfg.update(s["ssl"], trainer=trainer, **{"probe-label-fraction": label_fraction})
        cfg.update(s.get(trainer, {}))
    return cfg


def command(cfg: dict, out: Path) -> list[str]:
    args = [sys.executable, "-m", "fedtl", "run", "--no-plots", "--out", str(out)]
    for key, value in cfg.items():
        args += ["--set", format_override(key, value)]
    return args


def run_federated(cfg: dict, out: Path) -> dict:
    """One ``fedtl run``; returns its summary and wall time (stderr passes through)."""
    args = command(cfg, out)
    shown = "python -m fedtl run " + " ".join(shlex.quote(a) for a in args[4:])
    print(f"$ {shown}", file=sys.stderr, flush=True)
    started = time.perf_counter()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(args, check=False, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          text=True)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"run failed ({proc.returncode}): {shown}")
    summary = json.loads((out / "summary.json").read_text())
    return {"command": shown, "wall_seconds": round(wall, 1), "summary": summary}


def scores_of(cfg: dict, weights_file: Path | None = None) -> dict:
    """encoder_scores of a run's final model.pt, or of the seeded initial encoder (nothing
    is trained), in this process."""
    import torch

    from fedtl.clients.trainers.self_supervised import encoder_scores
    from fedtl.config import make_config

    torch.set_num_threads(1)
    weights = torch.load(weights_file) if weights_file is not None else None
    return encoder_scores(make_config(cfg), weights=weights)


def run_random_encoder(cfg: dict) -> dict:
    started = time.perf_counter()
    scores = scores_of(cfg)
    return {"command": "encoder_scores(make_config(" + json.dumps(cfg) + "))",
            "wall_seconds": round(time.perf_counter() - started, 1), "scores": scores}


def figures(method: str, result: dict) -> dict:
    """The comparable numbers of one method (None where it has none)."""
    if method == "supervised":
        final = result["summary"]["final"]
        return {"central": final["centralized_accuracy"], "central_knn": None,
                "pooled": final["global_accuracy"], "pooled_knn": None,
                "clients": None, "clients_knn": None}
    s = result["scores"]
    return {"central": s["probe_accuracy"], "central_knn": s["knn_accuracy"],
            "pooled": s["pooled_probe_accuracy"], "pooled_knn": s["pooled_knn_accuracy"],
            "clients": s["probe_global_accuracy"], "clients_knn": s["knn_global_accuracy"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", choices=sorted(SETTINGS), default="mnist")
    p.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--label-fraction", type=float, default=None,
                   help="labelled share of each client's train split (mnist 0.01, digits 0.1)")
    p.add_argument("--methods", default=",".join(METHODS),
                   help="comma-separated subset of " + ", ".join(METHODS))
    p.add_argument("--out", default=str(ROOT / "runs" / "bench-ssl"))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for every run, after the script's own settings "
                        "(repeatable), e.g. --set batch-norm=true")
    args = p.parse_args()
    from fedtl.config import ConfigError, parse_override

    try:
        overrides = dict(parse_override(item) for item in args.set)
    except ConfigError as exc:
        raise SystemExit(f"--set: {exc}") from None
    fraction = (args.label_fraction if args.label_fraction is not None
                else {"mnist": 0.01, "digits": 0.1}[args.dataset])
    if not 0 < fraction <= 1:
        p.error(f"--label-fraction {fraction}: must be in (0, 1]")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise SystemExit(f"--methods: unknown {sorted(unknown)}; accepted: {', '.join(METHODS)}")
    out = Path(args.out) / f"{args.dataset}-{fraction:g}-{time.strftime('%Y%m%d-%H%M%S')}"

    results: dict[str, dict] = {}
    for method in methods:
        cfg = {**config_for(args.dataset, method, fraction, args.data_dir), **overrides}
        if method == "random-encoder":
            results[method] = run_random_encoder(cfg)
        else:
            results[method] = run_federated(cfg, out / method)
            if method != "supervised":
                results[method]["scores"] = scores_of(cfg, out / method / "model.pt")
        results[method]["figures"] = figures(method, results[method])
        print(f"{method}: {results[method]['figures']} "
              f"({results[method]['wall_seconds']} s)", file=sys.stderr, flush=True)

    key = "central" if args.dataset == "mnist" else "pooled"
    print(f"\n{args.dataset}, {fraction:g} of the labels; targets compared on "
          f"{'the central test set' if key == 'central' else 'the clients test splits, pooled'}")
    columns = ("central", "central_knn", "pooled", "pooled_knn", "clients", "clients_knn")
    print(f"{'method':<20}" + "".join(f"{c:>12}" for c in columns) + f"{'wall s':>9}")

    def fmt(v: float | None) -> str:
        return "-" if v is None else f"{v:.4f}"

    for method, r in results.items():
        f = r["figures"]
        print(f"{method:<20}" + "".join(f"{fmt(f[c]):>12}" for c in columns)
              + f"{r['wall_seconds']:>9}")
    targets = {}
    baselines = [m for m in ("supervised", "random-encoder") if m in results]
    for method in ("instance-spreading", "barlow-twins"):
        if method in results and baselines:
            mine = results[method]["figures"][key]
            margins = {b: mine - results[b]["figures"][key] for b in baselines}
            targets[method] = {"margins": margins, "met": all(v >= 0.05 for v in margins.values())}
            print(f"{method}: margins over " + ", ".join(
                f"{b} {v * 100:+.1f} points" for b, v in margins.items())
                + (" (target >= 5: met)" if targets[method]["met"] else " (target >= 5: MISSED)"))
    print(json.dumps({"dataset": args.dataset, "label_fraction": fraction, "compared_on": key,
                      "results": {m: {k: v for k, v in r.items() if k != "summary"}
                                  for m, r in results.items()},
                      "targets": targets}))


if __name__ == "__main__":
    main()
