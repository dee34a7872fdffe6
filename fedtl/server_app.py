"""fedtl's Flower ServerApp: the round loop, evaluation and the run directory.

The loop calls the strategy's four steps (configure_train, aggregate_train,
configure_evaluate, aggregate_evaluate) itself rather than ``Strategy.start`` so that it can
evaluate every ``eval-every`` rounds, record per-client results and failures, show progress,
and write each finished round to disk before the next begins.

A run starts with a ``query.describe`` message to every client: clients report their partition
id, split sizes and label counts. The strategy samples by partition id (reproducible from the
seed), and the partition statistics in the run directory are what the clients really hold.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedtl.clients.trainers.base import Phase
from fedtl.config import ConfigError, RunConfig, make_config
from fedtl.data import dataset_spec
from fedtl.evaluation import pooled, score, spread
from fedtl.registry import STRATEGIES, TRAINERS
from fedtl.results import RunDirectory

log = logging.getLogger("fedtl")

CONNECT_TIMEOUT = 600.0  # seconds to wait for the SuperNodes of a deployment to connect
REPLY_TIMEOUT = 24 * 3600.0


class RunFailed(RuntimeError):
    """The federation cannot go on (e.g. no client replied); finished rounds are on disk."""


class Progress(Protocol):
    def start(self, total: int) -> None: ...
    def update(self, record: dict) -> None: ...
    def close(self) -> None: ...


class LogProgress:
    """One log line per round (``flwr run --stream`` shows it)."""

    def start(self, total: int) -> None:
        self.total = total

    def update(self, record: dict) -> None:
        log.info("%s", round_line(record, self.total))

    def close(self) -> None:
        pass


def round_line(record: dict, total: int) -> str:
    parts = [f"round {record['round']}/{total}"]
    if record.get("phase") not in (None, "train"):
        parts.append(f"[{record['phase']}]")
    for key, label in (("global_accuracy", "global"), ("personalized_accuracy", "personalized"),
                       ("centralized_accuracy", "central")):
        if record.get(key) is not None:
            parts.append(f"{label} {record[key]:.4f}")
    if record.get("failures"):
        parts.append(f"{len(record['failures'])} failed")
    return "  ".join(parts)


@dataclass
class ClientInfo:
    node_id: int
    partition_id: int
    stats: dict


def error_reason(message: Message) -> str:
    """The readable part of a client's error reply (Flower wraps the exception text)."""
    reason = message.error.reason
    marker = "Message: "
    if marker in reason:
        reason = reason.split(marker, 1)[1]
    return reason.strip().strip("'>").strip()


def _bytes(arrays: ArrayRecord) -> int:
    return int(arrays.count_bytes())


def _failures(replies: Iterable[Message], clients: dict[int, ClientInfo], stage: str) -> list[dict]:
    out = []
    for m in replies:
        if m.has_error():
            info = clients.get(m.metadata.src_node_id)
            out.append({
                "partition_id": info.partition_id if info else None,
                "node_id": m.metadata.src_node_id, "stage": stage, "reason": error_reason(m),
            })
    return out


def _describe(grid: Grid, cfg: RunConfig, node_ids: list[int]) -> list[Message]:
    config = ConfigRecord(dict(cfg))
    messages = [Message(RecordDict({"config": config}), dst_node_id=n,
                        message_type="query.describe") for n in node_ids]
    return list(grid.send_and_receive(messages, timeout=REPLY_TIMEOUT))


def describe_clients(grid: Grid, cfg: RunConfig) -> tuple[dict[int, ClientInfo], list[dict]]:
    """Ask every connected node for its partition and split sizes; wait for all of them.

    If fewer than ``num-clients`` nodes are connected after a few seconds, the connected ones
    are asked once: when all of them refuse the run (e.g. the federation has a different
    number of partitions), the run stops with their reason instead of waiting.
    """
    started = time.monotonic()
    probed = False
    next_note = started + 10
    while len(node_ids := sorted(grid.get_node_ids())) < cfg.num_clients:
        now = time.monotonic()
        if not probed and node_ids and now - started > 3:
            probed = True
            replies = _describe(grid, cfg, node_ids)
            if replies and all(m.has_error() for m in replies):
                raise RunFailed(f"clients refused the run: {error_reason(replies[0])}")
        if now - started > CONNECT_TIMEOUT:
            raise RunFailed(
                f"only {len(node_ids)} of num-clients={cfg.num_clients} SuperNodes connected "
                f"within {CONNECT_TIMEOUT:.0f} s"
            )
        if now > next_note:
            log.info("waiting for SuperNodes: %d of %d connected", len(node_ids), cfg.num_clients)
            next_note = now + 30
        time.sleep(0.5)
    clients: dict[int, ClientInfo] = {}
    failures = []
    for m in _describe(grid, cfg, node_ids):
        if m.has_error():
            failures.append({"node_id": m.metadata.src_node_id, "stage": "describe",
                             "reason": error_reason(m), "partition_id": None})
            continue
        stats = dict(m.content["stats"])
        pid = int(stats["partition-id"])
        stats["label-counts"] = [int(c) for c in stats["label-counts"]]
        clients[m.metadata.src_node_id] = ClientInfo(m.metadata.src_node_id, pid, stats)
    if not clients:
        reasons = "; ".join(sorted({f["reason"] for f in failures})) or "no replies"
        raise RunFailed(f"no client could describe its data: {reasons}")
    seen = [c.partition_id for c in clients.values()]
    if len(set(seen)) != len(seen):
        raise RunFailed("two SuperNodes report the same partition-id; give each its own")
    return clients, failures


def _split_names(metrics) -> list[str]:
    """The score names a client reported (``test``, ``val``, and any a trainer adds)."""
    return sorted(k[: -len("-total")] for k in metrics if k.endswith("-total"))


def client_rows(replies: list[Message], clients: dict[int, ClientInfo]) -> list[dict]:
    """Per-client evaluation numbers from evaluate replies, in partition order.

    Columns are ``<split>_total``, ``<split>_correct_<kind>``, ``<split>_loss_<kind>`` and
    ``<split>_<kind>_accuracy`` for kind in global / personalized (split names with ``_``).
    """
    rows = []
    for m in replies:
        if m.has_error() or m.metadata.src_node_id not in clients:
            continue
        info = clients[m.metadata.src_node_id]
        r = m.content["metrics"]
        row: dict[str, Any] = {"partition_id": info.partition_id,
                               "num_train": info.stats["num-train"]}
        for split in _split_names(r):
            col = split.replace("-", "_")
            total = int(r[f"{split}-total"])
            row[f"{col}_total"] = total
            for kind in ("global", "personalized"):
                correct = int(r[f"{split}-correct-{kind}"])
                row[f"{col}_correct_{kind}"] = correct
                row[f"{col}_loss_{kind}"] = float(r[f"{split}-loss-{kind}"])
                row[f"{col}_{kind}_accuracy"] = correct / total if total else float("nan")
        rows.append(row)
    return sorted(rows, key=lambda row: row["partition_id"])


def summarize_round(rows: list[dict]) -> dict[str, Any]:
    """Pooled and per-client accuracy of the global and personalized models.

    ``test`` gives the headline keys (``global_accuracy``, ``personalized_accuracy_std``, ...),
    ``val`` gives ``*_val_accuracy``; any other split ``s`` gives ``s_global_accuracy`` and
    ``s_personalized_accuracy`` (pooled).
    """
    out: dict[str, Any] = {"clients_evaluated": len(rows)}
    splits = sorted({k[: -len("_total")] for r in rows for k in r if k.endswith("_total")})
    for kind in ("global", "personalized"):
        for split in splits:
            correct = [r.get(f"{split}_correct_{kind}", 0) for r in rows]
            total = [r.get(f"{split}_total", 0) for r in rows]
            acc = pooled(correct, total)
            if split == "test":
                out[f"{kind}_accuracy"] = acc
                n = sum(total)
                out[f"{kind}_loss"] = (sum(r[f"test_loss_{kind}"] for r in rows) / n
                                       if n else None)
                s = spread([r[f"test_{kind}_accuracy"] for r in rows])
                out[f"{kind}_accuracy_mean"] = s["mean"]
                out[f"{kind}_accuracy_std"] = s["std"]
                out[f"{kind}_accuracy_bottom10"] = s["bottom10"]
            elif split == "val":
                out[f"{kind}_val_accuracy"] = acc
            else:
                out[f"{split}_{kind}_accuracy"] = acc
    compared = [r for r in rows if r.get("test_total")]
    hurt = [r for r in compared if r["test_personalized_accuracy"] < r["test_global_accuracy"]]
    out["personalization_hurts_share"] = len(hurt) / len(compared) if compared else None
    return out


FINAL_KEYS = (
    "global_accuracy", "global_accuracy_mean", "global_accuracy_std", "global_accuracy_bottom10",
    "personalized_accuracy", "personalized_accuracy_mean", "personalized_accuracy_std",
    "personalized_accuracy_bottom10", "centralized_accuracy", "global_val_accuracy",
    "personalized_val_accuracy", "personalization_hurts_share",
)


def summary_keys(record: dict) -> list[str]:
    """FINAL_KEYS, then the pooled accuracies of any other split a trainer reports."""
    suffixes = ("_global_accuracy", "_personalized_accuracy")
    extra = sorted(k for k in record if k.endswith(suffixes) and k not in FINAL_KEYS)
    return [*FINAL_KEYS, *extra]


def _add_aliases(figures: dict[str, Any], aliases: dict[str, str]) -> dict[str, Any]:
    for alias, key in aliases.items():
        figures[alias] = figures.get(key)
    return figures


def select_best(rounds: list[dict]) -> dict[str, Any]:
    """Figures at the rounds chosen on VALIDATION accuracy: the global model's figures at the
    round of best global validation accuracy, the personalized model's at the round of best
    personalized validation accuracy. Ties go to the earlier round. Only rounds of the last
    phase compete (earlier phases of a multi-phase trainer prepare the final model)."""
    evaluated = [r for r in rounds if r.get("evaluated")]
    if not evaluated:
        return {}
    evaluated = [r for r in evaluated if r.get("phase") == evaluated[-1].get("phase")]

    def pick(kind: str) -> dict:
        valued = [r for r in evaluated if r.get(f"{kind}_val_accuracy") is not None]
        if not valued:
            return evaluated[-1]
        return max(valued, key=lambda r: (r[f"{kind}_val_accuracy"], -r["round"]))

    g, p = pick("global"), pick("personalized")
    best: dict[str, Any] = {"selected_on": "validation", "global_round": g["round"],
                            "personalized_round": p["round"]}
    for key in summary_keys(evaluated[-1]):
        source = p if "personaliz" in key else g
        best[key] = source.get(key)
    return best


def build_summary(cfg: RunConfig, rounds: list[dict], status: str, wall: float,
                  error: str | None = None) -> dict[str, Any]:
    evaluated = [r for r in rounds if r.get("evaluated")]
    last = evaluated[-1] if evaluated else {}
    final = {"round": last.get("round")}
    final.update({k: last.get(k) for k in summary_keys(last)})
    aliases = dict(TRAINERS.get(cfg.trainer).summary_aliases)
    return {
        "status": status,
        "error": error,
        "strategy": cfg.strategy, "trainer": cfg.trainer, "dataset": cfg.dataset,
        "target_dataset": cfg.target_dataset or None,
        "model": cfg.model, "partitioner": cfg.partitioner, "num_clients": cfg.num_clients,
        "rounds_completed": rounds[-1]["round"] if rounds else 0,
        "num_rounds": cfg.num_rounds,
        "final": _add_aliases(final, aliases),
        "best": _add_aliases(select_best(rounds), aliases) if evaluated else {},
        "wall_seconds": wall,
        "bytes_sent": sum(r.get("bytes_sent", 0) for r in rounds),
        "bytes_received": sum(r.get("bytes_received", 0) for r in rounds),
    }


def _clean(value: Any) -> Any:
    """JSON-safe: NaN becomes null."""
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def phase_schedule(cfg: RunConfig, phases: list[Phase]) -> list[tuple[Phase, dict]]:
    """Each round's phase and message config (the run config with the phase's overrides);
    raises ConfigError unless the phases' rounds add up to ``num-rounds``."""
    if sum(p.rounds for p in phases) != cfg.num_rounds or any(p.rounds < 1 for p in phases):
        shown = ", ".join(f"{p.name}: {p.rounds}" for p in phases)
        raise ConfigError(f"config key 'num-rounds' = {cfg.num_rounds}: trainer {cfg.trainer!r} "
                          f"runs phases of {shown} rounds, which must each be >= 1 and add up "
                          "to num-rounds")
    schedule = []
    for phase in phases:
        config = dict(make_config({**cfg, **phase.config}, where=f"phase {phase.name!r}"))
        config["phase"] = phase.name
        schedule += [(phase, config)] * phase.rounds
    return schedule


def run_federation(grid: Grid, cfg: RunConfig, run_dir: RunDirectory,
                   progress: Progress | None = None) -> dict[str, Any]:
    """Run ``num-rounds`` rounds of ``cfg``'s algorithm on the nodes of ``grid``.

    The trainer's phases (one, ``train``, unless it declares more) split the rounds; each
    phase's messages carry its config, its ``begin`` maps the global model as it starts, and
    its last round is always evaluated.

    Writes the run directory as it goes and returns the summary. Raises RunFailed when the
    federation cannot continue; the summary then says so and finished rounds stay on disk.
    """
    started = time.perf_counter()
    progress = progress or LogProgress()
    rounds: list[dict] = []
    spec = dataset_spec(cfg)
    try:
        clients, describe_failures = describe_clients(grid, cfg)
        run_dir.write_partition(sorted((c.stats for c in clients.values()),
                                       key=lambda s: s["partition-id"]))
        central = spec.load(cfg).test if spec.has_central_test else None
        strategy = STRATEGIES.get(cfg.strategy).make_strategy(
            cfg, {n: c.partition_id for n, c in clients.items()})
        trainer = TRAINERS.get(cfg.trainer)(cfg)
        schedule = phase_schedule(cfg, trainer.phases())
        model = trainer.build_model(spec, seed=cfg.seed)
        arrays = ArrayRecord(model.state_dict())
        progress.start(cfg.num_rounds)
        startup = time.perf_counter() - started
        for rnd in range(1, cfg.num_rounds + 1):
            t0 = time.perf_counter()
            phase, config = schedule[rnd - 1]
            record: dict[str, Any] = {"round": rnd, "phase": phase.name}
            failures = list(describe_failures) if rnd == 1 else []
            first_of_phase = rnd == 1 or schedule[rnd - 2][0] is not phase
            if first_of_phase and phase.begin is not None:
                arrays = ArrayRecord(phase.begin(arrays.to_torch_state_dict()))

            messages = list(strategy.configure_train(rnd, arrays, ConfigRecord(config), grid))
            sent = _bytes(arrays) * len(messages)
            replies = list(grid.send_and_receive(messages, timeout=REPLY_TIMEOUT))
            failures += _failures(replies, clients, "train")
            ok = [m for m in replies if not m.has_error()]
            received = sum(_bytes(m.content["arrays"]) for m in ok)
            new_arrays, train_metrics = strategy.aggregate_train(rnd, ok)
            if new_arrays is None:
                reasons = "; ".join(sorted({f["reason"] for f in failures})) or "no replies"
                raise RunFailed(f"round {rnd}: no client returned weights ({reasons})")
            arrays = new_arrays
            record["clients_trained"] = len(ok)
            record["train_loss"] = _clean(train_metrics.get("train-loss")) if train_metrics else None

            last_of_phase = rnd == cfg.num_rounds or schedule[rnd][0] is not phase
            evaluated = rnd % cfg.eval_every == 0 or last_of_phase
            record["evaluated"] = evaluated
            if evaluated:
                messages = list(strategy.configure_evaluate(rnd, arrays, ConfigRecord(config),
                                                            grid))
                sent += _bytes(arrays) * len(messages)
                replies = list(grid.send_and_receive(messages, timeout=REPLY_TIMEOUT))
                failures += _failures(replies, clients, "evaluate")
                strategy.aggregate_evaluate(rnd, [m for m in replies if not m.has_error()])
                rows = client_rows(replies, clients)
                record.update(summarize_round(rows))
                record["centralized_accuracy"] = None
                if central is not None:
                    model.load_state_dict(arrays.to_torch_state_dict())
                    s = score(model, central.inputs(), central.labels())
                    record["centralized_accuracy"] = s.accuracy
                    record["centralized_loss"] = s.loss_sum / s.total
                run_dir.write_clients([{k: _clean(v) for k, v in r.items()} for r in rows])

            record["failures"] = failures
            record["bytes_sent"] = sent
            record["bytes_received"] = received
            record["round_seconds"] = time.perf_counter() - t0
            record["wall_seconds"] = time.perf_counter() - started
            record = {k: _clean(v) for k, v in record.items()}
            rounds.append(record)
            run_dir.append_round(record)
            progress.update(record)
        run_dir.save_model(arrays.to_torch_state_dict())
        summary = build_summary(cfg, rounds, "completed", time.perf_counter() - started)
        summary["startup_seconds"] = startup
        run_dir.write_summary(summary)
        return summary
    except BaseException as exc:
        status = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
        summary = build_summary(cfg, rounds, status, time.perf_counter() - started,
                                error=f"{type(exc).__name__}: {exc}")
        run_dir.write_summary(summary)
        raise
    finally:
        progress.close()


# --- the Flower ServerApp (``flwr run .``) --------------------------------------------------

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Read the run config Flower passes, run the federation, write the run directory."""
    if not log.handlers:  # Flower's own logger shows only its messages
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("fedtl: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    try:
        cfg = make_config(dict(context.run_config), where="Flower run-config")
    except ConfigError as exc:
        log.error("%s", exc)
        raise
    run_dir = RunDirectory.create(cfg)
    log.info("writing %s", run_dir.path.resolve())
    summary = run_federation(grid, cfg, run_dir, LogProgress())
    from fedtl.plots import plot_run

    plot_run(run_dir.path)
    final = summary["final"]
    log.info("done in %.1f s: global accuracy %s, personalized accuracy %s",
             summary["wall_seconds"], final["global_accuracy"], final["personalized_accuracy"])
