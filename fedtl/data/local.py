"""A SuperNode's own data, read from the path its node config names (``data-path``).

On real machines each client holds its data; nothing is partitioned. A SuperNode started
with ``--node-config 'data-path="/srv/data/site-a.npz"'`` reads one of:

- an ``.npz`` file with arrays ``x`` (samples) and ``y`` (integer labels 0..K-1). Images may
  be ``(N, C, H, W)``, ``(N, H, W, C)`` or ``(N, H, W)`` (one channel); integer pixels are the
  dataset's raw values (0..255; 0..16 for ``digits``), floating pixels lie in [0, 1]; feature
  vectors (``synthetic``) are ``(N, D)`` floats used as they are;
- a folder in torchvision's layout for the run's dataset (e.g. ``MNIST/raw/...``): its
  training files are the client's data (its test files stay out: the server scores the
  global model on the same dataset's test set);
- an image folder: one subfolder per class, named by the integer label (``0/``, ``1/``, ...),
  holding image files; images are converted to the dataset's channels and size.

Samples are normalised exactly as the run's dataset is in simulation, so the global model sees
the same inputs. The client splits its data into train / validation / test from the run's
``seed``, ``val-fraction`` and ``test-fraction``. Anything wrong raises ``LocalDataError``
with one line naming the path, the problem and what is accepted; the ClientApp sends it to
the server as the reply's error and the run goes on without this client.
"""

from __future__ import annotations

import functools
import zipfile
from pathlib import Path

import numpy as np
import torch

from fedtl.config import ConfigError, RunConfig
from fedtl.data import ClientData, Split
from fedtl.data.datasets import ArrayDataset, DatasetSpec, TorchvisionLoader
from fedtl.data.partition import label_counts, split_client
from fedtl.registry import DATASETS


class LocalDataError(ValueError):
    """A SuperNode's data-path that cannot be used; the message says why and what works."""


def _fail(path: Path, problem: str) -> LocalDataError:
    return LocalDataError(f"data-path '{path}': {problem}")


def _check_labels(path: Path, y: np.ndarray, n: int, spec: DatasetSpec) -> torch.Tensor:
    if y.ndim != 1 or len(y) != n:
        raise _fail(path, f"'y' must hold one label per sample: shape ({n},), got {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        if not (np.issubdtype(y.dtype, np.floating) and np.all(np.mod(y, 1) == 0)):
            raise _fail(path, f"labels must be integers 0..{spec.num_classes - 1}, "
                              f"got dtype {y.dtype}")
    bad = (y < 0) | (y >= spec.num_classes)
    if bad.any():
        raise _fail(path, f"label {y[bad][0].item()!r} is outside 0..{spec.num_classes - 1} "
                          f"(dataset {spec.name!r} has {spec.num_classes} classes)")
    return torch.from_numpy(y.astype(np.int64))


def _image_tensor(path: Path, x: np.ndarray, spec: DatasetSpec) -> torch.Tensor:
    """``x`` as (N, C, H, W) in the spec's shape, or LocalDataError."""
    c, h, w = spec.input_shape
    given = x.shape
    if x.ndim == 3 and c == 1:
        x = x[:, None]
    elif x.ndim == 4 and x.shape[1:] != (c, h, w) and x.shape[1:] == (h, w, c):
        x = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    if x.ndim != 4 or x.shape[1:] != (c, h, w):
        accepted = f"(N, {c}, {h}, {w}) or (N, {h}, {w}, {c})" + (
            f" or (N, {h}, {w})" if c == 1 else "")
        raise _fail(path, f"'x' has shape {given}; dataset {spec.name!r} needs images of "
                          f"shape {accepted}")
    return torch.from_numpy(x)


def _from_arrays(path: Path, x: np.ndarray, y: np.ndarray, spec: DatasetSpec) -> ArrayDataset:
    """Samples and labels as the run's dataset stores them (raw values plus normalisation)."""
    if len(x) == 0:
        raise _fail(path, "holds no samples")
    labels = _check_labels(path, np.asarray(y), len(x), spec)
    if not spec.is_image:
        if x.ndim != 2 or x.shape[1:] != spec.input_shape:
            raise _fail(path, f"'x' has shape {x.shape}; dataset {spec.name!r} needs feature "
                              f"vectors of shape (N, {spec.input_shape[0]})")
        if not np.issubdtype(x.dtype, np.number) or not np.all(np.isfinite(x)):
            raise _fail(path, "'x' must hold finite numbers")
        return ArrayDataset(torch.from_numpy(x.astype(np.float32)), labels, mean=spec.mean,
                            std=spec.std)
    images = _image_tensor(path, x, spec)
    top = round(1 / spec.raw_scale)
    if np.issubdtype(x.dtype, np.integer):
        lo, hi = int(x.min()), int(x.max())
        if lo < 0 or hi > top:
            raise _fail(path, f"integer pixels must be the dataset's raw values 0..{top}, "
                              f"found {lo}..{hi}")
        return ArrayDataset(images.to(torch.uint8), labels, scale=spec.raw_scale,
                            mean=spec.mean, std=spec.std)
    if np.issubdtype(x.dtype, np.floating):
        if not np.all(np.isfinite(x)) or x.min() < 0 or x.max() > 1:
            raise _fail(path, f"floating pixels must lie in [0, 1] (found {x.min():.3g}.."
                              f"{x.max():.3g}); store raw values 0..{top} as uint8 instead")
        return ArrayDataset(images.to(torch.float32), labels, mean=spec.mean, std=spec.std)
    raise _fail(path, f"'x' has dtype {x.dtype}; expected uint8 pixels or floats")


def _read_npz(path: Path, spec: DatasetSpec) -> ArrayDataset:
    try:
        with np.load(path, allow_pickle=False) as arrays:
            names = set(arrays.files)
            if not {"x", "y"} <= names:
                raise _fail(path, f"an .npz needs arrays 'x' (samples) and 'y' (labels); "
                                  f"it holds {sorted(names) or 'none'}")
            x, y = arrays["x"], arrays["y"]
    except LocalDataError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise _fail(path, f"cannot be read as an .npz file ({type(exc).__name__}: {exc})"
                    ) from None
    return _from_arrays(path, x, y, spec)


def _read_torchvision(path: Path, loader: TorchvisionLoader) -> ArrayDataset:
    try:
        source = loader.read(path, download=False, key=f"data-path '{path}'")
    except ConfigError as exc:
        raise LocalDataError(str(exc)) from None
    train = source.train  # the test files are the server's central test set: never trained on
    return ArrayDataset(train.x, train.y, scale=train.scale, mean=train.mean, std=train.std)


def _read_image_folder(path: Path, spec: DatasetSpec) -> ArrayDataset:
    from PIL import Image, UnidentifiedImageError
    from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset

    classes = sorted(p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    k = spec.num_classes
    wrong = [c for c in classes if not (c.isdigit() and int(c) < k)]
    if wrong:
        raise _fail(path, f"class folder '{wrong[0]}' is not a label: name the class folders "
                          f"by their integer labels 0..{k - 1} (dataset {spec.name!r})")
    samples = make_dataset(str(path), {c: int(c) for c in classes}, extensions=IMG_EXTENSIONS,
                           allow_empty=True)
    if not samples:
        raise _fail(path, f"no image files ({', '.join(IMG_EXTENSIONS)}) in its class folders")
    c, h, w = spec.input_shape
    mode = "L" if c == 1 else "RGB"
    pixels = np.empty((len(samples), h, w, c), dtype=np.uint8)
    for i, (file, _) in enumerate(samples):
        try:
            with Image.open(file) as image:
                image = image.convert(mode)
                if image.size != (w, h):
                    image = image.resize((w, h), Image.BILINEAR)
                pixels[i] = np.asarray(image, dtype=np.uint8).reshape(h, w, c)
        except (OSError, UnidentifiedImageError) as exc:
            raise _fail(path, f"cannot read image '{file}' ({type(exc).__name__})") from None
    labels = torch.tensor([label for _, label in samples], dtype=torch.int64)
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()
    # Image files hold 8-bit values whatever the dataset stores (digits: 0..16).
    return ArrayDataset(x, labels, scale=1 / 255, mean=spec.mean, std=spec.std)


def read_local(path: str | Path, spec: DatasetSpec) -> ArrayDataset:
    """All samples at ``path`` for dataset ``spec`` (normalised as in simulation)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise _fail(path, "does not exist on this SuperNode")
    if path.is_file():
        if path.suffix.lower() != ".npz":
            raise _fail(path, "is a file but not an .npz; accepted: an .npz of arrays x and y, "
                              "a folder in torchvision's layout, or an image folder")
        return _read_npz(path, spec)
    if isinstance(spec.loader, TorchvisionLoader) and (path / spec.loader.folder).is_dir():
        return _read_torchvision(path, spec.loader)
    if any(p.is_dir() for p in path.iterdir()):
        if not spec.is_image:
            raise _fail(path, f"dataset {spec.name!r} holds feature vectors, not images: "
                              "give an .npz of arrays x and y")
        return _read_image_folder(path, spec)
    layout = (f" nor {spec.loader.folder}/ ({', '.join(spec.loader.files)})"
              if isinstance(spec.loader, TorchvisionLoader) else "")
    raise _fail(path, f"the folder holds no class subfolders 0..{spec.num_classes - 1}"
                      f"{layout}; accepted: an .npz of arrays x and y, a folder in "
                      "torchvision's layout, or an image folder")


@functools.lru_cache(maxsize=2)
def _split_local(path: str, mtime: int, dataset: str, val_fraction: float,
                 test_fraction: float, seed: int, partition_id: int) -> ClientData:
    spec = DATASETS.get(dataset)
    pool = read_local(path, spec)
    # Partition id 0 for everyone: the split depends only on the run's seed and the data.
    split = split_client(np.arange(len(pool)), val_fraction, test_fraction, seed, 0)
    if (len(split.train) == 0 or (val_fraction > 0 and len(split.val) == 0)
            or (test_fraction > 0 and len(split.test) == 0)):
        raise _fail(Path(path), f"{len(pool)} samples are too few: a client needs at least one "
                                "to train on and one each for the val-fraction and "
                                "test-fraction hold-outs")

    def take(idx: np.ndarray) -> Split:
        t = torch.from_numpy(idx)
        return Split(pool.inputs(t), pool.labels(t))

    return ClientData(partition_id, take(split.train), take(split.val), take(split.test))


def local_client_data(path: str | Path, cfg: RunConfig, partition_id: int = -1) -> ClientData:
    """The client's train / validation / test splits of the data at ``path``, for ``cfg``'s
    dataset; cached per process. ``partition_id``: the node's own id if it has one, else -1."""
    p = Path(path).expanduser()
    mtime = p.stat().st_mtime_ns if p.exists() else 0
    return _split_local(str(p), mtime, cfg.dataset, cfg.val_fraction, cfg.test_fraction,
                        cfg.seed, partition_id)


def client_stats(data: ClientData, num_classes: int) -> dict:
    """Split sizes and label counts of one client's data (what it reports; never samples)."""
    labels = torch.cat([data.train.y, data.val.y, data.test.y]).numpy()
    return {
        "partition-id": data.partition_id,
        "num-train": len(data.train), "num-val": len(data.val), "num-test": len(data.test),
        "label-counts": label_counts(labels, np.arange(len(labels)), num_classes),
    }
