"""Datasets fedtl trains on, held in memory as tensors.

Each dataset is a ``DatasetSpec``: its static facts (classes, input shape, size) are known
without loading, so a config can be checked before any work starts; ``load`` returns the
training pool that is partitioned across clients and, where the dataset has one, the central
test set. Image datasets stay ``uint8`` in memory and are normalised per batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from fedtl.config import ConfigError, RunConfig


@dataclass
class ArrayDataset:
    """Inputs and integer labels; ``inputs(idx)`` returns a normalised float batch."""

    x: torch.Tensor
    y: torch.Tensor
    scale: float = 1.0
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    _mean_t: torch.Tensor = field(init=False, repr=False)
    _std_t: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        view = (-1, 1, 1) if len(self.mean) > 1 else (1,)  # per channel, or one scalar
        self._mean_t = torch.tensor(self.mean, dtype=torch.float32).view(view)
        self._std_t = torch.tensor(self.std, dtype=torch.float32).view(view)

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def inputs(self, idx: torch.Tensor | slice | None = None) -> torch.Tensor:
        """Normalised float32 inputs at ``idx`` (all of them when None)."""
        x = self.x if idx is None else self.x[idx]
        x = x.to(torch.float32)
        if self.scale != 1.0:
            x = x * self.scale
        return (x - self._mean_t) / self._std_t

    def labels(self, idx: torch.Tensor | slice | None = None) -> torch.Tensor:
        return self.y if idx is None else self.y[idx]


@dataclass
class Source:
    """A loaded dataset: the pool split across clients, and the central test set if any."""

    train: ArrayDataset
    test: ArrayDataset | None
    client_ids: np.ndarray | None = None  # natural client of each train sample (synthetic)


@dataclass(frozen=True)
class DatasetSpec:
    """Static facts about a dataset and how to load it."""

    name: str
    num_classes: int
    input_shape: tuple[int, ...]
    train_size: int | None  # None when it depends on the config (synthetic)
    has_central_test: bool
    loader: Callable[[RunConfig], Source]
    natural_clients: bool = False
    # How stored values become model inputs: x * raw_scale maps the dataset's integer
    # values to [0, 1] (1/255 for 8-bit images, 1/16 for digits), then (x - mean) / std per
    # channel. Local data (fedtl.data.local) is normalised the same way.
    raw_scale: float = 1.0
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)

    @property
    def is_image(self) -> bool:
        return len(self.input_shape) == 3

    def load(self, cfg: RunConfig) -> Source:
        return self.loader(cfg)


# --- scikit-learn digits ------------------------------------------------------------------

def _load_digits(cfg: RunConfig) -> Source:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.from_numpy(bunch.images.astype(np.uint8)).unsqueeze(1)  # values 0..16
    y = torch.from_numpy(bunch.target.astype(np.int64))
    return Source(ArrayDataset(x, y, scale=DIGITS.raw_scale, mean=DIGITS.mean, std=DIGITS.std),
                  test=None)


# Mean and std of the 1,797 images scaled to [0, 1].
DIGITS = DatasetSpec("digits", 10, (1, 8, 8), 1797, False, _load_digits,
                     raw_scale=1 / 16, mean=(0.3053,), std=(0.3760,))


# --- Synthetic(alpha, beta), Li et al. (FedProx) as used by pFedMe --------------------------

def synthetic_clients(
    num_clients: int, alpha: float, beta: float, min_samples: int, seed: int,
    dimension: int = 60, num_classes: int = 10,
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Generate Synthetic(alpha, beta): one (x, y) per client, sizes log-normal(4, 2) + min.

    Client k draws W_k ~ N(u_k, 1), b_k ~ N(u_k, 1) with u_k ~ N(0, alpha) and features
    x ~ N(v_k, diag(j^-1.2)) with v_k ~ N(B_k, 1), B_k ~ N(0, beta); y = argmax(W_k x + b_k).
    """
    rng = np.random.default_rng(seed)
    sizes = rng.lognormal(4, 2, num_clients).astype(int) + min_samples
    mean_w = rng.normal(0, alpha, num_clients)
    b_shift = rng.normal(0, beta, num_clients)
    cov_diag = np.power(np.arange(1, dimension + 1, dtype=np.float64), -1.2)
    xs, ys = [], []
    for k in range(num_clients):
        mean_x = rng.normal(b_shift[k], 1, dimension)
        w = rng.normal(mean_w[k], 1, (dimension, num_classes))
        b = rng.normal(mean_w[k], 1, num_classes)
        x = mean_x + rng.standard_normal((sizes[k], dimension)) * np.sqrt(cov_diag)
        xs.append(x.astype(np.float32))
        ys.append(np.argmax(x @ w + b, axis=1).astype(np.int64))
    return xs, ys


def _load_synthetic(cfg: RunConfig) -> Source:
    xs, ys = synthetic_clients(cfg.num_clients, cfg.synthetic_alpha, cfg.synthetic_beta,
                               cfg.synthetic_min_samples, cfg.seed)
    ids = np.concatenate([np.full(len(y), k) for k, y in enumerate(ys)])
    train = ArrayDataset(torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys)))
    return Source(train, test=None, client_ids=ids)


SYNTHETIC = DatasetSpec("synthetic", 10, (60,), None, False, _load_synthetic,
                        natural_clients=True)


# --- torchvision datasets ------------------------------------------------------------------

@dataclass(frozen=True)
class TorchvisionLoader:
    """Reads a torchvision dataset from a folder in torchvision's layout.

    As a DatasetSpec's loader (called with a run config) it reads ``data-dir`` and downloads
    only when files are absent; ``read(root, download=False)`` reads any folder (a
    SuperNode's local copy).
    """

    cls_name: str
    folder: str  # where the files sit under the root, e.g. "MNIST/raw"
    files: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def missing(self, root: Path) -> list[str]:
        """The dataset's files absent under ``root``."""
        return [f for f in self.files if not (root / self.folder / f).exists()]

    def __call__(self, cfg: RunConfig) -> Source:
        return self.read(Path(cfg.data_dir).expanduser(), download=None,
                         key=f"config key 'data-dir' = {cfg.data_dir!r}")

    def read(self, root: Path, download: bool | None = False, key: str | None = None) -> Source:
        """The train and test sets under ``root``; ``download=None``: only when files are
        absent. Raises ConfigError naming ``key`` (default: the folder) when unreadable."""
        import torchvision.datasets as tvd

        cls = getattr(tvd, self.cls_name)
        missing = self.missing(root)
        if download is None:
            download = bool(missing)
        key = key or f"folder {str(root)!r}"
        try:
            train = cls(root=str(root), train=True, download=download)
            test = cls(root=str(root), train=False, download=download)
        except Exception as exc:  # torchvision raises RuntimeError / URLError / OSError
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0].rstrip(":")
            if missing:
                raise ConfigError(
                    f"{key}: no {self.cls_name} files in {root / self.folder} "
                    f"(torchvision's layout: {', '.join(missing)})"
                    + (f" and the download failed ({reason}). Point data-dir at a folder "
                       f"that holds {self.folder}/, or run once with internet access"
                       if download else "")
                ) from None
            raise ConfigError(
                f"{key}: the {self.cls_name} files in {root / self.folder} cannot be read "
                f"({type(exc).__name__}: {reason}); they may be truncated or corrupt"
            ) from None
        return Source(_as_array(train, self.mean, self.std), _as_array(test, self.mean, self.std))


def _as_array(ds, mean: tuple, std: tuple) -> ArrayDataset:
    x = torch.as_tensor(np.asarray(ds.data))
    if x.dim() == 3:  # (N, H, W) grayscale
        x = x.unsqueeze(1)
    elif x.shape[-1] == 3:  # (N, H, W, C) colour, as CIFAR stores it
        x = x.permute(0, 3, 1, 2).contiguous()
    y = torch.as_tensor(np.asarray(ds.targets), dtype=torch.int64)
    return ArrayDataset(x.to(torch.uint8), y, scale=1 / 255, mean=mean, std=std)


_MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def _torchvision_spec(name: str, shape: tuple[int, ...], size: int, loader: TorchvisionLoader
                      ) -> DatasetSpec:
    return DatasetSpec(name, 10, shape, size, True, loader, raw_scale=1 / 255,
                       mean=loader.mean, std=loader.std)


MNIST = _torchvision_spec("mnist", (1, 28, 28), 60000, TorchvisionLoader(
    "MNIST", "MNIST/raw", _MNIST_FILES, (0.1307,), (0.3081,)))
FASHION_MNIST = _torchvision_spec("fashion-mnist", (1, 28, 28), 60000, TorchvisionLoader(
    "FashionMNIST", "FashionMNIST/raw", _MNIST_FILES, (0.2860,), (0.3530,)))
CIFAR10 = _torchvision_spec("cifar10", (3, 32, 32), 50000, TorchvisionLoader(
    "CIFAR10", "cifar-10-batches-py",
    tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",),
    (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)))
