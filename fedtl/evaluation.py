"""Accuracy of a model on a split, and how per-client accuracies are summarised.

Pooled accuracy is sum(correct) / sum(samples) over clients (what pFedMe and most papers
report); the unweighted mean, standard deviation and bottom decile describe the spread across
clients (pFL-Bench's fairness figures). Clients without test samples are left out of the
per-client figures.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

EVAL_BATCH = 2048


@dataclass(frozen=True)
class Score:
    """Correct predictions, summed cross-entropy and sample count of one evaluation."""

    correct: int
    loss_sum: float
    total: int

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else float("nan")


@torch.no_grad()
def score(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
          device: torch.device | str = "cpu") -> Score:
    """Evaluate ``model`` (in eval mode) on inputs ``x`` and labels ``y``, in large batches."""
    if len(y) == 0:
        return Score(0, 0.0, 0)
    was_training = model.training
    model.eval()
    correct, loss_sum = 0, 0.0
    for start in range(0, len(y), EVAL_BATCH):
        xb = x[start:start + EVAL_BATCH].to(device)
        yb = y[start:start + EVAL_BATCH].to(device)
        logits = model(xb)
        loss_sum += float(F.cross_entropy(logits, yb, reduction="sum"))
        correct += int((logits.argmax(1) == yb).sum())
    model.train(was_training)
    return Score(correct, loss_sum, len(y))


def spread(accuracies: Sequence[float]) -> dict[str, float | None]:
    """Unweighted mean, standard deviation and 10th percentile of per-client accuracies."""
    acc = np.asarray([a for a in accuracies if not math.isnan(a)], dtype=np.float64)
    if acc.size == 0:
        return {"mean": None, "std": None, "bottom10": None}
    return {
        "mean": float(acc.mean()),
        "std": float(acc.std()),
        "bottom10": float(np.quantile(acc, 0.1)),
    }


def pooled(correct: Sequence[int], total: Sequence[int]) -> float | None:
    """sum(correct) / sum(total), or None when there are no samples."""
    n = int(np.sum(total))
    return float(np.sum(correct)) / n if n else None
