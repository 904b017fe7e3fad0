"""Softmax regression from scratch, as in the textbook chapter: tensors W and b, our own softmax,
cross-entropy and SGD step. No torch.nn layers or losses, no torch.optim; autograd supplies the gradients.

Two departures from the textbook, both for correctness: the softmax subtracts the row max before exp (the
naive exp/sum overflows to inf/inf = nan for logits around 1e4), and cross-entropy is taken from
log-probabilities instead of log(softmax), which underflows to log(0) = -inf for confident mistakes.
"""

from __future__ import annotations

import torch

from ...config import TrainConfig


def _shift(Z: torch.Tensor) -> torch.Tensor:
    """Z minus its row max. The result of (log-)softmax does not depend on the shift, so the max is detached:
    autograd need not differentiate through it."""
    return Z - Z.detach().amax(dim=1, keepdim=True)


def softmax(Z: torch.Tensor) -> torch.Tensor:
    """Row-wise softmax; shifting by the row max leaves the result unchanged and keeps exp() <= 1."""
    Z_exp = torch.exp(_shift(Z))
    return Z_exp / Z_exp.sum(dim=1, keepdim=True)


def log_softmax(Z: torch.Tensor) -> torch.Tensor:
    shifted = _shift(Z)
    return shifted - torch.log(torch.exp(shifted).sum(dim=1, keepdim=True))


def cross_entropy(Z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood of the true classes (the textbook's y_hat[range(n), y], via gather)."""
    return -log_softmax(Z).gather(1, y.unsqueeze(1)).mean()


def sgd(
    params: list[torch.Tensor], velocities: list[torch.Tensor], lr: float, momentum: float, weight_decay: float
) -> None:
    """p -= lr * v, with v = momentum * v + grad + weight_decay * p (torch.optim.SGD's exact rule)."""
    with torch.no_grad():
        for p, v in zip(params, velocities, strict=True):
            if p.grad is None:
                raise RuntimeError("sgd() before backward(): a parameter has no gradient")
            grad = p.grad + weight_decay * p if weight_decay else p.grad
            if momentum:
                v.mul_(momentum).add_(grad)
                grad = v
            p.sub_(grad, alpha=lr)  # p -= lr * grad, in place
            p.grad = None  # the next backward() writes fresh gradients


class ScratchSoftmaxRegression:
    def __init__(self, W: torch.Tensor, b: torch.Tensor, hp: TrainConfig) -> None:
        self.W = W.clone().requires_grad_(True)
        self.b = b.clone().requires_grad_(True)
        self.velocities = [torch.zeros_like(self.W), torch.zeros_like(self.b)]
        self.hp = hp

    def logits(self, X: torch.Tensor) -> torch.Tensor:
        return X @ self.W + self.b

    def train_step(self, X: torch.Tensor, y: torch.Tensor, lr: float) -> tuple[float, torch.Tensor]:
        Z = self.logits(X)
        loss = cross_entropy(Z, y)
        loss.backward()
        sgd([self.W, self.b], self.velocities, lr, self.hp.momentum, self.hp.weight_decay)
        return loss.item(), Z.detach()

    def weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.W.detach().clone(), self.b.detach().clone()
