"""One training loop for both implementations, and the train stage around it.

The data sits in memory as tensors and batches are drawn by a seeded generator, so with the same seed both
implementations start from the same W, b and see the same batches in the same order.
"""

from __future__ import annotations

import csv
import io
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch
from tqdm import tqdm

from ..atomic import write_json, write_text
from ..config import Config, TrainConfig
from .data import load_split
from .models import SoftmaxModel, SoftmaxRegression, build, features, initial_weights, save_weights


@dataclass(frozen=True)
class EpochMetrics:
    """Three accuracies kept apart: the textbook's running one (weights change during the epoch), and train
    and test accuracy measured with the end-of-epoch weights."""

    epoch: int
    loss: float
    train_acc_running: float
    train_acc: float
    test_acc: float
    lr: float
    seconds: float  # wall clock: logged to MLflow only, never to a DVC-tracked file


TIMING_FIELDS = ("seconds",)


@dataclass(frozen=True)
class Trained:
    """What train@{impl} reports: the last epoch's figures, as metrics/{impl}/train.json holds them, and the
    mean epoch time, which goes to MLflow only (a DVC-tracked file must not change from run to run)."""

    test_acc: float
    train_acc: float
    train_acc_running: float
    loss: float
    epochs: int
    seconds_per_epoch: float

    def figures(self) -> dict[str, float | int]:
        """train.json's content: every field but the timing."""
        return {key: value for key, value in asdict(self).items() if key != "seconds_per_epoch"}


def lr_at(hp: TrainConfig, epoch: int) -> float:
    """Per-epoch learning rate; epoch counts from 0. Cosine decays from lr towards 0 over the run."""
    if hp.lr_schedule == "cosine":
        return hp.lr * 0.5 * (1.0 + math.cos(math.pi * epoch / hp.epochs))
    return hp.lr


@torch.no_grad()
def accuracy(model: SoftmaxModel, X: torch.Tensor, y: torch.Tensor) -> float:
    return (model.logits(X).argmax(dim=1) == y).float().mean().item()


def fit(
    impl: str,
    hp: TrainConfig,
    train: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    on_epoch: Callable[[EpochMetrics], None] = lambda m: None,
    progress: bool = True,
) -> tuple[SoftmaxModel, list[EpochMetrics]]:
    generator = torch.Generator().manual_seed(hp.seed)
    model = build(impl, *initial_weights(generator), hp)
    X, y = features(torch.from_numpy(train[0])), torch.from_numpy(train[1])
    X_test, y_test = features(torch.from_numpy(test[0])), torch.from_numpy(test[1])
    n = len(y)

    history = []
    bar = tqdm(range(hp.epochs), desc=f"train {impl}", unit="epoch", disable=not progress)
    for epoch in bar:
        start, lr = time.perf_counter(), lr_at(hp, epoch)
        loss_sum, correct = 0.0, 0
        for idx in torch.randperm(n, generator=generator).split(hp.batch_size):
            # index_select copies the batch rows ~4x faster than X[idx] advanced indexing
            y_batch = y.index_select(0, idx)
            loss, Z = model.train_step(X.index_select(0, idx), y_batch, lr)
            loss_sum += loss * len(idx)
            correct += int((Z.argmax(dim=1) == y_batch).sum())
        metrics = EpochMetrics(
            epoch=epoch + 1,
            loss=loss_sum / n,
            train_acc_running=correct / n,
            train_acc=accuracy(model, X, y),
            test_acc=accuracy(model, X_test, y_test),
            lr=lr,
            seconds=time.perf_counter() - start,
        )
        history.append(metrics)
        on_epoch(metrics)
        bar.set_postfix(loss=f"{metrics.loss:.4f}", test_acc=f"{metrics.test_acc:.4f}")
    return model, history


def history_csv(history: list[EpochMetrics]) -> str:
    """The per-epoch record DVC tracks: a function of code, data and params only, so no wall-clock times."""
    rows = [{k: v for k, v in asdict(m).items() if k not in TIMING_FIELDS} for m in history]
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def run(cfg: Config, impl: str) -> Trained:
    """The train@{impl} stage: fit, save weights and metrics, and open the MLflow run later stages resume."""
    from .. import tracking

    paths = cfg.paths
    train, test = load_split(paths.train_data), load_split(paths.test_data)
    with tracking.start_run(cfg, impl) as run:
        tracking.log_params(impl, cfg.train)
        model, history = fit(impl, cfg.train, train, test, on_epoch=tracking.log_epoch)
        W, b = model.weights()
        final = history[-1]
        result = Trained(
            test_acc=final.test_acc,
            train_acc=final.train_acc,
            train_acc_running=final.train_acc_running,
            loss=final.loss,
            epochs=final.epoch,
            seconds_per_epoch=sum(m.seconds for m in history) / len(history),
        )
        tracking.log_timing(seconds_per_epoch=result.seconds_per_epoch)  # timings go to MLflow, not to DVC outputs
        save_weights(paths.weights(impl), W, b)
        write_text(paths.history(impl), history_csv(history))
        write_json(paths.train_metrics(impl), result.figures())
        tracking.log_files(paths.history(impl), paths.train_metrics(impl))
        tracking.log_torch_model(SoftmaxRegression(W, b), test[0][:5])
        tracking.save_run_info(paths.run_info(impl), run, paths.weights(impl))
    return result
