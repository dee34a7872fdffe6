"""fedtl's Flower ServerApp: the round loop, evaluation and the run directory.

The loop calls the strategy's four steps (configure_train, aggregate_train,
configure_evaluate, aggregate_evaluate) itself rather than ``Strategy.start`` so that it can
evaluate every ``eval-every`` rounds, record per-client results and failures, show progress,
and write each finished round to disk before the next begins.

A run starts with a ``query.describe`` message to every client: clients report their partition
id (or get one assigned when they hold their own data), split sizes and label counts. The
strategy samples by partition id (reproducible from the seed), and the partition statistics in
the run directory are what the clients really hold. A client that fails or does not reply
within ``client-timeout`` is recorded as a failure and the round goes on without it.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedtl.clients.trainers.base import Phase
from fedtl.config import ConfigError, RunConfig, make_config
from fedtl.data import Split, dataset_spec
from fedtl.evaluation import pooled, spread
from fedtl.registry import STRATEGIES, TRAINERS
from fedtl.results import RoundWriter, RunDirectory
from fedtl.strategies import held_out_partitions

log = logging.getLogger("fedtl")

CONNECT_TIMEOUT = 600.0  # seconds to wait for the SuperNodes of a deployment to connect
DESCRIBE_TIMEOUT = 60.0  # least seconds to wait for the describe replies


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
                       ("centralized_accuracy", "central"), ("probe_accuracy", "probe"),
                       ("knn_accuracy", "knn")):
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
    """The readable part of a client's error reply. Flower wraps the exception text:
    ``<class 'ValueError'>:<'text'>`` from a SuperNode, ``... Message: text`` in simulation,
    where Ray's traceback of the actor may come first and end in the same wrapping (the
    text is after the last one). The two can nest: a class wrapping around Ray's traceback."""
    reason = message.error.reason
    if wrapped := re.fullmatch(r"<class '[^']*'>:<'(.*)'>", reason.strip(), re.DOTALL):
        reason = wrapped.group(1)
    marker = "occurred. Message: "
    if marker in reason:
        reason = reason.rsplit(marker, 1)[1]
    return reason.strip().strip("'>").strip()


def _bytes(arrays: ArrayRecord) -> int:
    return int(arrays.count_bytes())


def pull_interval(outstanding: int) -> float:
    """Seconds between the grid's pulls for replies to ``outstanding`` messages.

    Flower's grids sleep a fixed 0.1 s between pulls, which dominates a round of small
    clients; but a pull costs time proportional to the messages still awaited, and in
    simulation it runs in the process that also pumps the messages to the actors. So poll
    every 2 ms for up to 40 clients, and back off linearly beyond (5 ms for 100, 0.5 s for
    the 10,000-client describe handshake), keeping polling a small share of that process.
    """
    return min(0.5, max(0.002, 5e-5 * outstanding))


def exchange(grid: Grid, messages: Iterable[Message], timeout: float,
             clients: dict[int, ClientInfo], stage: str) -> tuple[list[Message], list[dict]]:
    """Send ``messages``, wait at most ``timeout`` seconds, and sort out what came back.

    Returns the good replies and one failure record per client that replied with an error
    (its own exception, or the SuperLink's "node unavailable" for a SuperNode that stopped
    sending heartbeats) or did not reply in time.
    """
    sent = list(messages)
    if hasattr(grid, "pull_interval"):
        grid.pull_interval = pull_interval(len(sent))
    replies = list(grid.send_and_receive(sent, timeout=timeout))
    # Both grids give each pushed message its id; an error the SuperLink makes on a node's
    # behalf comes from node 0, so replies are matched to the requests they answer.
    destination = {m.metadata.message_id: m.metadata.dst_node_id for m in sent}
    answered: set[int] = set()
    ok, failures = [], []

    def failure(node_id: int, reason: str) -> dict:
        info = clients.get(node_id)
        if info is None:  # not yet known by partition (describe): the node id is all there is
            return {"partition_id": None, "node_id": node_id, "stage": stage, "reason": reason}
        # by partition id only: simulated node ids change between runs, rounds.jsonl must not
        return {"partition_id": info.partition_id, "stage": stage, "reason": reason}

    for m in replies:
        node_id = destination.get(m.metadata.reply_to_message_id, m.metadata.src_node_id)
        answered.add(node_id)
        if m.has_error():
            failures.append(failure(node_id, error_reason(m)))
        else:
            ok.append(m)
    for m in sent:
        if m.metadata.dst_node_id not in answered:
            failures.append(failure(m.metadata.dst_node_id,
                                    f"no reply within client-timeout = {timeout:g} s"))
    return ok, failures


def _describe(grid: Grid, cfg: RunConfig, node_ids: list[int]) -> tuple[list[Message], list[dict]]:
    config = ConfigRecord(dict(cfg))
    messages = [Message(RecordDict({"config": config}), dst_node_id=n,
                        message_type="query.describe") for n in node_ids]
    # The first message to a simulation actor also imports torch and loads the data, which
    # can take tens of seconds on a busy machine: give it at least DESCRIBE_TIMEOUT.
    return exchange(grid, messages, max(cfg.client_timeout, DESCRIBE_TIMEOUT), {}, "describe")


def assign_partition_ids(reported: dict[int, int]) -> dict[int, int]:
    """Partition ids by node id: a node's own (its node config's ``partition-id``), else the
    smallest free ids, given in node-id order (node ids are fixed when keys are registered).
    """
    taken = [p for p in reported.values() if p >= 0]
    if len(set(taken)) != len(taken):
        raise RunFailed("two SuperNodes report the same partition-id; give each its own")
    free = (i for i in range(len(reported) + len(taken)) if i not in taken)
    return {n: (p if p >= 0 else next(free)) for n, p in sorted(reported.items())}


def describe_clients(grid: Grid, cfg: RunConfig) -> tuple[dict[int, ClientInfo], list[dict]]:
    """Ask every connected node for its partition and split sizes; wait for all of them.

    Nodes that reply with an error (e.g. unreadable local data) or not within
    ``client-timeout`` are left out of the run and returned as failures; the run stops only
    when no node can take part. Nodes holding their own data (``data-path``) without a
    ``partition-id`` get one here (``assign_partition_ids``).

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
            replies, refusals = _describe(grid, cfg, node_ids)
            if refusals and not replies:
                raise RunFailed(f"clients refused the run: {refusals[0]['reason']}")
        if now - started > CONNECT_TIMEOUT:
            raise RunFailed(
                f"only {len(node_ids)} of num-clients={cfg.num_clients} SuperNodes connected "
                f"within {CONNECT_TIMEOUT:.0f} s"
            )
        if now > next_note:
            log.info("waiting for SuperNodes: %d of %d connected", len(node_ids), cfg.num_clients)
            next_note = now + 30
        time.sleep(0.5)
    replies, failures = _describe(grid, cfg, node_ids)
    if not replies:
        reasons = "; ".join(sorted({f["reason"] for f in failures})) or "no replies"
        raise RunFailed(f"no client could describe its data: {reasons}")
    stats_by_node = {}
    for m in replies:
        stats = dict(m.content["stats"])
        stats["label-counts"] = [int(c) for c in stats["label-counts"]]
        stats_by_node[m.metadata.src_node_id] = stats
    ids = assign_partition_ids({n: int(s["partition-id"]) for n, s in stats_by_node.items()})
    clients: dict[int, ClientInfo] = {}
    for node_id, stats in stats_by_node.items():
        stats["partition-id"] = ids[node_id]
        clients[node_id] = ClientInfo(node_id, ids[node_id], stats)
    if failures:
        log.warning("%d of %d clients cannot take part: %s", len(failures), len(node_ids),
                    "; ".join(sorted({f["reason"] for f in failures})))
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


UNSEEN_KEYS = (
    "global_accuracy", "personalized_accuracy", "personalized_accuracy_mean",
    "personalized_accuracy_std", "personalized_accuracy_bottom10", "personalization_hurts_share",
)

FINAL_KEYS = (
    "global_accuracy", "global_accuracy_mean", "global_accuracy_std", "global_accuracy_bottom10",
    "personalized_accuracy", "personalized_accuracy_mean", "personalized_accuracy_std",
    "personalized_accuracy_bottom10", "centralized_accuracy", "global_val_accuracy",
    "personalized_val_accuracy", "personalization_hurts_share",
    *(f"unseen_{k}" for k in UNSEEN_KEYS),
)


def summarize_clients(rows: list[dict], held_out: frozenset[int]) -> dict[str, Any]:
    """``summarize_round`` over the participating clients; the held-out (unseen) clients'
    figures beside them as ``unseen_*`` (null when none are held out)."""
    out = summarize_round([r for r in rows if r["partition_id"] not in held_out])
    unseen = [r for r in rows if r["partition_id"] in held_out]
    figures = summarize_round(unseen) if unseen else {}
    out["unseen_clients_evaluated"] = len(unseen)
    out.update({f"unseen_{k}": figures.get(k) for k in UNSEEN_KEYS})
    return out


def without_global(values: dict[str, Any]) -> dict[str, Any]:
    """``values`` with every figure of the global model set to null (no global model)."""
    return {k: None if ("global" in k or k.startswith("centralized") or "hurts" in k) else v
            for k, v in values.items()}


def summary_keys(record: dict) -> list[str]:
    """FINAL_KEYS, then any other accuracy a trainer reported (e.g. ``probe_accuracy``,
    ``knn_global_accuracy``, ``source_test_global_accuracy``)."""
    extra = sorted(k for k in record if k.endswith("_accuracy") and k not in FINAL_KEYS)
    return [*FINAL_KEYS, *extra]


def _add_aliases(figures: dict[str, Any], aliases: dict[str, str]) -> dict[str, Any]:
    for alias, key in aliases.items():
        figures[alias] = figures.get(key)
    return figures


def select_best(rounds: list[dict]) -> dict[str, Any]:
    """Figures at the rounds chosen on VALIDATION accuracy: the global model's figures at the
    round of best global validation accuracy, the personalized model's (keys that name it) at
    the round of best personalized validation accuracy. Ties go to the earlier round. Only
    rounds of the last phase compete (earlier phases of a multi-phase trainer prepare the
    final model)."""
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
    validated = any(r.get(f"{kind}_val_accuracy") is not None
                    for r in evaluated for kind in ("global", "personalized"))
    best: dict[str, Any] = {
        "selected_on": "validation" if validated else "last round (no validation split)",
        "global_round": g["round"], "personalized_round": p["round"]}
    for key in summary_keys(evaluated[-1]):
        source = p if "personaliz" in key else g  # also source_test_personalized_accuracy
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
        "failures": [{"round": r["round"], **f} for r in rounds for f in r.get("failures", [])],
    }


def _clean(value: Any) -> Any:
    """JSON-safe: NaN becomes null."""
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def check_train_reply(message: Message, reference: ArrayRecord, values: bool = True) -> str | None:
    """Why a training reply must be left out of aggregation, or None if it is usable.

    Usable: exactly the global model's keys and shapes, a non-negative ``num-examples`` (0: the
    client had nothing to learn from in this phase) and, when ``values`` is set, finite values
    (that check deserialises every array).
    """
    content = message.content
    if "arrays" not in content or "metrics" not in content:
        return "reply lacks 'arrays' or 'metrics'"
    arrays = content["arrays"]
    if set(arrays.keys()) != set(reference.keys()):
        missing = sorted(set(reference.keys()) - set(arrays.keys()))
        extra = sorted(set(arrays.keys()) - set(reference.keys()))
        return f"weights do not match the model (missing {missing[:3]}, unexpected {extra[:3]})"
    for key, ref in reference.items():
        got = arrays[key]
        if list(got.shape) != list(ref.shape):
            return f"weights '{key}' have shape {list(got.shape)}, expected {list(ref.shape)}"
    n = content["metrics"].get("num-examples")
    if not isinstance(n, int | float) or not n >= 0 or not math.isfinite(n):
        return f"num-examples = {n!r} is not a non-negative number"
    if values:
        for key in reference.keys():
            a = arrays[key].numpy()
            if a.dtype.kind == "f" and not np.isfinite(a).all():
                return f"non-finite weights (NaN/Inf) in '{key}'"
    return None


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


def _finite(arrays: ArrayRecord) -> bool:
    return all(np.isfinite(a).all() for a in (v.numpy() for v in arrays.values())
               if a.dtype.kind == "f")


class Federation:
    """One run: the connected clients, the strategy, and the round loop.

    The trainer's phases (one, ``train``, unless it declares more, e.g. ADDA's ``source`` and
    ``adapt``) split the rounds: each phase's messages carry its config and its name
    (``phase``), its ``begin`` maps the global model before its first round, and its last
    round is always evaluated.
    """

    def __init__(self, grid: Grid, cfg: RunConfig, run_dir: RunDirectory, progress: Progress):
        self.grid, self.cfg, self.run_dir, self.progress = grid, cfg, run_dir, progress
        self.spec = dataset_spec(cfg)
        self.clients, self.describe_failures = describe_clients(grid, cfg)
        self.strategy = STRATEGIES.get(cfg.strategy).make_strategy(
            cfg, {n: c.partition_id for n, c in self.clients.items()})
        self.trainer = TRAINERS.get(cfg.trainer)(cfg)
        self.schedule = phase_schedule(cfg, self.trainer.phases())
        self.model = self.trainer.build_model(self.spec, seed=cfg.seed)
        # The server holds and averages only the parts the trainer shares; the model is
        # completed with the initial values of the others when it is scored centrally.
        self.initial = {k: v.clone() for k, v in self.model.state_dict().items()}
        self.shared = self.trainer.shared_keys(self.model)
        self.algorithm = STRATEGIES.get(cfg.strategy)
        self.held_out = held_out_partitions(cfg)
        test = self.spec.load(cfg).test if self.spec.has_central_test else None
        self.central = None if test is None else Split(test.inputs(), test.labels())

    def initial_arrays(self) -> ArrayRecord:
        """The seeded initial weights of the parts the server aggregates."""
        return ArrayRecord({k: self.initial[k] for k in self.shared})

    def _config(self, rnd: int) -> ConfigRecord:
        config = ConfigRecord(self.schedule[rnd - 1][1])  # the run config, as its phase sets it
        config["state-dir"] = str((self.run_dir.path / "client-state").resolve())
        return config

    def _fail_if_too_few(self, rnd: int, ok: int, failures: list[dict]) -> None:
        if ok < self.cfg.min_clients:
            reasons = "; ".join(sorted({f["reason"] for f in failures})) or "no replies"
            raise RunFailed(f"round {rnd}: {ok} valid training replies, fewer than "
                            f"min-clients={self.cfg.min_clients} ({reasons})")

    def train_round(self, rnd: int, arrays: ArrayRecord) -> tuple[ArrayRecord, dict]:
        """Train the sampled clients and aggregate the usable replies."""
        messages = list(self.strategy.configure_train(rnd, arrays, self._config(rnd), self.grid))
        replies, failures = exchange(self.grid, messages, self.cfg.client_timeout,
                                     self.clients, "train")
        def screen(candidates: list[Message], values: bool) -> list[Message]:
            kept = []
            for m in candidates:
                problem = check_train_reply(m, arrays, values)
                if problem is None:
                    kept.append(m)
                else:
                    info = self.clients.get(m.metadata.src_node_id)
                    failures.append({"partition_id": info.partition_id if info else None,
                                     "stage": "train", "reason": problem})
            return kept

        # Structure first (no deserialisation); a weighted mean with positive weights is
        # finite only if every input is, so values are inspected only when the mean is not.
        usable = screen(replies, values=False)
        self._fail_if_too_few(rnd, len(usable), failures)
        # A client with nothing to learn from in this phase (e.g. a target-only client while
        # ADDA trains on the source) replies with num-examples = 0: valid, but weightless.
        idle = sum(m.content["metrics"]["num-examples"] == 0 for m in usable)
        usable = [m for m in usable if m.content["metrics"]["num-examples"] > 0]

        def aggregate(replies: list[Message]) -> tuple[ArrayRecord | None, Any]:
            return self.strategy.aggregate_train(rnd, replies) if replies else (arrays, None)

        new_arrays, metrics = aggregate(usable)
        if new_arrays is not None and not _finite(new_arrays):
            usable = screen(usable, values=True)
            self._fail_if_too_few(rnd, idle + len(usable), failures)
            new_arrays, metrics = aggregate(usable)
        if new_arrays is None:
            raise RunFailed(f"round {rnd}: aggregation produced no model")
        record = {
            "clients_trained": len(usable),
            **({"clients_idle": idle} if idle else {}),
            "train_loss": _clean(metrics.get("train-loss")) if metrics else None,
            # clip-grad-norm: the share of local steps it clipped (clients weighted as the loss)
            **({"clipped_share": _clean(metrics["clipped-share"])}
               if metrics and "clipped-share" in metrics else {}),
            "failures": failures,
            "bytes_sent": _bytes(arrays) * len(messages),
            "bytes_received": sum(_bytes(m.content["arrays"]) for m in replies
                                  if "arrays" in m.content),
        }
        return new_arrays, record

    def evaluate_round(self, rnd: int, arrays: ArrayRecord) -> dict:
        """Score the global and personalized models on every client, and centrally."""
        messages = list(self.strategy.configure_evaluate(rnd, arrays, self._config(rnd), self.grid))
        replies, failures = exchange(self.grid, messages, self.cfg.client_timeout,
                                     self.clients, "evaluate")
        if messages and not replies:
            reasons = "; ".join(sorted({f["reason"] for f in failures})) or "no replies"
            raise RunFailed(f"round {rnd}: no client could evaluate ({reasons})")
        self.strategy.aggregate_evaluate(rnd, replies)
        rows = client_rows(replies, self.clients)
        if self.held_out:
            rows = [{**r, "unseen": int(r["partition_id"] in self.held_out)} for r in rows]
        record = summarize_clients(rows, self.held_out)
        record["centralized_accuracy"] = None
        if not self.algorithm.has_global_model:
            record = without_global(record)
            rows = [without_global(r) for r in rows]
        else:  # each name s the trainer scores becomes s_accuracy / s_loss (null if unscored)
            self.model.load_state_dict({**self.initial, **arrays.to_torch_state_dict()})
            for name, s in self.trainer.central_scores(self.model, self.central).items():
                record[f"{name}_accuracy"] = s.accuracy if s.total else None
                record[f"{name}_loss"] = s.loss_sum / s.total if s.total else None
        record["failures"] = failures
        record["bytes_sent"] = _bytes(arrays) * len(messages)
        self.run_dir.write_clients([{k: _clean(v) for k, v in r.items()} for r in rows])
        return record

    def run(self, arrays: ArrayRecord, rounds: list[dict], started: float,
            wall_offset: float = 0.0) -> ArrayRecord:
        """Rounds after the last one in ``rounds``; each is checkpointed as it ends.

        ``wall_offset`` is the wall time of earlier attempts of a resumed run (seconds).
        """
        cfg = self.cfg
        first = rounds[-1]["round"] + 1 if rounds else 1
        self.progress.start(cfg.num_rounds)
        writer = RoundWriter(self.run_dir)
        try:
            return self._rounds(arrays, rounds, started, wall_offset, first, writer)
        finally:
            writer.close()  # the last round is on disk before anything else is written

    def _rounds(self, arrays: ArrayRecord, rounds: list[dict], started: float,
                wall_offset: float, first: int, writer: RoundWriter) -> ArrayRecord:
        cfg = self.cfg
        for rnd in range(first, cfg.num_rounds + 1):
            t0 = time.perf_counter()
            phase = self.schedule[rnd - 1][0]
            if phase.begin is not None and (rnd == 1 or self.schedule[rnd - 2][0] is not phase):
                arrays = ArrayRecord(phase.begin(arrays.to_torch_state_dict()))
            arrays, train = self.train_round(rnd, arrays)
            record: dict[str, Any] = {"round": rnd, "phase": phase.name,
                                      "clients_trained": train["clients_trained"],
                                      "train_loss": train["train_loss"]}
            for key in ("clients_idle", "clipped_share"):
                if key in train:
                    record[key] = train[key]
            failures = (list(self.describe_failures) if rnd == first else []) + train["failures"]
            sent, received = train["bytes_sent"], train["bytes_received"]
            last_of_phase = rnd == cfg.num_rounds or self.schedule[rnd][0] is not phase
            record["evaluated"] = rnd % cfg.eval_every == 0 or last_of_phase
            if record["evaluated"]:
                evaluation = self.evaluate_round(rnd, arrays)
                failures += evaluation.pop("failures")
                sent += evaluation.pop("bytes_sent")
                record.update(evaluation)
            record["failures"] = failures
            record["bytes_sent"] = sent
            record["bytes_received"] = received
            record = {k: _clean(v) for k, v in record.items()}
            rounds.append(record)
            wall = wall_offset + time.perf_counter() - started
            timing = {"round": rnd, "round_seconds": time.perf_counter() - t0,
                      "wall_seconds": wall, "time": time.time()}
            writer.write(record, timing, arrays.to_torch_state_dict(), rounds, dict(cfg), wall)
            self.progress.update(record)
        return arrays


def run_federation(grid: Grid, cfg: RunConfig, run_dir: RunDirectory,
                   progress: Progress | None = None, resume: bool = False) -> dict[str, Any]:
    """Run ``num-rounds`` rounds of ``cfg``'s algorithm on the nodes of ``grid``.

    Writes the run directory as it goes (a checkpoint after every round) and returns the
    summary. With ``resume``, continues from the directory's last checkpoint. Raises RunFailed
    when the federation cannot continue; the summary then says so and finished rounds stay.
    """
    started = time.perf_counter()
    progress = progress or LogProgress()
    rounds: list[dict] = []
    previous_wall = 0.0
    try:
        if resume:
            checkpoint = run_dir.load_checkpoint(dict(cfg))
            rounds = checkpoint["rounds"]
            run_dir.rewrite_rounds(rounds)
            previous_wall = float(checkpoint.get("wall_seconds", 0.0))
        federation = Federation(grid, cfg, run_dir, progress)
        if not resume:
            run_dir.write_partition(sorted((c.stats for c in federation.clients.values()),
                                           key=lambda s: s["partition-id"]))
        if resume:
            arrays = ArrayRecord(checkpoint["arrays"])
        else:
            arrays = federation.initial_arrays()
        startup = time.perf_counter() - started
        arrays = federation.run(arrays, rounds, started, previous_wall)
        run_dir.save_model(arrays.to_torch_state_dict())
        summary = build_summary(cfg, rounds, "completed",
                                previous_wall + time.perf_counter() - started)
        summary["startup_seconds"] = startup
        run_dir.write_summary(summary)
        return summary
    except BaseException as exc:
        status = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
        summary = build_summary(cfg, rounds, status,
                                previous_wall + time.perf_counter() - started,
                                error=f"{type(exc).__name__}: {exc}")
        try:
            run_dir.write_summary(summary)
        except OSError:
            pass  # e.g. a full disk: the checkpoint and rounds.jsonl already hold the rounds
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
