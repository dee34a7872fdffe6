"""GPU check: every trainer and strategy through Flower + Ray on a fractional GPU, against the
same run on CPU.

Each case is a short `fedtl run` on offline data (scikit-learn's digits; digits -> digits-m
for domain adaptation), run twice with the same seed: on CPU (`client-num-gpus = 0`) and with
each client on a share of the GPU (`client-num-gpus`, `device = auto`). A case passes when
both runs complete and their final accuracies agree within `--tolerance` (GPU kernels sum in
another order, so a few rounds of SGD drift a little, not a lot). While the GPU run trains,
`nvidia-smi` is polled for the processes holding GPU memory: evidence that the clients, not
only the server, ran there. Prints one line per case and, last, one JSON object.

    python benchmarks/gpu_check.py                         # every case (needs a CUDA GPU)
    python benchmarks/gpu_check.py --case supervised-fedavg --case dann
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

SMALL = {"dataset": "digits", "model": "lenet5", "num-clients": 4, "num-rounds": 3,
         "local-steps": 25, "batch-size": 32, "lr": 0.05, "momentum": 0.9, "eval-every": 3,
         "partitioner": "dirichlet", "alpha": 0.5}
DA = {"target-dataset": "digits-m", "lr": 0.02}
SSL = {"local-steps": 5, "probe-label-fraction": 0.2}
KD = {"teacher-checkpoint": "{teacher}"}

CASES: dict[str, dict] = {
    "supervised-fedavg": {},
    "supervised-pfedme": {"strategy": "pfedme", "personal-lr": 0.02},
    "supervised-ditto": {"strategy": "ditto"},
    "supervised-local": {"strategy": "local"},
    "supervised-batch-norm": {"batch-norm": True},
    "instance-spreading": {"trainer": "instance-spreading", "lr": 0.03, **SSL},
    "barlow-twins": {"trainer": "barlow-twins", "optimizer": "adam", "lr": 0.001, **SSL},
    "barlow-twins-pfedme": {"trainer": "barlow-twins", "strategy": "pfedme", "lr": 0.0001,
                            "personal-lr": 0.0001, **SSL},
    "kd": {"trainer": "kd", **KD},
    "kd-noise": {"trainer": "kd-noise", **KD},
    "class-impressions": {"trainer": "class-impressions", "ci-samples": 200, "ci-steps": 20,
                          **KD},
    "zskd": {"trainer": "zskd", "zskd-samples": 200, "zskd-steps": 20, **KD},
    "dafl": {"trainer": "dafl", **KD},
    "source-only": {"trainer": "source-only", **DA},
    "target-oracle": {"trainer": "target-oracle", **DA},
    "dann": {"trainer": "dann", **DA},
    "dann-pfedme": {"trainer": "dann", "strategy": "pfedme", "personal-lr": 0.02, **DA},
    "adda": {"trainer": "adda", "num-rounds": 4, "adda-source-rounds": 2, "eval-every": 2,
             **DA},
}


class GpuProcesses:
    """The PIDs holding GPU memory now (nvidia-smi, polled every 0.5 s on a thread)."""

    def __init__(self) -> None:
        self.now: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        query = ["nvidia-smi", "--query-compute-apps=pid", "--format=csv,noheader"]
        while not self._stop.is_set():
            try:
                out = subprocess.run(query, capture_output=True, text=True, timeout=10).stdout
            except (OSError, subprocess.TimeoutExpired):
                return
            self.now = {int(s) for s in out.split() if s.strip().isdigit()}
            self._stop.wait(0.5)

    def __enter__(self) -> GpuProcesses:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def fedtl_run(values: dict, out: Path, timeout: float, gpu: GpuProcesses | None = None) -> dict:
    """One `fedtl run`: its final figures, wall time, the error's tail if it failed, and (with
    ``gpu``) how many of its processes (the driver, Ray's actors) held GPU memory."""
    import psutil

    args = [sys.executable, "-m", "fedtl", "run", "--out", str(out), "--no-plots"]
    for key, value in values.items():
        args += ["--set", f"{key}={str(value).lower() if isinstance(value, bool) else value}"]
    started = time.perf_counter()
    on_gpu: set[int] = set()
    with tempfile.TemporaryFile("w+") as stdout, tempfile.TemporaryFile("w+") as stderr:
        proc = subprocess.Popen(args, stdout=stdout, stderr=stderr, text=True)
        while proc.poll() is None:
            if time.perf_counter() - started > timeout:
                proc.kill()
                break
            if gpu is not None:  # Ray's raylet and actors descend from the run's process
                try:
                    mine = {c.pid for c in psutil.Process(proc.pid).children(recursive=True)}
                except psutil.Error:
                    mine = set()
                on_gpu |= gpu.now & (mine | {proc.pid})
            time.sleep(0.5)
        proc.wait()
        stdout.seek(0), stderr.seek(0)
        out_text, err_text = stdout.read(), stderr.read()
    wall = time.perf_counter() - started
    row = {"wall": wall, "gpu_processes": len(on_gpu)}
    if proc.returncode != 0:
        return {**row, "ok": False, "error": err_text.strip()[-1500:] or "killed at timeout"}
    return {**row, "ok": True, "final": json.loads(out_text.strip().splitlines()[-1])["final"]}


def accuracy(final: dict) -> float | None:
    """The figure a case is compared on: probe accuracy for encoders, else global."""
    for key in ("probe_accuracy", "global_accuracy", "personalized_accuracy"):
        if final.get(key) is not None:
            return float(final[key])
    return None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--case", choices=sorted(CASES), action="append")
    p.add_argument("--client-num-gpus", type=float, default=0.25)
    p.add_argument("--tolerance", type=float, default=0.1,
                   help="largest accepted |CPU - GPU| final accuracy (default 0.1)")
    p.add_argument("--timeout", type=float, default=600, help="seconds per run")
    p.add_argument("--jobs", type=int, default=max(1, (os.cpu_count() or 2) // 3),
                   help="runs at a time (default: a third of the CPUs)")
    p.add_argument("--out", help="folder for the runs (default: a temporary one)")
    p.add_argument("--cpu-only", action="store_true",
                   help="run the 'GPU' runs on CPU too (checks this script without a GPU)")
    args = p.parse_args()
    import torch

    gpu_share = 0.0 if args.cpu_only else args.client_num_gpus
    if not args.cpu_only and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU is visible to PyTorch here; nothing to check",
              file=sys.stderr)
        return 2
    root = Path(args.out or tempfile.mkdtemp(prefix="fedtl-gpu-check-"))
    cases = args.case or list(CASES)
    teacher = ""
    if any("{teacher}" in map(str, CASES[c].values()) for c in cases):
        teacher_dir = root / "teacher"
        made = fedtl_run({**SMALL, "num-clients": 1, "partitioner": "iid", "num-rounds": 1,
                          "local-steps": 300, "eval-every": 1}, teacher_dir, args.timeout)
        if not made["ok"]:
            print(f"teacher: failed\n{made['error']}", file=sys.stderr)
            return 1
        teacher = str(teacher_dir)
    runs = {}
    with GpuProcesses() as gpu_procs, ThreadPoolExecutor(args.jobs) as pool:
        for case in cases:
            values = {**SMALL, **{k: (v.format(teacher=teacher) if isinstance(v, str) else v)
                                  for k, v in CASES[case].items()}}
            runs[case] = (
                pool.submit(fedtl_run, {**values, "client-num-gpus": 0, "device": "cpu"},
                            root / f"{case}-cpu", args.timeout),
                pool.submit(fedtl_run, {**values, "client-num-gpus": gpu_share},
                            root / f"{case}-gpu", args.timeout, gpu_procs))
        rows, failed = [], 0
        for case, (cpu_future, gpu_future) in runs.items():
            cpu, gpu = cpu_future.result(), gpu_future.result()
            row = {"case": case, "cpu_wall": round(cpu["wall"], 1),
                   "gpu_wall": round(gpu["wall"], 1), "gpu_processes": gpu["gpu_processes"]}
            if cpu["ok"] and gpu["ok"]:
                row["cpu_accuracy"] = accuracy(cpu["final"])
                row["gpu_accuracy"] = accuracy(gpu["final"])
                diff = abs(row["cpu_accuracy"] - row["gpu_accuracy"])
                # the clients (Ray actors), not only the server process, held GPU memory
                row["ok"] = diff <= args.tolerance and (args.cpu_only
                                                        or gpu["gpu_processes"] >= 2)
            else:
                row["ok"] = False
                row["failed_on"] = "cpu" if not cpu["ok"] else "gpu"
                row["error"] = (cpu.get("error") or gpu.get("error"))[-600:]
            failed += not row["ok"]
            print(f"{case:<22} {'ok  ' if row['ok'] else 'FAIL'} cpu {row.get('cpu_accuracy')} "
                  f"({row['cpu_wall']} s)  gpu {row.get('gpu_accuracy')} ({row['gpu_wall']} s), "
                  f"{row['gpu_processes']} of its processes on the GPU"
                  + (f"\n  {row['failed_on']}: {row['error']}" if "error" in row else ""),
                  flush=True)
            rows.append(row)
    print(json.dumps({"machine": {"cpus": os.cpu_count(), "torch": torch.__version__,
                                  "gpu": torch.cuda.get_device_name(0) if gpu_share else None},
                      "client_num_gpus": gpu_share, "cases": rows}))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
