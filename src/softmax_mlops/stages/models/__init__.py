"""What both implementations share: the initial weights, the input features and the deployable module.

Sharing these is what makes the two comparable number for number: same seed -> same W and b, same pixels ->
same features, and one exported form, whichever implementation trained the weights.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch
from torch import nn

from ...config import IMPLS, TrainConfig
from ...errors import PipelineError

NUM_INPUTS = 28 * 28
NUM_OUTPUTS = 10


def initial_weights(generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """W ~ N(0, 0.01) as in the textbook, b = 0."""
    W = torch.normal(0.0, 0.01, size=(NUM_INPUTS, NUM_OUTPUTS), generator=generator)
    return W, torch.zeros(NUM_OUTPUTS)


def features(images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 pixels [N, 28, 28] -> [N, 784] in [0, 1]: the only preprocessing, also inside the export."""
    return torch.flatten(images.to(dtype) / 255.0, start_dim=1)


class SoftmaxModel(Protocol):
    """The shape the training loop relies on; each implementation fills it in its own style."""

    def logits(self, X: torch.Tensor) -> torch.Tensor: ...

    def train_step(self, X: torch.Tensor, y: torch.Tensor, lr: float) -> tuple[float, torch.Tensor]:
        """One SGD step on a batch; returns the batch's mean loss and its (pre-step) logits."""
        ...

    def weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """W [784, 10] and b [10], detached: the common format both implementations save."""
        ...


def build(impl: str, W: torch.Tensor, b: torch.Tensor, hp: TrainConfig) -> SoftmaxModel:
    if impl == "scratch":
        from .scratch import ScratchSoftmaxRegression

        return ScratchSoftmaxRegression(W, b, hp)
    if impl == "concise":
        from .concise import ConciseSoftmaxRegression

        return ConciseSoftmaxRegression(W, b, hp)
    raise PipelineError(f"unknown implementation {impl!r}: choose {' or '.join(IMPLS)}")


class SoftmaxRegression(nn.Module):
    """The deployable model: raw uint8 images in, float32 logits out, with the preprocessing inside the graph.

    Whichever implementation trained W and b, this is what MLflow logs and ONNX exports, so serving cannot
    drift from training. The affine map runs in float64: in float32, MKL (torch) and MLAS (onnxruntime) sum
    the 784 products in different orders and trained logits then differ by ~1e-5, which is the parity limit;
    in float64 both round to the same float32 result.
    """

    def __init__(self, W: torch.Tensor, b: torch.Tensor) -> None:
        super().__init__()
        self.linear = nn.Linear(NUM_INPUTS, NUM_OUTPUTS, dtype=torch.float64)
        with torch.no_grad():
            self.linear.weight.copy_(W.T)
            self.linear.bias.copy_(b)

    def logits64(self, image: torch.Tensor) -> torch.Tensor:
        return self.linear(features(image, torch.float64))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.logits64(image).to(torch.float32)


def save_weights(path, W: torch.Tensor, b: torch.Tensor) -> None:  # noqa: ANN001
    from ...atomic import write_npz

    write_npz(path, W=W.detach().numpy(), b=b.detach().numpy())


def load_weights(path) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: ANN001
    """Weights are plain arrays in an npz (no pickle), so loading a model file cannot run code."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            W, b = npz["W"], npz["b"]
    except FileNotFoundError:
        raise PipelineError(f"{path} is missing: run the train stage first (`dvc repro`)") from None
    except (KeyError, ValueError, OSError) as exc:
        raise PipelineError(f"{path} is not a weights file (W, b): {exc}") from None
    if W.shape != (NUM_INPUTS, NUM_OUTPUTS) or b.shape != (NUM_OUTPUTS,):
        raise PipelineError(f"{path}: expected W [784, 10] and b [10], got {W.shape} and {b.shape}")
    return torch.from_numpy(W.astype(np.float32)), torch.from_numpy(b.astype(np.float32))
