"""Figures of a run directory (``fedtl plot DIR [DIR ...]``).

- ``accuracy.png``: pooled test accuracy per round, global against personalized (and the
  central test set where the dataset has one, and any other split a trainer reports, such
  as domain adaptation's source test split); dotted lines mark where a phase begins;
- ``clients.png``: the per-client accuracy distribution of the last evaluated round;
- ``partition.png``: the partition's label matrix (samples of each label on each client);
- ``synthetic.png``: for data-free distillation with ``synthetic-dir``, what the clients
  synthesised.

With several directories, ``compare-accuracy.png`` overlays their curves.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from fedtl.results import RunDirectory  # noqa: E402

CURVES = (("global_accuracy", "global (clients' test splits, pooled)", "-"),
          ("personalized_accuracy", "personalized (clients' test splits, pooled)", "--"),
          ("centralized_accuracy", "global (central test set)", ":"))


def _curves(rounds: list[dict]) -> list[tuple[str, str, str]]:
    """CURVES, then any other test accuracy a trainer reported (e.g. ``probe_accuracy`` on
    the central test set, ``knn_global_accuracy`` on the clients' test splits)."""
    known = [key for key, _, _ in CURVES]
    extra = sorted({k for r in rounds for k in r if k.endswith("_accuracy") and k not in known
                    and "_val_" not in k})

    def series(key: str) -> list:
        return [r.get(key) for r in rounds]

    extra = [k for k in extra if all(series(k) != series(c) for c in known)]  # no aliases
    return [*CURVES, *((k, k.removesuffix("_accuracy").replace("_", " "), "-.") for k in extra)]


def _evaluated(run: RunDirectory) -> list[dict]:
    return [r for r in run.rounds() if r.get("evaluated")]


def _title(run: RunDirectory) -> str:
    try:
        c = run.config()
    except (OSError, ValueError):
        return run.path.name
    shift = f" -> {c['target-dataset']}" if c.get("target-dataset") else ""
    return (f"{c.get('strategy')} / {c.get('trainer')} on {c.get('dataset')}{shift} "
            f"({c.get('partitioner')}, {c.get('num-clients')} clients, {c.get('model')})")


def plot_accuracy(run: RunDirectory, out: Path) -> Path | None:
    rounds = _evaluated(run)
    if not rounds:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.2))
    try:
        target = run.config().get("target-dataset")
    except (OSError, ValueError):
        target = None
    known = {key for key, _, _ in CURVES}
    for key, label, style in _curves(rounds):
        if target and key in known:  # domain adaptation: the headline splits are the target's
            label = f"{label} on target {target}"
        pts = [(r["round"], r[key]) for r in rounds if r.get(key) is not None]
        if pts:
            x, y = zip(*pts)
            ax.plot(x, y, style, marker="o" if len(pts) < 30 else None, ms=3, label=label)
    all_rounds = run.rounds()
    for prev, r in itertools.pairwise(all_rounds):  # where a multi-phase trainer moves on
        if r.get("phase") != prev.get("phase"):
            ax.axvline(r["round"] - 0.5, color="grey", lw=0.8, ls=":")
            ax.annotate(r["phase"], (r["round"] - 0.5, 0.02), fontsize=7, color="grey",
                        xycoords=("data", "axes fraction"))
    ax.set_xlabel("round")
    ax.set_ylabel("accuracy")
    ax.set_title(_title(run), fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def plot_clients(run: RunDirectory, out: Path) -> Path | None:
    rows = [r for r in run.table("clients.csv") if r.get("test_global_accuracy") not in ("", None)]
    if not rows:
        return None
    g = np.array([float(r["test_global_accuracy"]) for r in rows])
    p = np.array([float(r["test_personalized_accuracy"]) for r in rows])
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    bins = np.linspace(0, 1, 21)
    a1.hist(g, bins=bins, alpha=0.6, label=f"global (mean {g.mean():.3f})")
    a1.hist(p, bins=bins, alpha=0.6, label=f"personalized (mean {p.mean():.3f})")
    a1.set_xlabel("client test accuracy")
    a1.set_ylabel("clients")
    a1.legend(fontsize=8)
    a1.set_title("per-client accuracy, last evaluated round", fontsize=9)
    a2.scatter(g, p, s=14)
    a2.plot([0, 1], [0, 1], "k:", lw=1)
    a2.set_xlabel("global model")
    a2.set_ylabel("personalized model")
    a2.set_xlim(0, 1.02)
    a2.set_ylim(0, 1.02)
    a2.set_title("each client: above the diagonal, personalization helps", fontsize=9)
    fig.suptitle(_title(run), fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def plot_partition(run: RunDirectory, out: Path) -> Path | None:
    rows = run.table("partition.csv")
    if not rows:
        return None
    label_cols = sorted((k for k in rows[0] if k.startswith("label-")),
                        key=lambda k: int(k.split("-")[1]))
    counts = np.array([[int(r[k]) for k in label_cols] for r in rows])
    fig, ax = plt.subplots(figsize=(max(5, 0.45 * len(label_cols) + 2),
                                    min(12, 1.5 + 0.22 * len(rows))))
    im = ax.imshow(counts, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xlabel("label")
    ax.set_ylabel("client (partition id)")
    ax.set_xticks(range(len(label_cols)), [k.split("-")[1] for k in label_cols])
    fig.colorbar(im, ax=ax, label="samples")
    ax.set_title(f"partition: {len(rows)} clients, {counts.sum()} samples", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def _plot_synthetic(run: RunDirectory, out: Path) -> Path | None:
    """``synthetic.png`` from the previews data-free clients wrote (``synthetic-dir``)."""
    from fedtl.synthetic import plot_synthetic, preview_dir

    try:
        folder = preview_dir(run.config())
    except (OSError, ValueError):
        return None
    return None if folder is None else plot_synthetic(folder, out / "synthetic.png", _title(run))


def plot_run(path: str | Path) -> list[Path]:
    """Draw a run directory's figures into its ``plots/`` folder; returns the files."""
    run = RunDirectory(path)
    out = run.path / "plots"
    out.mkdir(exist_ok=True)
    made = [plot_accuracy(run, out / "accuracy.png"), plot_clients(run, out / "clients.png"),
            plot_partition(run, out / "partition.png"), _plot_synthetic(run, out)]
    return [p for p in made if p is not None]


def plot_compare(paths: list[str | Path], out: Path) -> Path:
    """Overlay the pooled accuracy curves of several runs."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for path in paths:
        run = RunDirectory(path)
        rounds = _evaluated(run)
        for ax, key in zip(axes, ("global_accuracy", "personalized_accuracy")):
            pts = [(r["round"], r[key]) for r in rounds if r.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), label=run.path.name)
    for ax, name in zip(axes, ("global model", "personalized model")):
        ax.set_title(f"{name}: clients' test splits, pooled", fontsize=9)
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
