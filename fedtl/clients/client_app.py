"""fedtl's Flower ClientApp: the same code in simulation (Ray) and on real SuperNodes.

Every message carries the run configuration in its ConfigRecord, so a client needs nothing
but its node config (``partition-id`` / ``num-partitions``). Datasets, partitions and models
are built once per process and reused across the clients and rounds an actor serves; a
client's persistent state (pFedMe's theta_i) lives in Flower's ``Context.state``.

Messages handled:
- ``query.describe``: the client's split sizes and label counts (never its samples);
- ``train``: the update rule from the received global weights; replies with weights;
- ``evaluate``: the global and the personalized model on the client's validation and test
  splits; replies with counts so the server can pool them.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedtl.clients.trainers.base import Trainer
from fedtl.clients.update_rule import ClientState, UpdateRule
from fedtl.config import RunConfig, make_config
from fedtl.data import ClientData, dataset_spec, federated_data
from fedtl.registry import STRATEGIES, TRAINERS

# Keys the server adds to the run config in a message (not config keys themselves).
MESSAGE_KEYS = ("server-round", "phase")
LOCAL_PARTS = "local-parts"  # Context.state entry: the state-dict parts a client keeps

app = ClientApp()

_models: dict[tuple, tuple[torch.nn.Module, torch.nn.Module]] = {}
_threads_set = False


def run_config(message: Message) -> RunConfig:
    """The run configuration a message carries."""
    return make_config(dict(message.content["config"]), where="message from the server",
                       ignore_unknown=MESSAGE_KEYS)


def _setup_threads(cfg: RunConfig) -> None:
    """Match torch's intra-op threads to the CPUs this client was given (once per process)."""
    global _threads_set
    if not _threads_set:
        torch.set_num_threads(max(1, int(cfg.client_num_cpus)))
        _threads_set = True


def _device(cfg: RunConfig) -> torch.device:
    if cfg.device == "auto":
        use_gpu = cfg.client_num_gpus > 0 and torch.cuda.is_available()
        return torch.device("cuda" if use_gpu else "cpu")
    return torch.device(cfg.device)


def _partition(context: Context, cfg: RunConfig) -> int:
    """This node's partition id, checked against the run's number of clients."""
    node = context.node_config
    if "partition-id" not in node:
        raise ValueError(
            "this SuperNode has no 'partition-id' in its node config; start it with "
            "--node-config \"partition-id=N num-partitions=M\""
        )
    pid = int(node["partition-id"])
    num = int(node.get("num-partitions", cfg.num_clients))
    if num != cfg.num_clients:
        raise ValueError(
            f"the federation has {num} SuperNodes (num-partitions) but the run config has "
            f"num-clients={cfg.num_clients}; make them equal, e.g. flwr run . --run-config "
            f"\"num-clients={num}\" or --federation-config \"num-supernodes={cfg.num_clients}\""
        )
    return pid


def _local_data(context: Context, cfg: RunConfig) -> ClientData:
    return federated_data(cfg).client(_partition(context, cfg))


def _models_for(cfg: RunConfig, trainer: Trainer, device: torch.device
                ) -> tuple[torch.nn.Module, torch.nn.Module]:
    """A working model and a scratch copy for this architecture, built once per process."""
    key = (cfg.trainer, cfg.model, cfg.dataset, cfg.target_dataset, str(device))
    if key not in _models:
        spec = dataset_spec(cfg)
        _models[key] = (trainer.build_model(spec).to(device), trainer.build_model(spec).to(device))
    return _models[key]


def _generator(cfg: RunConfig, server_round: int, partition_id: int, purpose: int) -> torch.Generator:
    """A generator seeded by (seed, round, client, purpose): batches are reproducible."""
    seed = np.random.SeedSequence([cfg.seed, server_round, partition_id, purpose])
    return torch.Generator().manual_seed(int(seed.generate_state(1, np.uint64)[0] >> 1))


def _trainer(cfg: RunConfig, msg: Message) -> Trainer:
    """The run's trainer, told which round and phase ``msg`` belongs to."""
    trainer = TRAINERS.get(cfg.trainer)(cfg)
    config = msg.content["config"]
    trainer.begin(int(config["server-round"]), str(config.get("phase", "")))
    return trainer


def _load_global(model: torch.nn.Module, msg: Message, trainer: Trainer, context: Context
                 ) -> None:
    """Load the received global weights, then the parts this client keeps for itself."""
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    if trainer.local_prefixes() and LOCAL_PARTS in context.state.array_records:
        model.load_state_dict(context.state[LOCAL_PARTS].to_torch_state_dict(), strict=False)


def _update_rule(cfg: RunConfig, trainer: Trainer, device: torch.device) -> UpdateRule:
    return STRATEGIES.get(cfg.strategy).client_rule()(cfg, trainer, device)


def _load_state(context: Context) -> ClientState:
    return {name: record.to_torch_state_dict()
            for name, record in context.state.array_records.items()}


def _save_state(context: Context, state: ClientState) -> None:
    for name, tensors in state.items():
        context.state[name] = ArrayRecord(tensors)


@app.query("describe")
def describe(msg: Message, context: Context) -> Message:
    """Report split sizes and label counts (never samples)."""
    cfg = run_config(msg)
    fed = federated_data(cfg)
    pid = _partition(context, cfg)
    stats = fed.client_stats()[pid]
    # num-train / num-val / num-test / label-counts, and whatever else the data reports
    # (a domain-adaptation client adds its target splits' sizes and labels)
    record = MetricRecord({**stats, "partition-id": pid, "num-partitions": fed.num_clients})
    return Message(RecordDict({"stats": record}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Run the update rule from the received global weights; reply with the new weights."""
    started = time.perf_counter()
    cfg = run_config(msg)
    _setup_threads(cfg)
    device = _device(cfg)
    data = _local_data(context, cfg)
    trainer = _trainer(cfg, msg)
    model, _ = _models_for(cfg, trainer, device)
    _load_global(model, msg, trainer, context)
    state = _load_state(context)
    server_round = trainer.server_round
    rule = _update_rule(cfg, trainer, device)
    metrics = rule.train(model, data, _generator(cfg, server_round, data.partition_id, 0), state)
    _save_state(context, state)
    weights = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if prefixes := trainer.local_prefixes():
        # keep this client's own parts; the server gets back the values it sent
        context.state[LOCAL_PARTS] = ArrayRecord(
            {k: v.clone() for k, v in weights.items() if k.startswith(prefixes)})
        received = msg.content["arrays"]
        weights.update({k: torch.from_numpy(received[k].numpy()) for k in weights
                        if k.startswith(prefixes)})
    reply = RecordDict({
        "arrays": ArrayRecord(weights),
        "metrics": MetricRecord({
            "num-examples": trainer.num_examples(data),
            **metrics,
            "train-seconds": time.perf_counter() - started,
        }),
    })
    return Message(reply, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Score the global and the personalized model on the validation and test splits."""
    cfg = run_config(msg)
    _setup_threads(cfg)
    device = _device(cfg)
    data = _local_data(context, cfg)
    trainer = _trainer(cfg, msg)
    model, scratch = _models_for(cfg, trainer, device)
    _load_global(model, msg, trainer, context)
    server_round = trainer.server_round
    rule = _update_rule(cfg, trainer, device)
    personal = rule.personalized(model, scratch, data,
                                 _generator(cfg, server_round, data.partition_id, 1),
                                 _load_state(context))
    values: dict[str, int | float] = {"num-examples": len(data.test)}
    for kind, m in (("global", model), ("personalized", personal)):
        for name, s in trainer.evaluate(m, data, device).items():
            values[f"{name}-correct-{kind}"] = s.correct
            values[f"{name}-loss-{kind}"] = s.loss_sum
            values[f"{name}-total"] = s.total
    return Message(RecordDict({"metrics": MetricRecord(values)}), reply_to=msg)
