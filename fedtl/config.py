"""Run configuration: every key fedtl accepts, its default, its type and its check.

One table (``KEYS``) is the single source of truth for the CLI's ``--set``, the TOML
run-config files in ``simulations/``, and Flower's ``[tool.flwr.app.config]``. Keys are
kebab-case everywhere. A ``RunConfig`` is immutable once validated; attribute access
uses snake_case (``cfg.num_clients`` reads ``num-clients``).
"""

from __future__ import annotations

import difflib
import math
import tomllib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Value = bool | int | float | str


class ConfigError(ValueError):
    """A run configuration that cannot work; the message names key, value and what is accepted."""


# Models built with an optional batch-norm layer before every hidden ReLU (``batch-norm``).
BATCH_NORM_MODELS = ("cnn", "lenet5", "lenet5-half", "dann-mnist")


@dataclass(frozen=True)
class Key:
    """One configuration key: its default fixes its type."""

    name: str
    default: Value
    help: str
    group: str
    check: Callable[[Any], str | None] | None = None
    registry: str | None = None  # name of the registry whose names this key accepts

    @property
    def type(self) -> type:
        return type(self.default)


def _positive(v: float) -> str | None:
    return None if v > 0 else "must be > 0"


def _non_negative(v: float) -> str | None:
    return None if v >= 0 else "must be >= 0"


def _fraction(v: float) -> str | None:
    return None if 0 < v <= 1 else "must be a fraction in (0, 1]"


def _split_fraction(v: float) -> str | None:
    return None if 0 <= v < 1 else "must be a fraction in [0, 1)"


def _at_least(lo: int) -> Callable[[int], str | None]:
    return lambda v: None if v >= lo else f"must be >= {lo}"


def _beta(v: float) -> str | None:
    return None if 0 < v <= 3 else "must be in (0, 3] (1 = plain averaging; the paper tunes up to 2)"


def _gpus(v: float) -> str | None:
    return None if 0 <= v <= 1 else "must be in [0, 1] (a fraction of one GPU per client)"


def _one_of(*accepted: str) -> Callable[[str], str | None]:
    return lambda v: None if v in accepted else "must be one of " + ", ".join(map(repr, accepted))


def _target_dataset(v: str) -> str | None:
    if v == "":
        return None
    from fedtl.registry import DATASETS  # registry imports no config state

    if v in DATASETS:
        return None
    images = [name for name in DATASETS if DATASETS.get(name).is_image]
    return f"unknown dataset. Accepted: '' (no target domain), {', '.join(images)}"


def _open_fraction(v: float) -> str | None:
    return None if 0 < v < 1 else "must be a fraction in (0, 1)"


FAULT_KINDS = ("raise", "nan", "inf", "shape", "timeout")


def _fault_kinds(v: str) -> str | None:
    kinds = [k.strip() for k in v.split(",") if k.strip()]
    bad = [k for k in kinds if k not in FAULT_KINDS]
    if not kinds or bad:
        return f"must be a comma-separated list of {', '.join(FAULT_KINDS)}"
    return None


def _device(v: str) -> str | None:
    ok = v in ("auto", "cpu") or v == "cuda" or v.startswith("cuda:")
    return None if ok else "must be 'auto', 'cpu', 'cuda' or 'cuda:N'"


def _hidden(v: str) -> str | None:
    from fedtl.models import parse_hidden

    try:
        parse_hidden(v)
    except ValueError as exc:
        return f"{exc} (e.g. '800,800')"
    return None


def _unit(v: float) -> str | None:
    return None if 0 <= v <= 1 else "must be in [0, 1]"


_KEYS: list[Key] = [
    # --- what is run ---------------------------------------------------------------------
    Key("strategy", "fedavg", "federated algorithm (server strategy + client update rule)",
        "method", registry="strategy"),
    Key("trainer", "supervised", "client-side local objective", "method", registry="trainer"),
    Key("model", "cnn", "model architecture, sized from the dataset", "method", registry="model"),
    Key("dataset", "digits", "dataset (the source domain for transfer trainers)", "data",
        registry="dataset"),
    Key("data-dir", "data", "folder holding the dataset's files in torchvision's layout", "data"),
    Key("partitioner", "dirichlet", "how the data is split across clients", "data",
        registry="partitioner"),
    Key("alpha", 0.5, "Dirichlet concentration (dirichlet: labels; quantity-skew: sizes)", "data",
        _positive),
    Key("labels-per-client", 2, "pathological: exact number of labels on each client", "data",
        _at_least(1)),
    Key("shards-per-client", 2, "shard: number of label-sorted shards per client", "data",
        _at_least(1)),
    Key("min-partition-size", 10, "dirichlet / quantity-skew: fewest samples a client may get",
        "data", _at_least(1)),
    Key("val-fraction", 0.15, "share of each client's data held out for validation", "data",
        _split_fraction),
    Key("test-fraction", 0.25, "share of each client's data held out for testing", "data",
        _split_fraction),
    Key("label-fraction", 1.0, "share of each client's train split whose labels it keeps for "
        "training (drawn from seed)", "data", _fraction),
    Key("synthetic-alpha", 0.5, "synthetic: alpha of Synthetic(alpha, beta) (model heterogeneity)",
        "data", _non_negative),
    Key("synthetic-beta", 0.5, "synthetic: beta of Synthetic(alpha, beta) (feature heterogeneity)",
        "data", _non_negative),
    Key("synthetic-min-samples", 50, "synthetic: samples added to each client's log-normal size",
        "data", _at_least(5)),
    # --- federation ----------------------------------------------------------------------
    Key("num-clients", 10, "number of clients (SuperNodes)", "federation", _at_least(1)),
    Key("fraction-train", 1.0, "fraction of clients sampled for training each round",
        "federation", _fraction),
    Key("num-rounds", 20, "federated rounds", "federation", _at_least(1)),
    Key("local-steps", 20, "mini-batch steps per client per round (pFedMe: R)", "federation",
        _at_least(1)),
    Key("batch-size", 32, "mini-batch size", "federation", _at_least(1)),
    Key("lr", 0.05, "client learning rate (pFedMe: eta, the local w-update rate)", "federation",
        _positive),
    Key("optimizer", "sgd", "client optimizer of local training and fine-tuning steps (sgd: "
        "momentum, weight-decay; adam: beta1 = momentum, beta2 = 0.999, weight-decay)",
        "federation", _one_of("sgd", "adam")),
    Key("momentum", 0.0, "client SGD momentum (FedAvg local SGD and fine-tuning); Adam's beta1 "
        "with optimizer = adam", "federation",
        lambda v: None if 0 <= v < 1 else "must be in [0, 1)"),
    Key("weight-decay", 0.0, "client L2 weight decay", "federation", _non_negative),
    Key("clip-grad-norm", 0.0, "clip the gradient of each local step (local SGD, fine-tuning, "
        "Ditto's personal steps, pFedMe's inner steps) to this L2 norm; 0 = no clipping",
        "federation", _non_negative),
    Key("seed", 0, "seed for partitions, splits, sampling, initialisation and batches",
        "federation", _at_least(0)),
    # --- pFedMe --------------------------------------------------------------------------
    Key("beta", 1.0, "pFedMe: server mixing w <- (1-beta) w + beta mean(w_i)", "pfedme", _beta),
    Key("pfedme-lambda", 15.0, "pFedMe: Moreau-envelope regularisation lambda", "pfedme",
        _positive),
    Key("personal-lr", 0.02, "pFedMe: inner-solver learning rate for theta (p_lr)", "pfedme",
        _positive),
    Key("inner-steps", 5, "pFedMe: inner-solver steps K per mini-batch", "pfedme", _at_least(1)),
    # --- self-supervised trainers ---------------------------------------------------------
    Key("ssl-shared", "encoder+projector", "self-supervised: parts the server averages (the "
        "rest stay on each client)", "self-supervised", _one_of("encoder+projector", "encoder")),
    Key("embedding-dim", 128, "instance-spreading: dimension of the L2-normalised embedding",
        "self-supervised", _at_least(2)),
    Key("temperature", 0.1, "instance-spreading: softmax temperature tau", "self-supervised",
        _positive),
    Key("spreading-loss", "paper", "instance-spreading: the paper's J (augmented copies as "
        "anchors over the batch's instances) or the official code's symmetric form (both views "
        "as anchors over the other 2N-1)", "self-supervised", _one_of("paper", "symmetric")),
    Key("projector-dim", 512, "barlow-twins: width of the projector's two layers",
        "self-supervised", _at_least(2)),
    Key("barlow-lambda", 0.005, "barlow-twins: weight lambda of the off-diagonal terms",
        "self-supervised", _non_negative),
    # --- knowledge distillation ----------------------------------------------------------
    Key("mlp-hidden", "800,800", "mlp: hidden-layer widths, comma-separated", "method",
        _hidden),
    Key("batch-norm", False, "cnn / lenet5 / lenet5-half / dann-mnist: a batch-norm layer "
        "before every hidden ReLU", "method"),
    Key("teacher-checkpoint", "", "distillation: the teacher's weights: a fedtl run directory, "
        "its model.pt, or a torch state-dict file", "distillation"),
    Key("teacher-model", "", "distillation: the teacher's architecture: a model name, "
        "'NAME:bn' (with batch norm), 'mlp:W1,W2', or 'torchvision:NAME' (empty: the model in "
        "the teacher run's config.toml)", "distillation"),
    Key("kd-temperature", 4.0, "distillation: softmax temperature T of the soft term",
        "distillation", _positive),
    Key("kd-alpha", 0.1, "kd: weight of the hard-label cross-entropy (the soft term gets "
        "1 - kd-alpha)", "distillation", _unit),
    Key("distill-augment", True, "data-free students: random shift / rotation / scale of "
        "each transfer batch", "distillation"),
    Key("synthesis-lr", 0.1, "class-impressions, zskd: Adam learning rate on the "
        "synthetic images (normalised input units)", "distillation", _positive),
    Key("ci-samples", 1200, "class-impressions: synthetic images per client",
        "distillation", _at_least(1)),
    Key("ci-steps", 50, "class-impressions: optimisation steps per image", "distillation",
        _at_least(1)),
    Key("zskd-samples", 1200, "zskd: data impressions per client", "distillation",
        _at_least(1)),
    Key("zskd-steps", 50, "zskd: optimisation steps per data impression", "distillation",
        _at_least(1)),
    Key("dafl-batch-size", 64, "dafl: generated samples per generator / student step",
        "distillation", _at_least(2)),
    Key("dafl-warmup-steps", 0, "dafl: generator-only steps before a client's first student "
        "step (0: the paper's joint schedule)", "distillation", _at_least(0)),
    Key("dafl-generator-lr", 0.2, "dafl: the generator's Adam learning rate", "distillation",
        _positive),
    Key("dafl-generator-width", 32, "dafl: channels of the generator's first convolution "
        "(paper: 128)", "distillation", _at_least(2)),
    Key("synthetic-dir", "", "data-free trainers: folder where each client writes a preview "
        "of its synthetic samples for 'fedtl plot' (empty: none)", "distillation"),
    # --- domain adaptation -------------------------------------------------------------
    Key("target-dataset", "", "domain-adaptation trainers: the unlabelled target domain "
        "('' = none; `dataset` is the source)", "domain adaptation", _target_dataset),
    Key("da-scenario", "shared-target", "who holds which domain: shared-target, split, "
        "domain-per-client", "domain adaptation",
        _one_of("shared-target", "split", "domain-per-client")),
    Key("target-client-share", 0.5, "split / domain-per-client: share of clients holding the "
        "target domain", "domain adaptation", _open_fraction),
    Key("photo-dir", "", "mnist-m / digits-m: folder of colour photos to crop backgrounds from "
        "('' = the photos scikit-learn and scikit-image ship)", "domain adaptation"),
    Key("dann-share-domain-head", True, "dann: aggregate the domain head (false: each client "
        "keeps its own)", "domain adaptation"),
    Key("dann-lr-annealing", True, "dann: anneal the local learning rates by 1/(1+10p)^0.75",
        "domain adaptation"),
    Key("dann-domain-loss", "sum-of-domain-means", "dann: the domain term, the paper's mean "
        "over the source batch plus mean over the target batch, or tllib's pooled-mean over "
        "both (half of it for equal batches)", "domain adaptation",
        _one_of("sum-of-domain-means", "pooled-mean")),
    Key("adda-source-rounds", 10, "adda: rounds of stage 1 (source training); the rest of "
        "num-rounds adapt the target encoder", "domain adaptation", _at_least(1)),
    Key("adda-adapt-optimizer", "adam", "adda: client optimizer in stage 2 (the paper's Adam; "
        "sgd accepted)", "domain adaptation", _one_of("adam", "sgd")),
    Key("adda-adapt-lr", 0.0002, "adda: client learning rate in stage 2 (target encoder and "
        "discriminator; the paper's 2e-4)", "domain adaptation", _positive),
    Key("adda-adapt-momentum", 0.5, "adda: momentum in stage 2: Adam's beta1 (the paper's 0.5) "
        "or SGD's momentum", "domain adaptation",
        lambda v: None if 0 <= v < 1 else "must be in [0, 1)"),
    # --- Ditto ---------------------------------------------------------------------------
    Key("ditto-lambda", 0.1, "Ditto: proximal weight lambda pulling the personal model v_i "
        "toward the global w", "ditto", _non_negative),
    # --- evaluation ----------------------------------------------------------------------
    Key("eval-every", 1, "evaluate every N rounds (the last round is always evaluated)",
        "evaluation", _at_least(1)),
    Key("eval-fraction", 1.0, "fraction of clients evaluated (the same seeded subset each time)",
        "evaluation", _fraction),
    Key("finetune-steps", 10, "FedAvg-FT: SGD steps on a client's train split before its "
        "personalized evaluation", "evaluation", _at_least(0)),
    Key("probe-label-fraction", 0.1, "self-supervised: share of each client's train split "
        "labelled for the linear probe and kNN", "evaluation", _fraction),
    Key("unseen-clients", 0.0, "share of clients held out of training, personalized from the "
        "global model and tested apart", "evaluation", _split_fraction),
    # --- reliability ---------------------------------------------------------------------
    Key("min-clients", 1, "fewest valid training replies a round needs to go on", "reliability",
        _at_least(1)),
    Key("client-timeout", 3600.0, "seconds the server waits for replies in a round; late clients "
        "are left out", "reliability", _positive),
    Key("fault-rate", 0.0, "fault injection: probability that a sampled client fails in a round",
        "reliability", lambda v: None if 0 <= v < 1 else "must be in [0, 1)"),
    Key("fault-kinds", "raise,nan,inf,shape", "fault injection: failures drawn from "
        "raise, nan, inf, shape, timeout", "reliability", _fault_kinds),
    # --- simulation ----------------------------------------------------------------------
    Key("client-num-cpus", 1.0, "CPU cores per simulated client (Ray resource; torch threads)",
        "simulation", _positive),
    Key("client-num-gpus", 0.0, "GPU share per simulated client (0.25 = four clients per GPU)",
        "simulation", _gpus),
    Key("device", "auto", "where clients train: auto (GPU if this client has a share), cpu, cuda",
        "simulation", _device),
    # --- output --------------------------------------------------------------------------
    Key("out-dir", "runs", "folder under which run directories are created", "output"),
    Key("run-name", "", "run directory name (empty: strategy-dataset-partitioner-timestamp)",
        "output"),
]

KEYS: dict[str, Key] = {k.name: k for k in _KEYS}
DEFAULTS: dict[str, Value] = {k.name: k.default for k in _KEYS}


class RunConfig(Mapping[str, Value]):
    """A validated, immutable run configuration (kebab-case keys, snake_case attributes)."""

    def __init__(self, values: Mapping[str, Value]):
        self._values = dict(values)

    def __getitem__(self, key: str) -> Value:
        return self._values[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __getattr__(self, name: str) -> Value:
        try:
            return self._values[name.replace("_", "-")]
        except KeyError:
            raise AttributeError(name) from None

    def replace(self, **changes: Value) -> RunConfig:
        """A copy with snake_case keyword changes applied and validated."""
        values = dict(self._values)
        values.update({k.replace("_", "-"): v for k, v in changes.items()})
        return make_config(values)

    def __repr__(self) -> str:
        return f"RunConfig({self._values!r})"


def _unknown_key_message(name: str, where: str) -> str:
    close = difflib.get_close_matches(name, KEYS, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return f"unknown config key '{name}' ({where}).{hint} Run 'fedtl list' for the accepted keys."


def _coerce(key: Key, value: Any, where: str) -> Value:
    """Return ``value`` as the key's type, or raise a ConfigError naming both."""
    want = key.type
    if isinstance(value, bool) or want is bool:
        if isinstance(value, bool) and want is bool:
            return value
    elif want is float and isinstance(value, int | float):
        if not math.isfinite(value):
            raise ConfigError(f"config key '{key.name}' = {value!r} ({where}): must be finite")
        return float(value)
    elif isinstance(value, want):
        return value
    raise ConfigError(
        f"config key '{key.name}' = {value!r} ({where}): expected {_type_name(want)}, "
        f"got {_type_name(type(value))}"
    )


def _type_name(t: type) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}.get(
        t, t.__name__
    )


def format_override(name: str, value: Value) -> str:
    """The ``key=value`` text of one ``--set`` that ``parse_override`` reads back as ``value``
    (booleans as TOML's ``true`` / ``false``)."""
    return f"{name}={str(value).lower() if isinstance(value, bool) else value}"


def parse_override(text: str) -> tuple[str, Value]:
    """Parse one ``key=value`` from ``--set``; the value is read as its key's type."""
    if "=" not in text:
        raise ConfigError(f"--set '{text}': expected key=value, e.g. --set num-rounds=5")
    name, raw = (s.strip() for s in text.split("=", 1))
    if name not in KEYS:
        raise ConfigError(_unknown_key_message(name, f"--set {text}"))
    key = KEYS[name]
    raw_unquoted = raw[1:-1] if len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "'\"" else raw
    try:
        if key.type is bool:
            lowered = raw.lower()
            if lowered not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return name, lowered in ("true", "1", "yes")
        if key.type is int:
            return name, int(raw)
        if key.type is float:
            return name, float(raw)
        return name, raw_unquoted
    except ValueError:
        raise ConfigError(
            f"config key '{name}' = {raw!r} (--set): expected {_type_name(key.type)}"
        ) from None


def read_toml(path: str | Path) -> dict[str, Value]:
    """Read a flat TOML run-config file; errors name the file and the line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file '{path}' is not valid TOML: {exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file '{path}' is not UTF-8 text") from None
    for name, value in data.items():
        if isinstance(value, dict | list):
            raise ConfigError(
                f"config file '{path}': '{name}' is a {'table' if isinstance(value, dict) else 'list'}; "
                "run-config files hold flat key = value pairs"
            )
    return data


def make_config(
    values: Mapping[str, Any] = (),
    *,
    where: str = "config",
    ignore_unknown: Iterable[str] = (),
    origins: Mapping[str, str] | None = None,
) -> RunConfig:
    """Merge ``values`` over the defaults, check every key, and return a RunConfig.

    Raises ConfigError for an unknown key, a wrong type or an impossible value, naming where
    the value came from (``origins[key]``, else ``where``). Checks that need the dataset
    (labels per client against classes, clients against samples, files in data-dir) are in
    ``fedtl.simulation.preflight``.
    """
    merged: dict[str, Value] = dict(DEFAULTS)
    skip = set(ignore_unknown)
    values = dict(values)
    origins = dict(origins or {})
    for name, value in values.items():
        if name in skip:
            continue
        source = origins.get(name, where)
        if name not in KEYS:
            raise ConfigError(_unknown_key_message(name, source))
        merged[name] = _coerce(KEYS[name], value, source)
    for name, value in merged.items():
        key = KEYS[name]
        if key.check is not None and (problem := key.check(value)) is not None:
            source = f" ({origins.get(name, where)})" if name in values else ""
            raise ConfigError(f"config key '{name}' = {value!r}{source}: {problem}")
        if key.registry is not None:
            from fedtl.registry import REGISTRIES  # registry imports no config state

            REGISTRIES[key.registry].check(value, key=name, where=origins.get(name, where)
                                           if name in values else None)
    if merged["val-fraction"] + merged["test-fraction"] >= 1:
        raise ConfigError(
            f"config keys 'val-fraction' = {merged['val-fraction']} and 'test-fraction' = "
            f"{merged['test-fraction']}: together they must leave a training share (sum < 1)"
        )
    if merged["unseen-clients"] > 0:
        held_out = unseen_count(merged["num-clients"], merged["unseen-clients"])
        if not 1 <= held_out < merged["num-clients"]:
            raise ConfigError(
                f"config key 'unseen-clients' = {merged['unseen-clients']}: holds out "
                f"{held_out} of num-clients={merged['num-clients']}; it must hold out at least "
                "one client and leave at least one to train"
            )
    if merged["batch-norm"] and merged["model"] not in BATCH_NORM_MODELS:
        raise ConfigError(
            f"config key 'batch-norm' = true: model {merged['model']!r} has no batch-norm "
            f"option (accepted with batch-norm: {', '.join(BATCH_NORM_MODELS)})"
        )
    if merged["strategy"] == "pfedme" and merged["optimizer"] != "sgd":
        raise ConfigError(
            f"config key 'optimizer' = {merged['optimizer']!r}: pFedMe's clients run the "
            "paper's own solver (lr, personal-lr, pfedme-lambda), not a torch optimizer "
            "(accepted with strategy = 'pfedme': 'sgd')"
        )
    if (merged["strategy"] == "pfedme" and merged["trainer"] == "adda"
            and merged["adda-adapt-optimizer"] != "sgd"):
        raise ConfigError(
            f"config key 'adda-adapt-optimizer' = {merged['adda-adapt-optimizer']!r}: with "
            "strategy = 'pfedme' ADDA's stage 2 runs pFedMe's solver; set "
            "adda-adapt-optimizer=sgd and an adda-adapt-lr for it (e.g. 0.01)"
        )
    if (merged["fault-rate"] > 0 and "timeout" in merged["fault-kinds"]
            and merged["client-timeout"] > 300):
        raise ConfigError(
            f"config key 'fault-kinds' = {merged['fault-kinds']!r} injects hangs of "
            f"client-timeout + 1 s, but 'client-timeout' = {merged['client-timeout']}: set "
            "client-timeout to a few seconds (accepted: <= 300 with the timeout fault)"
        )
    return RunConfig(merged)


def unseen_count(num_clients: int, fraction: float) -> int:
    """How many of ``num_clients`` clients the ``unseen-clients`` fraction holds out."""
    return int(round(num_clients * fraction))


def resolve(config_file: str | Path | None = None, overrides: Iterable[str] = ()) -> RunConfig:
    """Defaults, then a TOML file, then ``--set key=value`` overrides, validated together
    (so an override can mend a file's value that clashes with another key); each error names
    where its value came from."""
    values: dict[str, Value] = {}
    origins: dict[str, str] = {}
    if config_file is not None:
        values.update(read_toml(config_file))
        origins.update(dict.fromkeys(values, f"in {config_file}"))
    for text in overrides:
        name, value = parse_override(text)
        values[name] = value
        origins[name] = "--set"
    return make_config(values, where="defaults", origins=origins)


def to_record(cfg: RunConfig) -> dict[str, Value]:
    """The config as a plain dict (for a Flower ConfigRecord or a TOML file)."""
    return dict(cfg)
