"""The bench report's figures (PNG): accuracy per round, per-client scatter, heterogeneity sweep.

Each function takes plain numbers gathered by ``fedtl.bench.report`` and writes one file.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

COLORS = plt.rcParams["axes.prop_cycle"].by_key()["color"]


def _mean_band(series: Sequence[Sequence[tuple[int, float | None]]]
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Mean and std over seeds of per-round values, on the rounds every seed evaluated."""
    by_round: dict[int, list[float]] = {}
    for points in series:
        for rnd, value in points:
            if value is not None:
                by_round.setdefault(rnd, []).append(value)
    rounds = sorted(r for r, v in by_round.items() if len(v) == len(series))
    if not rounds:
        return None
    values = [np.asarray(by_round[r]) for r in rounds]
    return (np.asarray(rounds), np.asarray([v.mean() for v in values]),
            np.asarray([v.std() for v in values]))


def accuracy_curves(title: str, curves: Mapping[str, Mapping[str, list[list[tuple[int, float]]]]],
                    out: Path) -> Path:
    """One panel per method: pooled test accuracy per round of the global and the personalized
    model (mean over seeds, band = std over seeds). ``curves[method][kind]`` holds one list of
    (round, accuracy) per seed, for kind in global / personalized / unseen_personalized."""
    methods = list(curves)
    cols = min(4, len(methods))
    rows = math.ceil(len(methods) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.0 * rows), squeeze=False,
                             sharey=True)
    styles = (("personalized", "personalized", "-"), ("global", "global", "--"),
              ("unseen_personalized", "unseen clients, personalized", ":"))
    for ax, method in zip(axes.flat, methods):
        for i, (kind, label, style) in enumerate(styles):
            band = _mean_band(curves[method].get(kind, []))
            if band is None:
                continue
            x, m, s = band
            ax.plot(x, m, style, color=COLORS[i], label=label, lw=1.6)
            ax.fill_between(x, m - s, m + s, color=COLORS[i], alpha=0.18, lw=0)
        if not curves[method].get("global") or _mean_band(curves[method]["global"]) is None:
            ax.text(0.97, 0.04, "no global model", transform=ax.transAxes, ha="right",
                    fontsize=8, color="0.4")
        ax.set_title(method, fontsize=9)
        ax.set_xlabel("round", fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=7)
    for ax in axes.flat[len(methods):]:
        ax.set_visible(False)
    for ax in axes[:, 0]:
        ax.set_ylabel("test accuracy (pooled)", fontsize=8)
    handles, labels = [], []
    for ax in axes.flat:
        for h, l in zip(*ax.get_legend_handles_labels()):
            if l not in labels:
                handles.append(h)
                labels.append(l)
    if labels:
        fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8,
                   frameon=False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.07, 1, 0.95))
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def client_scatter(title: str, points: Mapping[str, list[tuple[float, float, bool]]],
                   out: Path) -> Path | None:
    """One panel per method with a global model: each client's test accuracy under the global
    model (x) and its personalized model (y), every seed; x marks = unseen clients."""
    methods = [m for m, pts in points.items() if pts]
    if not methods:
        return None
    cols = min(4, len(methods))
    rows = math.ceil(len(methods) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.3 * cols, 3.3 * rows), squeeze=False)
    # one zoom for every panel, so that the panels compare; the diagonal stays in view
    low = min(min(g, p) for m in methods for g, p, _ in points[m])
    low = max(0.0, math.floor((low - 0.02) * 20) / 20)
    for ax, method in zip(axes.flat, methods):
        pts = np.asarray([(g, p) for g, p, _ in points[method]], dtype=float)
        unseen = np.asarray([u for _, _, u in points[method]], dtype=bool)
        ax.plot([low, 1], [low, 1], "k:", lw=0.8)
        if (~unseen).any():
            ax.scatter(pts[~unseen, 0], pts[~unseen, 1], s=12, alpha=0.6, color=COLORS[0],
                       label="participating")
        if unseen.any():
            ax.scatter(pts[unseen, 0], pts[unseen, 1], s=22, marker="x", color=COLORS[3],
                       label="unseen")
        above = float(np.mean(pts[:, 1] > pts[:, 0]))
        below = float(np.mean(pts[:, 1] < pts[:, 0]))
        ax.set_title(f"{method}: helps {above:.0%}, hurts {below:.0%}", fontsize=9)
        pad = (1 - low) * 0.03
        ax.set_xlim(low - pad, 1 + pad)
        ax.set_ylim(low - pad, 1 + pad)
        ax.set_aspect("equal")
        ax.set_xlabel("global model", fontsize=8)
        ax.set_ylabel("personalized model", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    for ax in axes.flat[len(methods):]:
        ax.set_visible(False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def heterogeneity_sweep(title: str, labels: Sequence[str],
                        series: Mapping[str, Mapping[str, Sequence[tuple[float, float] | None]]],
                        out: Path) -> Path:
    """Accuracy as the partition goes from IID (left) to pathological (right).

    ``series[method][kind]`` holds one (mean, std over seeds) or None per label, for kind in
    personalized (solid) / global (dashed)."""
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(labels) + 2), 4.2))
    x = np.arange(len(labels))
    for i, (method, kinds) in enumerate(series.items()):
        for kind, style, marker in (("personalized", "-", "o"), ("global", "--", "s")):
            values = kinds.get(kind, [])
            pts = [(xi, v) for xi, v in zip(x, values) if v is not None]
            if not pts:
                continue
            xs = np.asarray([p[0] for p in pts])
            means = np.asarray([p[1][0] for p in pts])
            stds = np.asarray([p[1][1] for p in pts])
            ax.errorbar(xs + (i - len(series) / 2) * 0.03, means, yerr=stds, fmt=style,
                        marker=marker, ms=4, capsize=2, color=COLORS[i % len(COLORS)],
                        label=f"{method} {kind}")
    ax.set_xticks(x, labels, fontsize=8)
    ax.set_xlabel("partition: IID  →  pathological", fontsize=9)
    ax.set_ylabel("test accuracy (pooled, last round)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
