"""The bench spec: one TOML file declaring a grid of fedtl runs, and the cells it expands to.

```toml
[bench]
title = "Personalization on digits"     # optional
seeds = [0, 1, 2]                       # every cell is run once per seed

[report]
target-accuracy = 0.9                   # optional: first round reaching it is reported

[base]                                  # run-config keys shared by every cell
dataset = "digits"
num-rounds = 30

[methods.fedavg]                        # one table per method: its own keys
strategy = "fedavg"
[methods.pfedme]
strategy = "pfedme"
personal-lr = 0.05

[settings.iid]                          # optional: one table per data setting
partitioner = "iid"
[settings."dir-0.1"]
partitioner = "dirichlet"
alpha = 0.1

[sweep]                                 # optional: keys whose lists are crossed with the rest
trainer = ["supervised"]

[references.pfedme]                     # optional: published figures shown beside fedtl's
personalized = 0.9459
global = 0.9288
source = "Dinh et al. 2020, official code, best of 800 rounds"
setting = "mlr"                         # optional: the setting they belong to
```

A cell is (sweep values, setting, seed, method); its run config is ``[base]``, then the
setting's keys, the sweep's values and the method's keys (a key may come from only one of
these three), then ``--set`` overrides, then ``seed``. Methods may not set the keys that decide
which samples a client holds, nor ``unseen-clients``: every method of a setting and seed sees
the same per-client splits. Validation is complete before anything runs: every cell's config
goes through fedtl's config checks (``fedtl.simulation.preflight`` is the runner's next step).
"""

from __future__ import annotations

import difflib
import itertools
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedtl.config import KEYS, ConfigError, RunConfig, Value, make_config, parse_override
from fedtl.data import DATA_KEYS

TABLES = ("bench", "report", "base", "methods", "settings", "sweep", "references")
BENCH_KEYS = ("title", "seeds")
REPORT_KEYS = ("target-accuracy",)
REFERENCE_KEYS = ("personalized", "global", "source", "setting")
# Keys the bench sets itself for every cell.
RESERVED = ("seed", "out-dir", "run-name")
# Keys every method of a cell's setting and seed must share (same clients, same splits).
SHARED_KEYS = (*DATA_KEYS, "unseen-clients")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
DEFAULT_SETTING = "default"


@dataclass(frozen=True)
class Cell:
    """One run of the grid."""

    method: str
    setting: str                              # the setting's name
    variant: tuple[tuple[str, Value], ...]    # the sweep's values for this cell
    seed: int
    config: RunConfig

    @property
    def setting_label(self) -> str:
        """The setting's name plus the sweep's values, e.g. ``iid`` or ``iid+trainer=x``."""
        return setting_label(self.setting, self.variant)

    @property
    def id(self) -> str:
        return cell_id(self.setting_label, self.method, self.seed)

    @property
    def relative_dir(self) -> Path:
        """The cell's run directory, relative to the bench directory."""
        return cell_dir(self.setting_label, self.method, self.seed)


def setting_label(setting: str, variant: tuple[tuple[str, Value], ...]) -> str:
    if not variant:
        return setting
    return setting + "+" + ",".join(f"{k}={v}" for k, v in variant)


def cell_id(label: str, method: str, seed: int) -> str:
    return f"{label}/{method}/seed-{seed}"


def cell_dir(label: str, method: str, seed: int) -> Path:
    return Path("cells") / _safe(label) / method / f"seed-{seed}"


@dataclass(frozen=True)
class BenchSpec:
    """A validated bench spec and its cells, in run order."""

    path: Path
    title: str
    seeds: tuple[int, ...]
    target_accuracy: float | None
    base: dict[str, Value]
    methods: dict[str, dict[str, Value]]
    settings: dict[str, dict[str, Value]]
    sweep: dict[str, list[Value]]
    references: dict[str, dict[str, Any]]
    overrides: tuple[str, ...] = ()
    cells: tuple[Cell, ...] = field(default=())


def _safe(text: str) -> str:
    """A folder name for ``text``: characters other than letters, digits and ``._+=-`` → ``_``."""
    return re.sub(r"[^A-Za-z0-9._+=-]", "_", text)


class _Errors:
    """Builds the one-line errors of a spec file."""

    def __init__(self, path: Path):
        self.path = path

    def __call__(self, message: str) -> ConfigError:
        return ConfigError(f"bench spec {self.path}: {message}")


def _close(name: str, choices) -> str:
    match = difflib.get_close_matches(str(name), list(choices), n=1)
    return f" Did you mean '{match[0]}'?" if match else ""


def _table(data: dict, name: str, error: _Errors) -> dict:
    value = data.get(name, {})
    if not isinstance(value, dict):
        raise error(f"'{name}' must be a table ([{name}])")
    return value


def _run_keys(values: dict, where: str, error: _Errors) -> dict[str, Value]:
    """Flat run-config keys of one table; names must be fedtl keys the bench does not set."""
    for key, value in values.items():
        if isinstance(value, dict | list):
            raise error(f"[{where}] '{key}' is a {'table' if isinstance(value, dict) else 'list'}"
                        "; run-config keys take one value (lists go in [sweep])")
        if key in RESERVED:
            hint = ("list the seeds in [bench] seeds" if key == "seed"
                    else "the bench names each cell's run directory")
            raise error(f"[{where}] sets '{key}': {hint}")
        if key not in KEYS:
            raise error(f"[{where}] unknown config key '{key}'.{_close(key, KEYS)} "
                        "Run 'fedtl list' for the accepted keys.")
    return dict(values)


def _named_tables(data: dict, name: str, error: _Errors) -> dict[str, dict[str, Value]]:
    out = {}
    for entry, values in _table(data, name, error).items():
        if not isinstance(values, dict):
            raise error(f"[{name}] '{entry}' must be a table ([{name}.{entry}]) of run-config keys")
        if not NAME.match(entry):
            raise error(f"[{name}] name '{entry}': use letters, digits and . _ + - only")
        out[entry] = _run_keys(values, f"{name}.{entry}", error)
    return out


def _seeds(bench: dict, error: _Errors) -> tuple[int, ...]:
    seeds = bench.get("seeds")
    if seeds is None:
        raise error("[bench] needs 'seeds', e.g. seeds = [0, 1, 2]")
    if (not isinstance(seeds, list) or not seeds
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds)):
        raise error(f"[bench] seeds = {seeds!r}: expected a non-empty list of integers >= 0")
    if len(set(seeds)) != len(seeds):
        raise error(f"[bench] seeds = {seeds!r}: a seed is listed twice")
    return tuple(seeds)


def _sweep(data: dict, error: _Errors) -> dict[str, list[Value]]:
    sweep = _table(data, "sweep", error)
    for key, values in sweep.items():
        _run_keys({key: None}, "sweep", error)  # the key's name: a fedtl key, not reserved
        if (not isinstance(values, list) or not values
                or any(isinstance(v, dict | list) for v in values)):
            raise error(f"[sweep] {key} = {values!r}: expected a non-empty list of values")
        if len(set(map(repr, values))) != len(values):
            raise error(f"[sweep] {key} = {values!r}: a value is listed twice")
    return {k: list(v) for k, v in sweep.items()}


def _references(data: dict, methods: dict, settings: dict, error: _Errors) -> dict:
    refs = _table(data, "references", error)
    for method, ref in refs.items():
        if method not in methods:
            raise error(f"[references.{method}]: no method '{method}' in [methods]."
                        f"{_close(method, methods)}")
        if not isinstance(ref, dict):
            raise error(f"[references] '{method}' must be a table")
        for key, value in ref.items():
            if key not in REFERENCE_KEYS:
                raise error(f"[references.{method}] unknown key '{key}' "
                            f"(accepted: {', '.join(REFERENCE_KEYS)})")
            if key in ("personalized", "global"):
                if isinstance(value, bool) or not isinstance(value, int | float) \
                        or not 0 <= value <= 1:
                    raise error(f"[references.{method}] {key} = {value!r}: expected an "
                                "accuracy in [0, 1]")
            elif not isinstance(value, str):
                raise error(f"[references.{method}] {key} = {value!r}: expected a string")
        if "setting" in ref and ref["setting"] not in settings:
            raise error(f"[references.{method}] setting = {ref['setting']!r}: no such setting "
                        f"in [settings].{_close(ref['setting'], settings)}")
    return {m: dict(r) for m, r in refs.items()}


def _check_layers(methods: dict, settings: dict, sweep: dict, error: _Errors) -> None:
    """A key may come from only one of methods, settings and sweep; methods share the splits."""
    for name, keys in methods.items():
        shared = sorted(set(keys) & set(SHARED_KEYS))
        if shared:
            raise error(f"[methods.{name}] sets '{shared[0]}', which decides the clients' data: "
                        "every method must see the same per-client splits; set it in [base], "
                        "[settings] or [sweep]")
    setting_keys = {k for keys in settings.values() for k in keys}
    method_keys = {k for keys in methods.values() for k in keys}
    for key in sorted(setting_keys & method_keys):
        raise error(f"'{key}' is set both in [settings] and in [methods]: set each key in one "
                    "place (or in [base])")
    for key in sorted(set(sweep) & (setting_keys | method_keys)):
        raise error(f"[sweep] '{key}' is also set in [settings] or [methods]: set each key in "
                    "one place")


def parse_spec(text: str, path: str | Path = "<spec>", overrides: tuple[str, ...] = (),
               seeds: tuple[int, ...] | None = None) -> BenchSpec:
    """Validate a spec's text and expand its grid; raises ConfigError with one clear line.

    ``overrides`` are ``key=value`` texts applied to every cell (``--set``); ``seeds``, when
    given, replaces ``[bench] seeds`` (``--seeds``)."""
    path = Path(path)
    error = _Errors(path)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise error(f"not valid TOML: {exc}") from None
    for name in data:
        if name not in TABLES:
            raise error(f"unknown table [{name}].{_close(name, TABLES)} Accepted: "
                        + ", ".join(f"[{t}]" for t in TABLES))
    bench = _table(data, "bench", error)
    for key in bench:
        if key not in BENCH_KEYS:
            raise error(f"[bench] unknown key '{key}'.{_close(key, BENCH_KEYS)} "
                        f"Accepted: {', '.join(BENCH_KEYS)}")
    title = bench.get("title", path.stem)
    if not isinstance(title, str):
        raise error(f"[bench] title = {title!r}: expected a string")
    if seeds is not None:
        bench = {**bench, "seeds": list(seeds)}
    seeds = _seeds(bench, error)
    report = _table(data, "report", error)
    for key in report:
        if key not in REPORT_KEYS:
            raise error(f"[report] unknown key '{key}'.{_close(key, REPORT_KEYS)} "
                        f"Accepted: {', '.join(REPORT_KEYS)}")
    target = report.get("target-accuracy")
    if target is not None and (isinstance(target, bool) or not isinstance(target, int | float)
                               or not 0 < target <= 1):
        raise error(f"[report] target-accuracy = {target!r}: expected an accuracy in (0, 1]")
    base = _run_keys(_table(data, "base", error), "base", error)
    methods = _named_tables(data, "methods", error)
    if not methods:
        raise error("no methods: add at least one [methods.NAME] table, e.g. "
                    "[methods.fedavg] strategy = \"fedavg\"")
    settings = _named_tables(data, "settings", error) or {DEFAULT_SETTING: {}}
    sweep = _sweep(data, error)
    _check_layers(methods, settings, sweep, error)
    references = _references(data, methods, settings, error)
    forced = {}
    for text_ in overrides:
        key, value = parse_override(text_)
        if key in RESERVED:
            raise error(f"--set {text_}: the bench sets '{key}' itself"
                        + (" (list seeds in [bench] seeds)" if key == "seed" else ""))
        forced[key] = value
    spec = BenchSpec(path, title, seeds, None if target is None else float(target), base,
                     methods, settings, sweep, references, tuple(overrides))
    return _with_cells(spec, forced, error)


def _with_cells(spec: BenchSpec, forced: dict[str, Value], error: _Errors) -> BenchSpec:
    cells = []
    sweep_keys = list(spec.sweep)
    for combo in itertools.product(*(spec.sweep[k] for k in sweep_keys)):
        variant = tuple(zip(sweep_keys, combo))
        for setting, setting_keys in spec.settings.items():
            for seed in spec.seeds:
                for method, method_keys in spec.methods.items():
                    values = {**spec.base, **setting_keys, **dict(variant), **method_keys,
                              **forced}
                    label = setting_label(setting, variant)
                    folder = cell_dir(label, method, seed)
                    values.update({"seed": seed, "out-dir": str(folder.parent),
                                   "run-name": folder.name})
                    where = f"cell {cell_id(label, method, seed)}"
                    try:
                        config = make_config(values, where=where)
                    except ConfigError as exc:  # a key's error names the cell already
                        raise error(str(exc) if f"({where})" in str(exc)
                                    else f"{where}: {exc}") from None
                    cells.append(Cell(method, setting, variant, seed, config))
    dirs = [c.relative_dir for c in cells]
    if len(set(dirs)) != len(dirs):
        raise error("two cells map to the same folder; give settings and sweep values names "
                    "that differ in letters or digits")
    return BenchSpec(**{**spec.__dict__, "cells": tuple(cells)})


def load_spec(path: str | Path, overrides: tuple[str, ...] = (),
              seeds: tuple[int, ...] | None = None) -> BenchSpec:
    """Read and validate the spec file at ``path``; raises ConfigError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"bench spec '{path}' does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"bench spec '{path}' is not UTF-8 text") from None
    return parse_spec(text, path, tuple(overrides), seeds)
