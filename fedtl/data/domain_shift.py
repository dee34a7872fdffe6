"""Domain-shift data: target domains built offline, and a source/target pair across clients.

Datasets added here (registered in ``fedtl.registry``):

- ``mnist-m``: MNIST-M built the way Ganin & Lempitsky built it: each MNIST digit is
  binarised and blended with a random 28x28 crop of a colour photo as |photo - digit| per
  channel. Photos come from ``photo-dir`` or, by default, from the photos scikit-learn ships
  and scikit-image's bundled colour photos (scikit-image is a dependency; without it only
  scikit-learn's two are used). Deterministic from ``seed``.
- ``digits-m``: the same recipe on scikit-learn's 8x8 digits upsampled to 28x28 (no files).
- ``digits-28``: scikit-learn's 8x8 digits laid out the way MNIST's are: the ink's bounding
  box scaled to fit 20x20, placed by its centre of mass in a 28x28 frame (no files).
- ``usps``, ``svhn``: read with torchvision from ``data-dir`` (torchvision's layout).

A domain-adaptation run (``target-dataset`` set) pairs the source ``dataset`` with the target
domain. Both are shown to the model in one shared input shape: the larger height/width of the
two (bilinear upsampling of the smaller one) and the larger channel count (grey images repeat
their channel), both scaled to [0, 1] and normalised with mean 0.5 / std 0.5 per channel, so
that no statistic of either domain leaks into the other's preprocessing.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fedtl.config import ConfigError, RunConfig
from fedtl.data import CachedClients, ClientData, ClientStatsOnce, Split
from fedtl.data.datasets import ArrayDataset, DatasetSpec, Source
from fedtl.data.partition import ClientSplit, iid_partition, label_counts, split_client
from fedtl.registry import DATASETS, PARTITIONERS, TRAINERS

CROP = 28  # MNIST-M's crop side, in pixels
PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
SCENARIOS = ("shared-target", "split", "domain-per-client")


# --- photos ---------------------------------------------------------------------------------

def _check_photo(photo: np.ndarray, name: str) -> np.ndarray:
    if photo.ndim != 3 or photo.shape[2] != 3 or min(photo.shape[:2]) < CROP:
        raise ConfigError(
            f"config key 'photo-dir': {name} is not a colour photo of at least {CROP}x{CROP} "
            f"pixels (shape {photo.shape})"
        )
    return np.ascontiguousarray(photo, dtype=np.uint8)


def _bundled_photos() -> list[np.ndarray]:
    """scikit-learn's two sample photos, and scikit-image's bundled colour photos if installed."""
    from sklearn.datasets import load_sample_images

    photos = [np.asarray(p, dtype=np.uint8) for p in load_sample_images().images]
    try:
        import skimage.data as skd
    except ImportError:
        return photos
    for name in ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry"):
        try:  # newer scikit-image fetches some images on demand: use only what is on disk
            img = np.asarray(getattr(skd, name)())
        except Exception:  # noqa: BLE001, S112 (any failure: that photo is not available)
            continue
        if img.ndim == 3 and img.shape[2] == 3 and min(img.shape[:2]) >= CROP:
            photos.append(img.astype(np.uint8))
    return photos


@functools.lru_cache(maxsize=2)
def load_photos(photo_dir: str = "") -> tuple[np.ndarray, ...]:
    """The colour photos MNIST-M crops from, as (H, W, 3) uint8 arrays in file-name order.

    ``photo_dir`` empty: the photos that ship with scikit-learn (and scikit-image). Otherwise
    every image file directly in that folder; raises ConfigError if there is none.
    """
    if not photo_dir:
        return tuple(_bundled_photos())
    from PIL import Image

    folder = Path(photo_dir).expanduser()
    if not folder.is_dir():
        raise ConfigError(f"config key 'photo-dir' = {photo_dir!r}: not a folder")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in PHOTO_SUFFIXES)
    if not files:
        raise ConfigError(
            f"config key 'photo-dir' = {photo_dir!r}: no images in it (accepted: "
            f"{', '.join(PHOTO_SUFFIXES)})"
        )
    photos = []
    for path in files:
        try:
            with Image.open(path) as img:
                photos.append(_check_photo(np.asarray(img.convert("RGB")), path.name))
        except OSError as exc:
            raise ConfigError(f"config key 'photo-dir': cannot read {path} ({exc})") from None
    return tuple(photos)


# --- MNIST-M ------------------------------------------------------------------------------

def blend_with_photos(digits: np.ndarray, photos: Sequence[np.ndarray], rng: np.random.Generator,
                      threshold: int = 0, chunk: int = 8192) -> np.ndarray:
    """MNIST-M's recipe: |random 28x28 photo crop - binarised digit|, per colour channel.

    ``digits`` is (N, 28, 28) uint8; a pixel is ink (255) when its value exceeds ``threshold``
    (0 as in the common MNIST-M script, which binarises with ``x > 0``), else 0. Each image
    takes a photo uniformly at random and a crop position uniformly over the photo. Returns
    (N, 3, 28, 28) uint8. The same ``rng`` state gives the same images.
    """
    digits = np.asarray(digits)
    if digits.ndim != 3 or digits.shape[1:] != (CROP, CROP):
        raise ValueError(f"digits must be (N, {CROP}, {CROP}); got {digits.shape}")
    if not photos:
        raise ValueError("at least one photo is needed")
    n = len(digits)
    which = rng.integers(0, len(photos), n)
    top = np.empty(n, dtype=np.int64)
    left = np.empty(n, dtype=np.int64)
    for k, photo in enumerate(photos):
        sel = which == k
        top[sel] = rng.integers(0, photo.shape[0] - CROP + 1, int(sel.sum()))
        left[sel] = rng.integers(0, photo.shape[1] - CROP + 1, int(sel.sum()))
    out = np.empty((n, 3, CROP, CROP), dtype=np.uint8)
    offsets = np.arange(CROP)
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        ink = np.where(digits[start:stop] > threshold, 255, 0).astype(np.int16)[..., None]
        patches = np.empty((stop - start, CROP, CROP, 3), dtype=np.int16)
        for k, photo in enumerate(photos):
            sel = np.flatnonzero(which[start:stop] == k)
            if sel.size == 0:
                continue
            rows = (top[start + sel][:, None] + offsets)[:, :, None]
            cols = (left[start + sel][:, None] + offsets)[:, None, :]
            patches[sel] = photo[rows, cols]
        out[start:stop] = np.abs(patches - ink).astype(np.uint8).transpose(0, 3, 1, 2)
    return out


def resize_images(x: torch.Tensor, size: int, scale: float = 1.0) -> torch.Tensor:
    """uint8 (N, C, h, w) images with values in [0, 1/scale] to (N, C, size, size) uint8 in
    [0, 255], bilinear (the 8x8 digits become 28x28 this way)."""
    f = x.to(torch.float32) * (255.0 * scale)
    if f.shape[-2:] != (size, size):
        f = F.interpolate(f, size=(size, size), mode="bilinear", align_corners=False)
    return f.round().clamp(0, 255).to(torch.uint8)


# The domain datasets' own normalisation, declared in their specs: [0, 1] pixels to [-1, 1], the
# same for every split, every photo-dir and a SuperNode's own files (statistics measured on
# the data would differ between them, and a test split must not set its own).
HALF_RGB = {"raw_scale": 1 / 255, "mean": (0.5,) * 3, "std": (0.5,) * 3}
HALF_GREY = {"raw_scale": 1 / 255, "mean": (0.5,), "std": (0.5,)}


def _blended(digits: torch.Tensor, labels: torch.Tensor, photos, seed: int, stream: int,
             threshold: int) -> ArrayDataset:
    rng = np.random.default_rng([seed, 0x4D4E4D, stream])
    x = torch.from_numpy(blend_with_photos(digits[:, 0].numpy(), photos, rng, threshold))
    return ArrayDataset(x, labels.clone(), scale=1 / 255, mean=HALF_RGB["mean"],
                        std=HALF_RGB["std"])


def _load_mnist_m(cfg: RunConfig) -> Source:
    mnist = DATASETS.get("mnist").load(cfg)
    photos = load_photos(cfg.photo_dir)
    train = _blended(mnist.train.x, mnist.train.y, photos, cfg.seed, 0, threshold=0)
    test = _blended(mnist.test.x, mnist.test.y, photos, cfg.seed, 1, threshold=0)
    return Source(train, test)


def _load_digits_m(cfg: RunConfig) -> Source:
    digits = DATASETS.get("digits").load(cfg).train
    up = resize_images(digits.x, CROP, digits.scale)
    # Bilinear upsampling greys the strokes' edges: binarise at mid-grey, not at > 0.
    return Source(_blended(up, digits.y, load_photos(cfg.photo_dir), cfg.seed, 2, 127), None)


def mnist_layout(images: torch.Tensor, scale: float, box: int = 20,
                 side: int = CROP) -> torch.Tensor:
    """Grey uint8 (N, 1, h, w) images with values in [0, 1/scale], laid out as MNIST's
    digits were: the ink's bounding box scaled (bilinear, aspect ratio kept) so its longer
    side is ``box`` pixels, then placed in a ``side`` x ``side`` frame with its centre of mass
    at the frame's centre. Returns uint8 (N, 1, side, side) in [0, 255].

    Shown in 28x28 by plain upsampling instead, the 8x8 digits fill the whole frame, while
    MNIST's span a 20-pixel box: a change of scale on top of the change of writers and
    resolution, which a network trained on one does not undo on the other.
    """
    out = torch.zeros((images.shape[0], 1, side, side), dtype=torch.float32)
    grid = torch.arange(side, dtype=torch.float32)
    for i, image in enumerate(images[:, 0].to(torch.float32) * scale):
        rows = torch.nonzero(image.sum(1) > 0).flatten()
        cols = torch.nonzero(image.sum(0) > 0).flatten()
        if rows.numel() == 0:
            continue  # a blank image stays blank
        ink = image[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
        h, w = ink.shape
        factor = box / max(h, w)
        size = (max(1, round(h * factor)), max(1, round(w * factor)))
        ink = F.interpolate(ink[None, None], size=size, mode="bilinear",
                            align_corners=False)[0, 0].clamp(0, 1)
        mass = ink.sum()
        cy = (ink.sum(1) * grid[:size[0]]).sum() / mass
        cx = (ink.sum(0) * grid[:size[1]]).sum() / mass
        # top-left corner that puts the centre of mass at the frame's centre, kept inside it
        top = min(max(round((side - 1) / 2 - cy.item()), 0), side - size[0])
        left = min(max(round((side - 1) / 2 - cx.item()), 0), side - size[1])
        out[i, 0, top:top + size[0], left:left + size[1]] = ink
    return (out * 255).round().to(torch.uint8)


def _load_digits_28(cfg: RunConfig) -> Source:
    digits = DATASETS.get("digits").load(cfg).train
    x = mnist_layout(digits.x, digits.scale)
    return Source(ArrayDataset(x, digits.y.clone(), scale=1 / 255, mean=HALF_GREY["mean"],
                               std=HALF_GREY["std"]), None)


MNIST_M = DatasetSpec("mnist-m", 10, (3, CROP, CROP), 60000, True, _load_mnist_m, **HALF_RGB)
DIGITS_M = DatasetSpec("digits-m", 10, (3, CROP, CROP), 1797, False, _load_digits_m, **HALF_RGB)
DIGITS_28 = DatasetSpec("digits-28", 10, (1, CROP, CROP), 1797, False, _load_digits_28,
                        **HALF_GREY)


# --- USPS and SVHN through torchvision ----------------------------------------------------

def _torchvision_split(name: str, files: dict[str, str], read, norm: dict):
    """A loader for a torchvision dataset whose files sit directly in data-dir."""

    def load(cfg: RunConfig) -> Source:
        root = Path(cfg.data_dir).expanduser()
        missing = [f for f in files.values() if not (root / f).exists()]
        try:
            parts = {split: read(str(root), split, bool(missing)) for split in files}
        except Exception as exc:  # noqa: BLE001 (torchvision: RuntimeError, URLError, OSError)
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0].rstrip(":")
            if missing:
                raise ConfigError(
                    f"config key 'data-dir' = {cfg.data_dir!r}: no {name} files in {root} "
                    f"(torchvision's layout: {', '.join(missing)}) and the download failed "
                    f"({reason}). Put them in data-dir, or run once with internet access"
                ) from None
            raise ConfigError(
                f"config key 'data-dir' = {cfg.data_dir!r}: the {name} files in {root} cannot "
                f"be read ({type(exc).__name__}: {reason})"
            ) from None
        out = {}
        for split, (x, y) in parts.items():
            x = torch.as_tensor(np.asarray(x), dtype=torch.uint8)
            x = x.unsqueeze(1) if x.dim() == 3 else x
            out[split] = ArrayDataset(x, torch.as_tensor(np.asarray(y), dtype=torch.int64),
                                      scale=1 / 255, mean=norm["mean"], std=norm["std"])
        return Source(out["train"], out["test"])

    return load


def _read_usps(root: str, split: str, download: bool):
    from torchvision.datasets import USPS as TorchUSPS

    ds = TorchUSPS(root=root, train=split == "train", download=download)
    return ds.data, ds.targets


def _read_svhn(root: str, split: str, download: bool):
    from torchvision.datasets import SVHN as TorchSVHN

    ds = TorchSVHN(root=root, split=split, download=download)
    return ds.data, ds.labels  # (N, 3, 32, 32); torchvision maps label 10 to digit 0


USPS = DatasetSpec("usps", 10, (1, 16, 16), 7291, True, _torchvision_split(
    "USPS", {"train": "usps.bz2", "test": "usps.t.bz2"}, _read_usps, HALF_GREY), **HALF_GREY)
SVHN = DatasetSpec("svhn", 10, (3, 32, 32), 73257, True, _torchvision_split(
    "SVHN", {"train": "train_32x32.mat", "test": "test_32x32.mat"}, _read_svhn, HALF_RGB),
    **HALF_RGB)


# --- a source and a target domain in one input shape ------------------------------------------

@dataclass
class SharedShapeDataset(ArrayDataset):
    """A domain's images shown in the pair's shared shape (C, H, W), normalised to [-1, 1]."""

    shape: tuple[int, int, int] = (1, 28, 28)

    def inputs(self, idx: torch.Tensor | slice | None = None) -> torch.Tensor:
        x = self.x if idx is None else self.x[idx]
        c, h, w = self.shape
        if x.shape[0] == 0:
            return torch.zeros((0, c, h, w))
        x = x.to(torch.float32) * self.scale
        if x.shape[-2:] != (h, w):
            x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
        if x.shape[1] != c:  # grey shown as colour: the one channel repeated
            x = x.expand(-1, c, -1, -1)
        return (x - 0.5) / 0.5


def shared_shape(a: DatasetSpec, b: DatasetSpec) -> tuple[int, int, int]:
    """The input shape both domains are shown in: larger channel count, larger side."""
    return (max(a.input_shape[0], b.input_shape[0]), max(a.input_shape[1], b.input_shape[1]),
            max(a.input_shape[2], b.input_shape[2]))


@functools.lru_cache(maxsize=4)
def _load_domain(name: str, data_dir: str, photo_dir: str, seed: int) -> Source:
    from fedtl.config import make_config

    cfg = make_config({"dataset": name, "data-dir": data_dir, "photo-dir": photo_dir,
                       "seed": seed})
    return DATASETS.get(name).load(cfg)


def load_domain(name: str, cfg: RunConfig, shape: tuple[int, int, int]) -> Source:
    """Dataset ``name`` (loaded once per process) shown in ``shape``."""
    raw = _load_domain(name, cfg.data_dir, cfg.photo_dir, cfg.seed)

    def view(ds: ArrayDataset | None) -> SharedShapeDataset | None:
        return None if ds is None else SharedShapeDataset(ds.x, ds.y, scale=ds.scale,
                                                          mean=(0.5,), std=(0.5,), shape=shape)

    return Source(view(raw.train), view(raw.test))


@functools.lru_cache(maxsize=8)
def pair_spec(source: str, target: str) -> DatasetSpec:
    """The spec of a source -> target pair: the shared input shape; ``load`` gives the target
    domain in it (its test set is the run's central test set)."""
    s, t = DATASETS.get(source), DATASETS.get(target)
    shape = shared_shape(s, t)

    def load(cfg: RunConfig) -> Source:
        return load_domain(target, cfg, shape)

    return DatasetSpec(f"{source}->{target}", s.num_classes, shape, None, t.has_central_test,
                       load)


# --- who holds which domain -------------------------------------------------------------------

@dataclass(frozen=True)
class DomainClientData(ClientData):
    """A client's data in a domain-adaptation run.

    ``train`` / ``val`` / ``test`` are its labelled SOURCE splits, ``target_*`` its target
    splits. Target labels are read only by the target-oracle trainer and by evaluation.
    Either domain may be empty (``split`` and ``domain-per-client`` scenarios).
    """

    target_train: Split
    target_val: Split
    target_test: Split


_EMPTY = np.empty(0, dtype=np.int64)


def follow_label_skew(source_parts: list[np.ndarray], source_labels: np.ndarray,
                      target_labels: np.ndarray, num_classes: int, seed: int) -> list[np.ndarray]:
    """Deal the target samples to clients in the proportions of their source labels.

    For each class, the target samples are shuffled (from ``seed``) and cut among clients in
    proportion to how many source samples of that class each client holds, so every client's
    target data has its source data's label skew.
    """
    rng = np.random.default_rng([seed, 0x7A6E7])
    counts = np.stack([np.bincount(source_labels[p], minlength=num_classes)
                       for p in source_parts])  # clients x classes
    parts: list[list[np.ndarray]] = [[] for _ in source_parts]
    for c in range(num_classes):
        pool = rng.permutation(np.flatnonzero(target_labels == c))
        held = counts[:, c]
        if held.sum() == 0:
            continue  # the partitioner gave this class to no client
        cuts = np.round(np.cumsum(held) / held.sum() * len(pool)).astype(int)
        for i, (lo, hi) in enumerate(zip(np.concatenate([[0], cuts[:-1]]), cuts)):
            parts[i].append(pool[lo:hi])
    return [np.sort(np.concatenate(p)) if p else _EMPTY for p in parts]


def target_client_count(num_clients: int, share: float) -> int:
    """Clients that hold the target domain in the split / domain-per-client scenarios."""
    return min(num_clients - 1, max(1, round(num_clients * share)))


def scenario_parts(cfg: RunConfig, source_labels: np.ndarray, target_labels: np.ndarray,
                   num_classes: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Source and target indices of every client under ``da-scenario``.

    - shared-target: the partitioner splits the source; the target follows each client's
      source label proportions (every client holds both domains);
    - split: the first clients hold only source data, the last ``target-client-share`` only
      target data; the partitioner splits each domain among its clients (label skew);
    - domain-per-client: as split, but each domain is split IID among its clients (feature
      skew only, as in FedBN's digit benchmark); the partitioner is not used.
    """
    n = cfg.num_clients
    partition = PARTITIONERS.get(cfg.partitioner)
    if cfg.da_scenario == "shared-target":
        src = partition(source_labels, n, cfg, None)
        return src, follow_label_skew(src, source_labels, target_labels, num_classes, cfg.seed)
    n_target = target_client_count(n, cfg.target_client_share)
    n_source = n - n_target
    if cfg.da_scenario == "domain-per-client":
        partition = iid_partition
    src = partition(source_labels, n_source, cfg, None)
    tgt = partition(target_labels, n_target, cfg.replace(seed=cfg.seed + 1), None)
    return src + [_EMPTY] * n_target, [_EMPTY] * n_source + tgt


@dataclass
class DomainAdaptationData(ClientStatsOnce, CachedClients):
    """A source and a target domain spread across clients (``FederatedData``'s interface)."""

    spec: DatasetSpec
    source: Source
    target: Source
    source_splits: list[ClientSplit]
    target_splits: list[ClientSplit]

    @property
    def num_clients(self) -> int:
        return len(self.source_splits)

    def _materialise(self, partition_id: int) -> DomainClientData:
        """Client ``partition_id``'s source and target splits, as tensors in the shared shape
        (``client(pid)``)."""
        if not 0 <= partition_id < self.num_clients:
            raise ValueError(f"partition-id {partition_id} is outside 0..{self.num_clients - 1}")

        def take(pool: ArrayDataset, idx: np.ndarray) -> Split:
            t = torch.from_numpy(idx)
            return Split(pool.inputs(t), pool.labels(t))

        s, t = self.source_splits[partition_id], self.target_splits[partition_id]
        src, tgt = self.source.train, self.target.train
        return DomainClientData(partition_id, take(src, s.train), take(src, s.val),
                                take(src, s.test), take(tgt, t.train), take(tgt, t.val),
                                take(tgt, t.test))

    def central_test(self) -> Split | None:
        """The target domain's own test set (None where it has none)."""
        test = self.target.test
        return None if test is None else Split(test.inputs(), test.labels())

    def client_stats(self) -> list[dict]:
        """Per client: source split sizes and label counts, then the same for the target."""
        k = self.spec.num_classes
        ys, yt = self.source.train.y.numpy(), self.target.train.y.numpy()
        out = []
        for pid, (s, t) in enumerate(zip(self.source_splits, self.target_splits)):
            out.append({
                "partition-id": pid, "num-train": len(s.train), "num-val": len(s.val),
                "num-test": len(s.test),
                "label-counts": label_counts(ys, np.concatenate([s.train, s.val, s.test]), k),
                "num-target-train": len(t.train), "num-target-val": len(t.val),
                "num-target-test": len(t.test),
                "target-label-counts": label_counts(yt, np.concatenate([t.train, t.val, t.test]),
                                                    k),
            })
        return out


def check_domain_adaptation(cfg: RunConfig) -> None:
    """Static checks of a domain-adaptation config (no loading). Raises ConfigError."""
    trainer = TRAINERS.get(cfg.trainer)
    needs = getattr(trainer, "needs_target", False)
    if needs and not cfg.target_dataset:
        raise ConfigError(
            f"config key 'trainer' = {cfg.trainer!r} adapts to a target domain: set "
            "'target-dataset' (e.g. --set target-dataset=mnist-m)"
        )
    if cfg.target_dataset and not needs:
        accepted = ", ".join(n for n in TRAINERS if getattr(TRAINERS.get(n), "needs_target",
                                                            False))
        raise ConfigError(
            f"config key 'target-dataset' = {cfg.target_dataset!r} is read only by the "
            f"domain-adaptation trainers ({accepted}), not by trainer {cfg.trainer!r}"
        )
    if not cfg.target_dataset:
        return
    s, t = DATASETS.get(cfg.dataset), DATASETS.get(cfg.target_dataset)
    for key, spec in (("dataset", s), ("target-dataset", t)):
        if not spec.is_image:
            raise ConfigError(
                f"config key '{key}' = {spec.name!r}: domain adaptation pairs image datasets "
                "(digits, mnist, mnist-m, digits-m, usps, svhn, ...)"
            )
    if s.num_classes != t.num_classes:
        raise ConfigError(
            f"config key 'target-dataset' = {t.name!r} has {t.num_classes} classes but the "
            f"source {s.name!r} has {s.num_classes}; domain adaptation needs the same labels"
        )
    if cfg.da_scenario != "shared-target" and cfg.num_clients < 2:
        raise ConfigError(
            f"config key 'da-scenario' = {cfg.da_scenario!r} puts the domains on different "
            f"clients: it needs num-clients >= 2 (got {cfg.num_clients})"
        )
    if cfg.partitioner == "natural":
        raise ConfigError("config key 'partitioner' = 'natural': the domain-adaptation "
                          "datasets have no natural clients. Accepted: iid, dirichlet, "
                          "pathological, shard, quantity-skew")


def build_domain_adaptation(cfg: RunConfig) -> DomainAdaptationData:
    """Load both domains in their shared shape and give every client its splits of each."""
    spec = pair_spec(cfg.dataset, cfg.target_dataset)
    source = load_domain(cfg.dataset, cfg, spec.input_shape)
    target = load_domain(cfg.target_dataset, cfg, spec.input_shape)
    src_parts, tgt_parts = scenario_parts(cfg, source.train.y.numpy(), target.train.y.numpy(),
                                          spec.num_classes)
    n = cfg.num_clients
    src = [split_client(p, cfg.val_fraction, cfg.test_fraction, cfg.seed, pid)
           for pid, p in enumerate(src_parts)]
    tgt = [split_client(p, cfg.val_fraction, cfg.test_fraction, cfg.seed, n + pid)
           for pid, p in enumerate(tgt_parts)]
    for pid, (s, t) in enumerate(zip(src, tgt)):
        holds_source, holds_target = len(src_parts[pid]) > 0, len(tgt_parts[pid]) > 0
        if (holds_source and len(s.train) == 0) or (holds_target and len(t.train) == 0) or \
                (cfg.da_scenario == "shared-target" and not (holds_source and holds_target)):
            raise ConfigError(
                f"client {pid} got {s.size} source and {t.size} target samples in scenario "
                f"{cfg.da_scenario!r}, leaving a domain with nothing to train on: use fewer "
                "clients, a larger alpha or min-partition-size, or smaller val-fraction / "
                "test-fraction"
            )
    return DomainAdaptationData(spec, source, target, src, tgt)
