"""Synthetic transfer sets made by data-free trainers: previews on disk and their image grid.

A data-free client's transfer set never leaves it. When ``synthetic-dir`` is set, each
client also writes a small preview of what it synthesised (``client-<id>.pt``: up to
``PREVIEW`` samples as images in [0, 1] with the teacher's predicted class) into that folder
on its own machine; ``fedtl plot RUN`` draws ``plots/synthetic.png`` from the previews of
the run's clients when they are visible from where it runs (always in simulation).
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedtl.config import RunConfig

PREVIEW = 40  # samples per client kept for the grid


def preview_dir(cfg: RunConfig | dict[str, Any]) -> Path | None:
    """The folder of the previews, or None when previews are off."""
    folder = cfg.get("synthetic-dir", "")
    return Path(folder).expanduser() if folder else None


def save_preview(cfg: RunConfig, partition_id: int, method: str, x: torch.Tensor,
                 teacher: nn.Module) -> Path | None:
    """Write up to ``PREVIEW`` of ``x`` (normalised inputs), sorted by the teacher's class,
    to ``synthetic-dir/client-<id>.pt``; returns the file, or None when previews are off."""
    from fedtl.clients.trainers.data_free import input_range

    folder = preview_dir(cfg)
    if folder is None or x.dim() != 4:
        return None
    # a strided pick over the whole set: transfer sets are stored class by class
    x = x[torch.linspace(0, len(x) - 1, min(len(x), PREVIEW * 4)).long()].detach()
    with torch.no_grad():
        labels = teacher(x).argmax(1).cpu()
    x = x.cpu()
    # spread the preview over the predicted classes, a few samples of each
    classes = labels.unique()
    per = -(-PREVIEW // len(classes))
    order = torch.cat([(labels == c).nonzero().flatten()[:per] for c in classes])[:PREVIEW]
    lo, hi = input_range(cfg)
    images = ((x[order] - lo) / (hi - lo)).clamp(0, 1)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"client-{partition_id}.pt"
    buf = io.BytesIO()
    torch.save({"method": method, "images": images, "labels": labels[order]}, buf)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, path)  # a reader never sees half a file
    return path


def load_previews(folder: Path) -> list[tuple[int, dict]]:
    """(client id, preview) for every preview file in ``folder``, by client id."""
    out = []
    for path in folder.glob("client-*.pt"):
        try:
            pid = int(path.stem.split("-", 1)[1])
            out.append((pid, torch.load(path, map_location="cpu", weights_only=True)))
        except (ValueError, RuntimeError, OSError):
            continue
    return sorted(out, key=lambda item: item[0])


def plot_synthetic(folder: Path, out: Path, title: str = "") -> Path | None:
    """One row of synthetic samples per client (up to 10 clients), labelled with the
    teacher's class; None when ``folder`` holds no previews."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    previews = load_previews(folder)[:10] if folder.is_dir() else []
    if not previews:
        return None
    cols = min(20, max(len(p["images"]) for _, p in previews))
    fig, axes = plt.subplots(len(previews), cols, figsize=(cols * 0.6, len(previews) * 0.75 + 0.5),
                             squeeze=False)
    for row, (pid, p) in zip(axes, previews):
        images, labels = p["images"], p["labels"]
        step = max(1, len(images) // cols)
        for k, ax in enumerate(row):
            ax.axis("off")
            i = k * step
            if i >= len(images):
                continue
            img = images[i]
            if img.shape[0] == 1:
                ax.imshow(img[0].numpy(), cmap="gray", vmin=0, vmax=1)
            else:
                ax.imshow(img[:3].permute(1, 2, 0).numpy())
            ax.set_title(str(int(labels[i])), fontsize=6, pad=1)
        row[0].text(-0.3, 0.5, f"client {pid}", transform=row[0].transAxes, fontsize=6,
                    ha="right", va="center")
    method = previews[0][1].get("method", "synthetic")
    fig.suptitle(f"{method}: synthetic samples per client (teacher's class above each)"
                 + (f"\n{title}" if title else ""), fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
