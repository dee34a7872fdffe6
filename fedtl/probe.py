"""How good an encoder is for a downstream task with few labels: a linear probe and kNN.

Both read a frozen encoder's features. The linear probe is L2-regularised multinomial logistic
regression on standardised features (the objective of scikit-learn's default
``LogisticRegression``, C = 1), solved with full-batch L-BFGS for up to 300 iterations
(scikit-learn's lbfgs solver stops at 100 by default). The kNN
classifier is the weighted vote of Wu et al. (2018), used by Ye et al. (2019): the k most
cosine-similar labelled samples each vote for their class with weight exp(similarity / 0.1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fedtl.evaluation import EVAL_BATCH, Score

KNN_K = 200  # Ye et al.'s official kNN evaluation
KNN_TEMPERATURE = 0.1  # sigma of the vote weights exp(s / sigma) in the same code
PROBE_L2 = 1.0  # 1 / C: the regularisation of scikit-learn's default LogisticRegression


@torch.no_grad()
def encode(encoder: nn.Module, x: torch.Tensor, device: torch.device | str = "cpu"
           ) -> torch.Tensor:
    """The encoder's features of inputs ``x`` (eval mode, batches of EVAL_BATCH), as float32
    on the CPU, flattened to one vector per sample."""
    was_training = encoder.training
    encoder.eval()
    out = [encoder(x[i:i + EVAL_BATCH].to(device)).flatten(1).float().cpu()
           for i in range(0, len(x), EVAL_BATCH)]
    encoder.train(was_training)
    if not out:
        return torch.zeros(0, 0)
    return torch.cat(out)


@dataclass(frozen=True)
class LinearProbe:
    """A fitted linear classifier on standardised features."""

    mean: torch.Tensor
    std: torch.Tensor
    weight: torch.Tensor  # (classes, features)
    bias: torch.Tensor

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return F.linear((features - self.mean) / self.std, self.weight, self.bias)

    def score(self, features: torch.Tensor, labels: torch.Tensor) -> Score:
        """Correct predictions and summed cross-entropy on ``features`` / ``labels``."""
        if len(labels) == 0:
            return Score(0, 0.0, 0)
        labels = labels.cpu()
        logits = self.logits(features.float().cpu())
        return Score(int((logits.argmax(1) == labels).sum()),
                     float(F.cross_entropy(logits, labels, reduction="sum")), len(labels))


def fit_linear_probe(features: torch.Tensor, labels: torch.Tensor, num_classes: int,
                     l2: float = PROBE_L2, max_iter: int = 300) -> LinearProbe:
    """Fit min_W,b sum_i CE(W z_i + b, y_i) + l2/2 ||W||^2 on standardised features z.

    Classes absent from ``labels`` keep logits the loss pushes down, so they are never
    predicted. Deterministic: zero start, full-batch L-BFGS with strong-Wolfe line search,
    ``max_iter`` iterations at most (it stops sooner once the gradient's largest entry is
    below 1e-5 or the loss stops changing).
    """
    if len(labels) == 0:
        raise ValueError("a linear probe needs at least one labelled sample")
    labels = labels.cpu()
    features = features.float().cpu()
    mean = features.mean(0)
    std = features.std(0, unbiased=False).clamp_min(1e-6)
    z = (features - mean) / std
    weight = torch.zeros(num_classes, z.shape[1], requires_grad=True)
    bias = torch.zeros(num_classes, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1, max_iter=max_iter,
                                  tolerance_grad=1e-5, tolerance_change=1e-9,
                                  history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = (F.cross_entropy(F.linear(z, weight, bias), labels, reduction="sum")
                + 0.5 * l2 * weight.pow(2).sum())
        loss.backward()
        return loss

    # A problem this small runs many tiny steps: one thread avoids the pool's overhead (10x
    # slower on a busy 2-core machine otherwise).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.enable_grad():
            optimizer.step(closure)
    finally:
        torch.set_num_threads(threads)
    return LinearProbe(mean, std, weight.detach(), bias.detach())


def knn_score(train_features: torch.Tensor, train_labels: torch.Tensor,
              test_features: torch.Tensor, test_labels: torch.Tensor, num_classes: int,
              k: int = KNN_K, temperature: float = KNN_TEMPERATURE) -> Score:
    """Weighted kNN on cosine similarity; k is capped by the number of labelled samples.

    The loss is the summed negative log of the true class's share of the votes.
    """
    if len(test_labels) == 0:
        return Score(0, 0.0, 0)
    if len(train_labels) == 0:
        raise ValueError("kNN needs at least one labelled sample")
    k = min(k, len(train_labels))
    train = F.normalize(train_features.float(), dim=1)
    correct, loss_sum = 0, 0.0
    for start in range(0, len(test_labels), EVAL_BATCH):
        test = F.normalize(test_features[start:start + EVAL_BATCH].float(), dim=1)
        y = test_labels[start:start + EVAL_BATCH]
        sim, idx = (test @ train.T).topk(k, dim=1)
        votes = torch.zeros(len(y), num_classes).scatter_add_(
            1, train_labels[idx], torch.exp(sim / temperature))
        correct += int((votes.argmax(1) == y).sum())
        share = votes.gather(1, y[:, None]).squeeze(1) / votes.sum(1)
        loss_sum += float(-torch.log(share.clamp_min(1e-12)).sum())
    return Score(correct, loss_sum, len(test_labels))
