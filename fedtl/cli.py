"""The ``fedtl`` command: run simulations and benches, list what exists, plot run directories,
and prepare a deployment on real machines (``fedtl deploy certs``, ``fedtl deploy check-data``)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import NoReturn

from fedtl.config import KEYS, ConfigError, resolve

EXIT_CONFIG = 2
EXIT_FAILED = 1


def _resume_target(args: argparse.Namespace):
    """The run directory and config to resume, checked before anything starts."""
    from fedtl.config import make_config, read_toml
    from fedtl.results import RunDirectory

    if args.config or args.set or args.out:
        raise ConfigError("--resume DIR takes its config from DIR/config.toml; "
                          "drop CONFIG, --set and --out")
    run_dir = RunDirectory(args.resume)
    if not (run_dir.path / "config.toml").is_file():
        raise ConfigError(f"cannot resume '{args.resume}': it is not a fedtl run directory "
                          "(no config.toml)")
    cfg = make_config(read_toml(run_dir.path / "config.toml"),
                      where=f"in {run_dir.path / 'config.toml'}")
    run_dir.load_checkpoint(dict(cfg))  # a clear error now, not after Ray started
    return cfg, run_dir


def _check_new_out(out: str | None) -> None:
    """``--out`` must be a new or empty folder: say so before any data is loaded."""
    path = Path(out).expanduser() if out else None
    if path is None or not path.exists() or (path.is_dir() and not any(path.iterdir())):
        return
    what = "is not empty" if path.is_dir() else "is a file"
    hint = (f" (the run stopped there continues with 'fedtl run --resume {out}')"
            if (path / "config.toml").is_file() else "")
    raise ConfigError(f"--out {out} {what}: name a new or empty folder{hint}")


def _cmd_run(args: argparse.Namespace) -> int:
    if args.resume:
        cfg, run_dir = _resume_target(args)
        if (run_dir.path / "summary.json").exists() and \
                run_dir.summary().get("status") == "completed":
            print(f"fedtl: {run_dir.path} already completed; nothing to resume", file=sys.stderr)
            return 0
    else:
        cfg = resolve(args.config, args.set or [])
        _check_new_out(args.out)
    # torch, Flower and Ray load only now: a config error is reported in a fraction of a second
    from fedtl.results import RunDirectory
    from fedtl.server_app import RunFailed
    from fedtl.simulation import LineProgress, TqdmProgress, preflight, simulate

    preflight(cfg)
    if not args.resume:
        run_dir = RunDirectory.create(cfg, args.out)
    verb = "resuming" if args.resume else "running"
    print(f"fedtl: {verb} {cfg.strategy} / {cfg.trainer} on {cfg.dataset} ({cfg.partitioner}, "
          f"{cfg.num_clients} clients, {cfg.model}), {cfg.num_rounds} rounds -> {run_dir.path}",
          file=sys.stderr)
    progress = TqdmProgress() if sys.stderr.isatty() and not args.verbose else LineProgress()
    try:
        summary = simulate(cfg, run_dir, progress=progress, verbose=args.verbose,
                           resume=bool(args.resume))
    except RunFailed as exc:
        print(f"fedtl: run failed: {exc}\nfinished rounds are in {run_dir.path}; "
              f"continue with: fedtl run --resume {run_dir.path}", file=sys.stderr)
        return EXIT_FAILED
    except OSError as exc:
        print(f"fedtl: error: cannot write the run directory ({exc.strerror or exc}: "
              f"{exc.filename or run_dir.path}); finished rounds are in {run_dir.path} and "
              f"'fedtl run --resume {run_dir.path}' continues once there is room",
              file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print(f"\nfedtl: interrupted; finished rounds are in {run_dir.path}; "
              f"continue with: fedtl run --resume {run_dir.path}", file=sys.stderr)
        _exit_interrupted()
    if not args.no_plots:
        from fedtl.plots import plot_run

        plot_run(run_dir.path)
    final = summary["final"]
    shown = {k: final.get(k) for k in ("global_accuracy", "personalized_accuracy",
                                       "centralized_accuracy", "personalized_accuracy_bottom10")}
    shown.update({k: final[k] for k in ("probe_accuracy", "knn_accuracy") if k in final})
    print(json.dumps({"run_dir": str(run_dir.path), "final": shown,
                      "wall_seconds": round(summary["wall_seconds"], 1)}))
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    from fedtl.registry import REGISTRIES

    titles = {"strategy": "strategies", "trainer": "trainers", "dataset": "datasets",
              "partitioner": "partitioners", "model": "models"}
    for kind, registry in REGISTRIES.items():
        print(f"{titles[kind]}:")
        for name, entry in registry.items():
            print(f"  {name:<20} {entry.help}")
        print()
    print("config keys (--set key=value, TOML run-configs, flwr --run-config):")
    group = None
    for key in KEYS.values():
        if key.group != group:
            group = key.group
            print(f"  [{group}]")
        print(f"  {key.name:<22} {key.default!r:<12} {key.help}")
    return 0


def _cmd_plot(args: argparse.Namespace) -> int:
    from fedtl.plots import plot_compare, plot_run

    for d in args.dirs:
        if not (Path(d) / "rounds.jsonl").exists():
            raise ConfigError(f"'{d}' is not a fedtl run directory (no rounds.jsonl)")
    for d in args.dirs:
        for path in plot_run(d):
            print(path)
    if len(args.dirs) > 1:
        out = Path(args.out or "compare-accuracy.png")
        print(plot_compare(args.dirs, out))
    return 0


def _cmd_deploy_certs(args: argparse.Namespace) -> int:
    from fedtl.deploy.certs import default_hosts, make_certs

    hosts = list(args.host or []) or default_hosts()
    try:
        certs = make_certs(args.out_dir, hosts, args.names or args.supernodes, days=args.days,
                           force=args.force)
    except (FileExistsError, ValueError) as exc:
        print(f"fedtl: error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    out = certs.out_dir
    print(f"CA:        {certs.ca_cert}  (copy to every SuperNode and to where you run flwr; "
          f"keep {certs.ca_key.name} private)")
    print(f"SuperLink: {certs.superlink_cert}, {certs.superlink_key}  valid for "
          + ", ".join(certs.hosts))
    for name, (private, public) in certs.supernode_keys.items():
        print(f"SuperNode {name}: {private} (stays on that machine), {public} (register it)")
    print(f"\nnext (see README, 'Run on real machines'):\n"
          f"  flower-superlink --host 0.0.0.0 --ssl-certfile {out}/superlink.pem "
          f"--ssl-keyfile {out}/superlink.key --ssl-ca-certfile {out}/ca.pem "
          f"--enable-supernode-auth --disable-runtime-dependency-installation")
    for _, public in certs.supernode_keys.values():
        print(f"  flwr supernode register {public} fedtl")
    return 0


def _cmd_deploy_check_data(args: argparse.Namespace) -> int:
    from fedtl.data.local import LocalDataError, client_stats, local_client_data
    from fedtl.registry import DATASETS

    cfg = resolve(args.config, args.set or [])
    try:
        data = local_client_data(args.path, cfg)
    except LocalDataError as exc:
        print(f"fedtl: error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    stats = client_stats(data, DATASETS.get(cfg.dataset).num_classes)
    stats.pop("partition-id")
    print(json.dumps({"data-path": str(args.path), "dataset": cfg.dataset, **stats}))
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    import shlex

    from fedtl.bench.runner import plan, run_bench
    from fedtl.bench.spec import load_spec

    seeds = None
    if args.seeds is not None:
        try:
            seeds = tuple(int(s) for s in args.seeds.split(","))
        except ValueError:
            raise ConfigError(f"--seeds {args.seeds!r}: expected integers separated by commas, "
                              "e.g. --seeds 0,1,2") from None
    spec = load_spec(args.spec, tuple(args.set or []), seeds)
    out = Path(args.out or Path("bench") / Path(args.spec).stem)
    command = "fedtl bench " + " ".join(shlex.quote(a) for a in [
        args.spec, *(f"--set={s}" for s in args.set or []),
        *(["--seeds", args.seeds] if args.seeds else []),
        *(["--out", args.out] if args.out else [])])
    if args.report_only:
        from fedtl.bench.report import write_report

        if not (out / "bench.toml").is_file():
            raise ConfigError(f"--report-only: '{out}' holds no bench (no bench.toml); "
                              "pass the --out of a bench that ran")
        plan(spec, out, resume=True)  # the cells there must be this spec's
        print(json.dumps({"bench_dir": str(out), "report": str(write_report(spec, out))}))
        return 0
    try:
        outcome = run_bench(spec, out, resume=args.resume, verbose=args.verbose,
                            command=command)
    except KeyboardInterrupt:
        print(f"\nfedtl: interrupted; finished cells and rounds are in {out}; continue with: "
              f"{command} --resume", file=sys.stderr)
        _exit_interrupted()
    for cell, reason in outcome.failures.items():
        print(f"fedtl: cell {cell} failed: {reason}", file=sys.stderr)
    print(json.dumps({"bench_dir": str(outcome.out), "report": str(outcome.report_dir),
                      "cells_reused": outcome.reused, "cells_run": outcome.ran,
                      "cells_failed": len(outcome.failures),
                      "wall_seconds": round(outcome.wall_seconds, 1)}))
    return EXIT_FAILED if outcome.failures else 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedtl", description="Federated transfer learning on "
                                "Flower + Ray: FedAvg, pFedMe, Ditto and local-only over non-IID "
                                "partitions.")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a simulation (no CONFIG: the offline default)")
    run.add_argument("config", nargs="?", help="TOML run-config (e.g. simulations/x.toml)")
    run.add_argument("--set", action="append", metavar="KEY=VALUE",
                     help="override a config key (repeatable)")
    run.add_argument("--out", help="run directory (default: out-dir/run-name)")
    run.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its last "
                     "finished round")
    run.add_argument("--verbose", action="store_true", help="show Flower's and Ray's logs")
    run.add_argument("--no-plots", action="store_true", help="skip the PNG figures")
    run.set_defaults(func=_cmd_run)

    bench = sub.add_parser("bench", help="run a grid of runs declared in a TOML spec and "
                           "write its report")
    bench.add_argument("spec", help="bench spec (e.g. simulations/bench-digits.toml)")
    bench.add_argument("--out", help="bench directory (default: bench/<spec name>)")
    bench.add_argument("--resume", action="store_true", help="reuse finished cells of --out, "
                       "continue unfinished ones")
    bench.add_argument("--set", action="append", metavar="KEY=VALUE",
                       help="override a config key in every cell (repeatable)")
    bench.add_argument("--report-only", action="store_true", help="write the report from the "
                       "cells already in --out (unfinished ones shown as such); run nothing")
    bench.add_argument("--seeds", metavar="S,S,...", help="run these seeds instead of the "
                       "spec's (e.g. --seeds 0)")
    bench.add_argument("--verbose", action="store_true", help="show Flower's and Ray's logs")
    bench.set_defaults(func=_cmd_bench)

    lst = sub.add_parser("list", help="strategies, trainers, datasets, partitioners, models, "
                         "config keys")
    lst.set_defaults(func=_cmd_list)

    plot = sub.add_parser("plot", help="draw the figures of run directories")
    plot.add_argument("dirs", nargs="+", metavar="DIR")
    plot.add_argument("--out", help="comparison figure for several DIRs "
                      "(default: compare-accuracy.png)")
    plot.set_defaults(func=_cmd_plot)

    deploy = sub.add_parser("deploy", help="run on real machines (README: 'Run on real "
                            "machines')")
    dsub = deploy.add_subparsers(dest="deploy_command", required=True)
    certs = dsub.add_parser("certs", help="create a CA, the SuperLink's TLS certificate and "
                            "SuperNode authentication keys")
    certs.add_argument("out_dir", metavar="OUT_DIR")
    certs.add_argument("--host", action="append", metavar="NAME_OR_IP",
                       help="a host name or IP address SuperNodes use to reach the SuperLink "
                       "(repeatable; default: this machine's host name; localhost, 127.0.0.1 "
                       "and ::1 are always included)")
    certs.add_argument("--supernodes", type=int, default=2, metavar="N",
                       help="number of SuperNode key pairs, named supernode-1 ... (default 2)")
    certs.add_argument("--names", nargs="+", metavar="NAME",
                       help="SuperNode key names instead of --supernodes (e.g. hospital-a)")
    certs.add_argument("--days", type=int, default=365, help="certificate validity (days)")
    certs.add_argument("--force", action="store_true", help="replace existing files")
    certs.set_defaults(func=_cmd_deploy_certs)
    check = dsub.add_parser("check-data", help="check that a SuperNode's data-path can be "
                            "read for a run config; print its split sizes and label counts")
    check.add_argument("path", metavar="DATA_PATH")
    check.add_argument("config", nargs="?", help="TOML run-config (its dataset and splits)")
    check.add_argument("--set", action="append", metavar="KEY=VALUE",
                       help="override a config key (repeatable), e.g. --set dataset=mnist")
    check.set_defaults(func=_cmd_deploy_check_data)
    return p


def _exit_interrupted() -> NoReturn:
    """End the process with status 130 at once, once an interrupt has been reported.

    An interrupted simulation leaves Flower's message workers (threads of a
    ThreadPoolExecutor) blocked in ``ray.get`` on actors Ray has already stopped; a normal
    exit joins those threads and would wait forever. Nothing is lost by not waiting: the
    run directory is written atomically round by round and resumes after a SIGKILL too.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(130)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"fedtl: error: {exc}", file=sys.stderr)
        return EXIT_CONFIG


if __name__ == "__main__":
    sys.exit(main())
