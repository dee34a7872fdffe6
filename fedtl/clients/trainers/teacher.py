"""Teachers for distillation: any saved model, loaded once per process and frozen.

A teacher is named by two config keys:

- ``teacher-checkpoint``: a fedtl run directory, its ``model.pt``, or any file holding a
  PyTorch state dict (``torch.save(model.state_dict(), path)``; a dict that holds one under
  ``state_dict`` or ``model`` is accepted too);
- ``teacher-model``: its architecture: a fedtl model name (``lenet5``, ``cnn``, ...),
  ``NAME:bn`` for one of the convolutional nets with batch norm (``lenet5:bn``),
  ``mlp:W1,W2,...`` for a fully connected net of those widths, or ``torchvision:NAME`` for
  any torchvision classification builder (``torchvision.models.get_model(NAME,
  num_classes=...)``). Empty: the architecture named in the ``config.toml`` of the fedtl run
  the checkpoint comes from.

``check_teacher`` turns every way this can go wrong (missing file, unknown architecture,
weights of another shape, a model that cannot take the dataset's inputs) into one
ConfigError before Ray starts.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedtl.config import BATCH_NORM_MODELS, ConfigError, RunConfig
from fedtl.data.datasets import DatasetSpec

RUN_FILE = "model.pt"
TORCHVISION = "torchvision:"


@dataclass(frozen=True)
class TeacherSource:
    """Where a teacher's weights are and how to build the module that holds them."""

    checkpoint: Path
    model: str  # a fedtl model name or 'torchvision:NAME'
    options: dict[str, Any] = field(default_factory=dict)  # mlp widths, batch norm
    trained_on: str | None = None  # dataset of the fedtl run it comes from, when known


def _run_config(checkpoint: Path) -> dict[str, Any] | None:
    path = checkpoint.parent / "config.toml"
    if not path.is_file():
        return None
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError):
        return None


def _parse_model(text: str, where: str) -> tuple[str, dict[str, Any]]:
    """Architecture name and factory options from a ``teacher-model`` value."""
    from fedtl.models import parse_hidden
    from fedtl.registry import MODELS

    if text.startswith(TORCHVISION):
        name = text[len(TORCHVISION):]
        from torchvision.models import list_models

        if name not in list_models():
            raise ConfigError(
                f"config key 'teacher-model' = {text!r}{where}: torchvision has no model "
                f"{name!r} (e.g. torchvision:resnet18, torchvision:mobilenet_v3_small)")
        return text, {}
    name, _, suffix = text.partition(":")
    if name not in MODELS:
        MODELS.check(name, key="teacher-model")
    if not suffix:
        return name, {}
    if name == "mlp":
        try:
            return name, {"hidden": parse_hidden(suffix)}
        except ValueError as exc:
            raise ConfigError(f"config key 'teacher-model' = {text!r}{where}: {exc}") from None
    if name in BATCH_NORM_MODELS and suffix == "bn":
        return name, {"batch_norm": True}
    raise ConfigError(
        f"config key 'teacher-model' = {text!r}{where}: after ':' mlp takes widths "
        f"(mlp:1200,1200) and {', '.join(BATCH_NORM_MODELS)} take 'bn' for batch norm "
        f"(e.g. lenet5:bn); {name} takes {'only bn' if name in BATCH_NORM_MODELS else 'nothing'}")


def resolve_teacher(cfg: RunConfig) -> TeacherSource:
    """The teacher the config names; raises ConfigError when it cannot be found."""
    if not cfg.teacher_checkpoint:
        raise ConfigError(
            f"config key 'teacher-checkpoint' = '': trainer {cfg.trainer!r} distils from a "
            "teacher; give a fedtl run directory, its model.pt, or a state-dict file")
    path = Path(cfg.teacher_checkpoint).expanduser()
    if path.is_dir():
        path = path / RUN_FILE
    if not path.is_file():
        raise ConfigError(f"config key 'teacher-checkpoint' = {cfg.teacher_checkpoint!r}: "
                          f"{path} does not exist")
    run = _run_config(path)
    if cfg.teacher_model:
        name, options = _parse_model(cfg.teacher_model, "")
        return TeacherSource(path, name, options, run.get("dataset") if run else None)
    if run is None or "model" not in run:
        raise ConfigError(
            f"config key 'teacher-model' = '': {path} is not in a fedtl run directory (no "
            "config.toml beside it), so name its architecture, e.g. teacher-model=lenet5 or "
            "teacher-model=torchvision:resnet18")
    name, options = _parse_model(str(run["model"]), f" (from {path.parent / 'config.toml'})")
    from fedtl.models import model_options

    options = {**options, **model_options(name, run)}
    return TeacherSource(path, name, options, run.get("dataset"))


def build_architecture(source: TeacherSource, spec: DatasetSpec) -> nn.Module:
    """An untrained module of the teacher's architecture for ``spec``'s inputs and classes."""
    if source.model.startswith(TORCHVISION):
        from torchvision.models import get_model

        return get_model(source.model[len(TORCHVISION):], num_classes=spec.num_classes)
    from fedtl.models import build_model

    return build_model(source.model, spec, **source.options)


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 -- pickle, zip and unpickling errors alike
        raise ConfigError(f"config key 'teacher-checkpoint': {path} is not a readable PyTorch "
                          f"checkpoint ({type(exc).__name__}: {str(exc).splitlines()[0]})"
                          ) from None
    for wrapper in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ConfigError(f"config key 'teacher-checkpoint': {path} does not hold a state dict "
                          "(a mapping of parameter names to tensors)")
    return obj


def _mismatch(model: nn.Module, weights: dict[str, torch.Tensor]) -> str | None:
    """A short description of how ``weights`` fail to fit ``model``, or None if they fit."""
    want = model.state_dict()
    missing = [k for k in want if k not in weights]
    extra = [k for k in weights if k not in want]
    shapes = [f"{k}: checkpoint {tuple(weights[k].shape)} vs model {tuple(v.shape)}"
              for k, v in want.items() if k in weights and weights[k].shape != v.shape]
    problems = []
    for label, items in (("size mismatch", shapes), ("missing", missing), ("unexpected", extra)):
        if items:
            more = f" (+{len(items) - 3} more)" if len(items) > 3 else ""
            problems.append(f"{label}: {', '.join(items[:3])}{more}")
    return "; ".join(problems) or None


def _load(cfg: RunConfig) -> nn.Module:
    from fedtl.registry import DATASETS

    spec = DATASETS.get(cfg.dataset)
    source = resolve_teacher(cfg)
    model = build_architecture(source, spec)
    weights = _read_state_dict(source.checkpoint)
    if (problem := _mismatch(model, weights)) is not None:
        trained = f" (trained on {source.trained_on!r})" if source.trained_on else ""
        if (source.model in BATCH_NORM_MODELS and not source.options.get("batch_norm")
                and any(key.endswith("running_mean") for key in weights)):
            problem += f"; the weights have batch-norm layers: teacher-model={source.model}:bn"
        raise ConfigError(
            f"config key 'teacher-checkpoint' = {cfg.teacher_checkpoint!r}{trained} does not "
            f"fit teacher-model {source.model!r} for dataset {cfg.dataset!r} "
            f"({spec.num_classes} classes, inputs {spec.input_shape}): {problem}")
    model.load_state_dict(weights)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        with torch.no_grad():
            out = model(torch.zeros(2, *spec.input_shape))
    except Exception as exc:  # noqa: BLE001 -- any failure here means: wrong architecture
        raise ConfigError(
            f"config key 'teacher-model' = {source.model!r}: the teacher cannot take dataset "
            f"{cfg.dataset!r}'s inputs of shape {spec.input_shape} ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0]})") from None
    if tuple(out.shape) != (2, spec.num_classes):
        raise ConfigError(
            f"config key 'teacher-model' = {source.model!r}: the teacher gives outputs of shape "
            f"{tuple(out.shape[1:])}, the dataset has {spec.num_classes} classes")
    return model


_teachers: dict[tuple, nn.Module] = {}


def load_teacher(cfg: RunConfig, device: torch.device | str = "cpu") -> nn.Module:
    """The frozen teacher (eval mode, no gradients) on ``device``; loaded once per process
    and reloaded when the checkpoint file changes."""
    source = resolve_teacher(cfg)
    stamp = source.checkpoint.stat().st_mtime_ns
    key = (str(source.checkpoint.resolve()), stamp, cfg.teacher_model, cfg.dataset, str(device))
    if key not in _teachers:
        _teachers[key] = _load(cfg).to(device)
    return _teachers[key]


def check_teacher(cfg: RunConfig) -> None:
    """Raise ConfigError unless the configured teacher loads and fits the dataset."""
    load_teacher(cfg, "cpu")


def classifier(model: nn.Module) -> nn.Linear:
    """The model's output layer: its last ``nn.Linear`` (rows = classes)."""
    last = None
    for module in model.modules():
        if isinstance(module, nn.Linear):
            last = module
    if last is None:
        raise ValueError(f"{type(model).__name__} has no linear output layer")
    return last


def logits_and_features(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's logits on ``x`` and the features its output layer receives (batch, d)."""
    seen: list[torch.Tensor] = []
    handle = classifier(model).register_forward_hook(lambda m, inp, out: seen.append(inp[0]))
    try:
        logits = model(x)
    finally:
        handle.remove()
    return logits, seen[-1].flatten(1)
