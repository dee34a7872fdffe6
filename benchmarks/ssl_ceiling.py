"""How far a self-supervised trainer gets WITHOUT federation: the ceiling of the SSL benchmark.

One learner holds every client's train split of ``benchmarks/self_supervised.py``'s partition
(the same samples, now drawn IID in batches) and trains the same encoder with the same views,
loss and optimiser settings, with ONE optimiser over the whole run (a federated client starts
a fresh one every round). Every ``--eval-every`` steps the encoder is scored exactly as the
benchmark scores a run's ``model.pt`` (``encoder_scores``): the probe and kNN fitted on the
union of the clients' labelled parts, on the central test set (MNIST) and on the clients'
test splits, pooled. Labels are read only by those scores.

A federated run cannot be expected above this line for the same number of steps per client,
so it says whether a target is out of reach of a trainer / encoder pair before any
federated tuning.

    python benchmarks/ssl_ceiling.py --dataset mnist --data-dir ../shared/data \\
        --method barlow-twins --steps 12000 --eval-every 1000
    python benchmarks/ssl_ceiling.py --dataset digits --method instance-spreading --steps 4000
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _benchmark_settings():
    """``config_for`` of benchmarks/self_supervised.py: the ceiling uses its settings."""
    spec = importlib.util.spec_from_file_location("self_supervised_benchmark",
                                                  ROOT / "benchmarks" / "self_supervised.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.config_for


def ceiling(cfg, steps: int, eval_every: int, threads: int) -> list[dict]:
    """Train one encoder on the pooled train splits; the encoder's scores every
    ``eval_every`` steps (and at step 0 and the last step), each with its elapsed seconds."""
    import torch
    from tqdm import tqdm

    from fedtl.clients.trainers.self_supervised import encoder_scores
    from fedtl.clients.update_rule import clip_gradients, local_optimizer
    from fedtl.data import ClientData, Split, federated_data
    from fedtl.registry import TRAINERS

    torch.set_num_threads(threads)
    data = federated_data(cfg)
    clients = [data.client(pid) for pid in range(data.num_clients)]
    empty = Split(clients[0].train.x[:0], clients[0].train.y[:0])
    pooled = ClientData(-1, Split(torch.cat([c.train.x for c in clients]),
                                  torch.cat([c.train.y for c in clients])), empty, empty)
    trainer = TRAINERS.get(cfg.trainer)(cfg)
    model = trainer.build_model(data.spec, seed=cfg.seed)
    optimizer = local_optimizer(model.parameters(), cfg)
    generator = torch.Generator().manual_seed(cfg.seed)
    batches = trainer.batches(pooled, generator)
    rows, started, losses = [], time.perf_counter(), []

    def record(step: int) -> None:
        scores = encoder_scores(cfg, model=model)
        model.train()
        loss = sum(losses) / len(losses) if losses else None
        losses.clear()
        rows.append({"step": step, "seconds": round(time.perf_counter() - started, 1),
                     "train_loss": loss, **scores})
        tqdm.write(json.dumps(rows[-1]), file=sys.stderr)

    record(0)
    model.train()
    for step in tqdm(range(1, steps + 1), desc=cfg.trainer, unit="step", file=sys.stderr):
        optimizer.zero_grad(set_to_none=True)
        loss = trainer.loss(model, next(batches))
        loss.backward()
        clip_gradients(model.parameters(), cfg.clip_grad_norm)
        optimizer.step()
        losses.append(float(loss.detach()))
        if step % eval_every == 0 or step == steps:
            record(step)
    return rows


def table(rows: list[dict], central: bool) -> str:
    head = "| step | " + ("central probe / kNN | " if central else "") + \
        "pooled probe / kNN | train loss | seconds |"
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for r in rows:
        cells = [str(r["step"])]
        if central:
            cells.append(f"{r['probe_accuracy']:.4f} / {r['knn_accuracy']:.4f}")
        cells += [f"{r['pooled_probe_accuracy']:.4f} / {r['pooled_knn_accuracy']:.4f}",
                  "-" if r["train_loss"] is None else f"{r['train_loss']:.4f}",
                  f"{r['seconds']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", choices=("mnist", "digits"), default="mnist")
    p.add_argument("--data-dir", default="../shared/data", help="folder holding MNIST/raw")
    p.add_argument("--method", choices=("instance-spreading", "barlow-twins"),
                   default="barlow-twins")
    p.add_argument("--label-fraction", type=float, default=None,
                   help="labelled share of each client's train split (default: 0.01 on MNIST, "
                        "0.1 on digits, as the benchmark)")
    p.add_argument("--steps", type=int, default=6000, help="optimiser steps (>= 1)")
    p.add_argument("--eval-every", type=int, default=1000, help="steps between scores (>= 1)")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override on top of the benchmark's setting (repeatable)")
    args = p.parse_args(argv)
    if args.steps < 1 or args.eval_every < 1:
        p.error(f"--steps {args.steps} / --eval-every {args.eval_every}: both must be >= 1")
    fraction = args.label_fraction or (0.01 if args.dataset == "mnist" else 0.1)
    from fedtl.config import make_config, parse_override

    values = _benchmark_settings()(args.dataset, args.method, fraction, args.data_dir)
    for item in args.set:
        key, value = parse_override(item)
        values[key] = value
    cfg = make_config(values)  # a bad key or value fails here, before any data is loaded
    print(f"ceiling of {args.method} on {args.dataset}: {args.steps} steps of batch "
          f"{cfg.batch_size}, {cfg.optimizer} lr {cfg.lr}, model {cfg.model}", file=sys.stderr)
    rows = ceiling(cfg, args.steps, args.eval_every, args.threads)
    print(table(rows, central=rows[-1]["probe_accuracy"] is not None))
    print(json.dumps({"config": dict(cfg), "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
