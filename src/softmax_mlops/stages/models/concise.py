"""Softmax regression the concise way: nn.Linear, nn.CrossEntropyLoss and torch.optim.SGD.

nn.CrossEntropyLoss takes logits and fuses log-softmax with the NLL, which is the stable form the scratch
version writes out by hand.
"""

from __future__ import annotations

import torch
from torch import nn

from ...config import TrainConfig
from . import NUM_INPUTS, NUM_OUTPUTS


class ConciseSoftmaxRegression:
    def __init__(self, W: torch.Tensor, b: torch.Tensor, hp: TrainConfig) -> None:
        self.net = nn.Linear(NUM_INPUTS, NUM_OUTPUTS)
        with torch.no_grad():  # same initial weights as scratch, instead of nn.Linear's own init
            self.net.weight.copy_(W.T)
            self.net.bias.copy_(b)
        self.loss = nn.CrossEntropyLoss()
        self.optimizer = torch.optim.SGD(
            self.net.parameters(), lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay
        )

    def logits(self, X: torch.Tensor) -> torch.Tensor:
        return self.net(X)

    def train_step(self, X: torch.Tensor, y: torch.Tensor, lr: float) -> tuple[float, torch.Tensor]:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad()
        Z = self.net(X)
        loss = self.loss(Z, y)
        loss.backward()
        self.optimizer.step()
        return loss.item(), Z.detach()

    def weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.net.weight.detach().T.clone(), self.net.bias.detach().clone()
