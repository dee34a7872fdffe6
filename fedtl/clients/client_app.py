"""fedtl's Flower ClientApp: the same code in simulation (Ray) and on real SuperNodes.

Every message carries the run configuration in its ConfigRecord, so a client needs nothing
but its node config: ``data-path`` (its own data, on real machines; see fedtl.data.local)
or ``partition-id`` / ``num-partitions`` (a simulated partition, also for demos). Datasets,
partitions and models are built once per process and reused across the clients and rounds an
actor serves; a client's persistent state (pFedMe's theta_i, the model parts its trainer does
not share) is kept on its own disk, versioned by round (``fedtl.clients.state``; node config
``state-dir`` on real machines).

Messages handled:
- ``query.describe``: the client's split sizes and label counts (never its samples);
- ``train``: the update rule from the received global weights; replies with weights;
- ``evaluate``: the global and the personalized model on the client's validation and test
  splits; replies with counts so the server can pool them.
"""

from __future__ import annotations

import functools
import time
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedtl.clients.state import ClientStateStore
from fedtl.clients.trainers.base import Trainer
from fedtl.clients.update_rule import ClientState, UpdateRule
from fedtl.config import RunConfig, make_config
from fedtl.data import ClientData, dataset_spec, federated_data
from fedtl.data.local import client_stats, local_client_data
from fedtl.registry import DATASETS, STRATEGIES, TRAINERS

# Keys the server adds to the run config in a message (not config keys themselves).
MESSAGE_KEYS = ("server-round", "state-dir", "phase")
# Client-state entry: the model parts a client keeps (not aggregated: Trainer.shared_keys;
# or aggregated from the values the server sent: Trainer.local_prefixes)
LOCAL_PARTS = "local-parts"

app = ClientApp()

_models: dict[tuple, tuple[torch.nn.Module, torch.nn.Module, dict[str, torch.Tensor]]] = {}
_threads_set = False


def run_config(message: Message) -> RunConfig:
    """The run configuration a message carries (validated once per process per config)."""
    items = tuple(sorted((k, v) for k, v in message.content["config"].items()
                         if k not in MESSAGE_KEYS))
    return _parse_config(items)


@functools.lru_cache(maxsize=8)
def _parse_config(items: tuple) -> RunConfig:
    return make_config(dict(items), where="message from the server")


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


def _data_path(context: Context) -> str | None:
    """The node's own data (node config ``data-path``), or None for a simulated partition."""
    path = context.node_config.get("data-path")
    return None if path in (None, "") else str(path)


def _partition(context: Context, cfg: RunConfig) -> int:
    """This node's partition id, checked against the run's number of clients."""
    node = context.node_config
    if "partition-id" not in node:
        raise ValueError(
            "this SuperNode has neither 'data-path' nor 'partition-id' in its node config; "
            "start it with --node-config 'data-path=\"/path/to/data\"' (its own data) or "
            "--node-config \"partition-id=N num-partitions=M\" (a demo partition)"
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
    """The node's own data (``data-path``) or its simulated partition."""
    path = _data_path(context)
    if path is not None:
        if cfg.target_dataset:
            raise ValueError("domain adaptation (target-dataset) runs on simulated partitions; "
                             "a SuperNode's own data (data-path) holds one domain only")
        pid = int(context.node_config.get("partition-id", -1))
        return local_client_data(path, cfg, pid)
    return federated_data(cfg).client(_partition(context, cfg))


def _client_key(context: Context, data: ClientData) -> int:
    """What seeds this client's batches: its partition id, else its node id (stable once
    the SuperNode's key is registered)."""
    return data.partition_id if data.partition_id >= 0 else int(context.node_id)


def _models_for(cfg: RunConfig, trainer: Trainer, device: torch.device
                ) -> tuple[torch.nn.Module, torch.nn.Module, dict[str, torch.Tensor]]:
    """A working model, a scratch copy and the run's initial weights (seeded as the server's)
    of the parts the server does not aggregate (none for most trainers), built once per
    process and run configuration (a trainer's extra parts, e.g. a projector or a domain head,
    depend on more keys than the model's)."""
    key = (tuple(sorted(cfg.items())), str(device))
    if key not in _models:
        spec = dataset_spec(cfg)
        model, scratch = trainer.build_model(spec).to(device), trainer.build_model(spec).to(device)
        local = set(model.state_dict()) - set(trainer.shared_keys(model))
        initial = ({k: v for k, v in trainer.build_model(spec, seed=cfg.seed).state_dict().items()
                    if k in local} if local else {})
        _models[key] = (model, scratch, initial)
    return _models[key]


def _receive(model: torch.nn.Module, msg: Message, state: ClientState,
             initial: dict[str, torch.Tensor]) -> None:
    """Load the global weights; parts the server does not share (the keys of ``initial``)
    come from this client's state, or from ``initial`` before its first training round."""
    weights = msg.content["arrays"].to_torch_state_dict()
    local = state.get(LOCAL_PARTS, {})
    for key in initial.keys() - weights.keys():
        weights[key] = local.get(key, initial[key])
    model.load_state_dict(weights)


def _shared_weights(model: torch.nn.Module, trainer: Trainer,
                    state: ClientState) -> dict[str, torch.Tensor]:
    """The parts of ``model`` the server aggregates; the others go into ``state``."""
    weights = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    shared = set(trainer.shared_keys(model))
    local = {k: v.clone() for k, v in weights.items() if k not in shared}
    if local:
        state[LOCAL_PARTS] = local
    return {k: v for k, v in weights.items() if k in shared}


def _all_finite(obj: object) -> bool:
    """Whether every floating-point tensor in ``obj`` (a tensor, or nested dicts of them, as
    a state dict or a client state) is finite."""
    if isinstance(obj, torch.Tensor):
        return not obj.is_floating_point() or bool(torch.isfinite(obj).all())
    if isinstance(obj, dict):
        return all(_all_finite(v) for v in obj.values())
    return True


def _commit(store: ClientStateStore, server_round: int, state: ClientState,
            model: torch.nn.Module) -> bool:
    """Save this round's client state unless training diverged (a non-finite weight in the
    model or the state). The client then replies with an error (a failure of that round);
    not saving the state lets the client's next round start again from its last finite state
    (its own domain head, projector or theta_i) instead of failing in every later round.
    Returns whether it saved."""
    if not (_all_finite(model.state_dict()) and _all_finite(state)):
        return False
    store.save(server_round, state)
    return True


def state_after_evaluation(loaded: ClientState, state: ClientState, trainer: Trainer
                           ) -> ClientState | None:
    """What an evaluation leaves in the client's state: the state it loaded plus the new
    entries the trainer keeps (e.g. a transfer set made by a client evaluated before it
    trained), if they are finite; None when there is nothing new to save."""
    new = {k: v for k, v in state.items()
           if k not in loaded and trainer.keeps_after_evaluation(k)}
    if not new or not _all_finite(new):
        return None
    return {**loaded, **new}


def _generator(cfg: RunConfig, server_round: int, client: int, purpose: int) -> torch.Generator:
    """A generator seeded by (seed, round, client, purpose): batches are reproducible."""
    seed = np.random.SeedSequence([cfg.seed, server_round, client, purpose])
    return torch.Generator().manual_seed(int(seed.generate_state(1, np.uint64)[0] >> 1))


def _trainer(cfg: RunConfig, msg: Message) -> Trainer:
    """The run's trainer, told which round and phase ``msg`` belongs to."""
    trainer = TRAINERS.get(cfg.trainer)(cfg)
    config = msg.content["config"]
    trainer.begin(int(config["server-round"]), str(config.get("phase", "")))
    return trainer


def _load_local_prefixes(model: torch.nn.Module, trainer: Trainer, state: ClientState) -> None:
    """Over the received global weights, load the parts (``local_prefixes``) this client keeps
    for itself, e.g. DANN's per-client domain head."""
    if trainer.local_prefixes() and LOCAL_PARTS in state:
        model.load_state_dict(state[LOCAL_PARTS], strict=False)


def _update_rule(cfg: RunConfig, trainer: Trainer, device: torch.device) -> UpdateRule:
    return STRATEGIES.get(cfg.strategy).client_rule()(cfg, trainer, device)


def _state_store(msg: Message, context: Context, partition_id: int) -> ClientStateStore:
    """Where this client keeps its state: node config ``state-dir`` if set; else the folder
    the server names when its run directory is on this machine (simulation); else
    ``~/.cache/fedtl/client-state/<run name>``."""
    root = context.node_config.get("state-dir")
    suggested = msg.content["config"].get("state-dir")
    if not root and suggested and Path(str(suggested)).parent.is_dir():
        root = suggested
    if not root:
        run_name = Path(str(suggested or "fedtl-run")).parent.name or "fedtl-run"
        root = Path.home() / ".cache" / "fedtl" / "client-state" / run_name
    return ClientStateStore(str(root), partition_id)


def _seed_everything(cfg: RunConfig, server_round: int, partition_id: int, purpose: int) -> None:
    """Seed torch's global RNG too (augmentations, dropout), whichever actor runs the call."""
    torch.manual_seed(int(_generator(cfg, server_round, partition_id, purpose + 100).initial_seed()))


def injected_fault(cfg: RunConfig, server_round: int, partition_id: int) -> str | None:
    """The fault this client injects in this round (``fault-rate``), drawn from the seed."""
    if cfg.fault_rate <= 0:
        return None
    rng = np.random.default_rng([cfg.seed, server_round, partition_id, 0xFA17])
    if rng.random() >= cfg.fault_rate:
        return None
    kinds = [k.strip() for k in cfg.fault_kinds.split(",") if k.strip()]
    return str(rng.choice(kinds))


def _corrupt(arrays: dict[str, torch.Tensor], kind: str) -> dict[str, torch.Tensor]:
    """Damage a reply's weights as a faulty client would."""
    name = next(k for k, v in arrays.items() if v.is_floating_point() and v.numel() > 1)
    out = dict(arrays)
    if kind == "nan":
        out[name] = torch.full_like(arrays[name], float("nan"))
    elif kind == "inf":
        out[name] = arrays[name].clone()
        out[name].view(-1)[0] = float("inf")
    elif kind == "shape":
        out[name] = arrays[name].reshape(-1)[:-1].clone()
    return out


@app.query("describe")
def describe(msg: Message, context: Context) -> Message:
    """Report split sizes and label counts (never samples)."""
    cfg = run_config(msg)
    if _data_path(context) is not None:
        stats = client_stats(_local_data(context, cfg), DATASETS.get(cfg.dataset).num_classes)
        num_partitions = cfg.num_clients
    else:
        fed = federated_data(cfg)
        stats = fed.stats_of(_partition(context, cfg))
        num_partitions = fed.num_clients
    # num-train / num-val / num-test / label-counts, and whatever else the data reports
    # (a domain-adaptation client adds its target splits' sizes and labels)
    record = MetricRecord({**stats, "num-partitions": num_partitions})
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
    model, _, initial = _models_for(cfg, trainer, device)
    server_round = trainer.server_round
    pid = _client_key(context, data)  # seeds, faults and state: partition id, else node id
    fault = injected_fault(cfg, server_round, pid)
    if fault == "raise":
        raise RuntimeError(f"injected fault (fault-rate={cfg.fault_rate}): client {pid} crashed")
    if fault == "timeout":  # a hung client: its late reply is dropped, and it learns nothing
        time.sleep(cfg.client_timeout + 1.0)
        raise RuntimeError(f"injected fault (fault-rate={cfg.fault_rate}): client {pid} hung "
                           f"past client-timeout = {cfg.client_timeout} s")
    store = _state_store(msg, context, pid)
    state = store.load(before_round=server_round)
    _receive(model, msg, state, initial)
    _load_local_prefixes(model, trainer, state)
    trainer.use_state(state, pid)  # a trainer's own state (a transfer set) is saved with it
    _seed_everything(cfg, server_round, pid, 0)
    rule = _update_rule(cfg, trainer, device)
    metrics = {**rule.train(model, data, _generator(cfg, server_round, pid, 0), state),
               **rule.clip_metrics()}
    weights = _shared_weights(model, trainer, state)
    if prefixes := trainer.local_prefixes():
        # keep this client's own parts; the server gets back the values it sent
        state[LOCAL_PARTS] = {k: v.clone() for k, v in weights.items() if k.startswith(prefixes)}
        received = msg.content["arrays"]
        weights.update({k: torch.from_numpy(received[k].numpy()) for k in weights
                        if k.startswith(prefixes)})
    if not _commit(store, server_round, state, model):
        # a failure of this round whatever the reply would carry (a local-only client or a
        # client's own parts send back finite weights they did not train)
        raise RuntimeError(f"client {pid}: training diverged in round {server_round} "
                           "(non-finite weights or client state); it keeps its last finite "
                           "state")
    if fault in ("nan", "inf", "shape"):
        weights = _corrupt(weights, fault)
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
    model, scratch, initial = _models_for(cfg, trainer, device)
    server_round = trainer.server_round
    pid = _client_key(context, data)  # seeds, faults and state: partition id, else node id
    store = _state_store(msg, context, pid)
    loaded = store.load(before_round=server_round + 1)
    state = dict(loaded)  # what evaluation writes must not reach `loaded` unchecked
    trainer.use_state(state, pid)
    _receive(model, msg, state, initial)
    _load_local_prefixes(model, trainer, state)
    _seed_everything(cfg, server_round, pid, 1)
    rule = _update_rule(cfg, trainer, device)
    personal = rule.personalized(model, scratch, data, _generator(cfg, server_round, pid, 1),
                                 state)
    if (kept := state_after_evaluation(loaded, state, trainer)) is not None:
        store.save(server_round, kept)
    values: dict[str, int | float] = {"num-examples": len(data.test)}
    for kind, m in (("global", model), ("personalized", personal)):
        for name, s in trainer.evaluate(m, data, device).items():
            values[f"{name}-correct-{kind}"] = s.correct
            values[f"{name}-loss-{kind}"] = s.loss_sum
            values[f"{name}-total"] = s.total
    return Message(RecordDict({"metrics": MetricRecord(values)}), reply_to=msg)
