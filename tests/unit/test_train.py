"""The shared training loop: same seed -> same start and same batches in both implementations."""

import numpy as np
import pytest
import torch

from softmax_mlops.config import TrainConfig
from softmax_mlops.stages import train
from softmax_mlops.stages.models import build, initial_weights


def toy_data(n, seed):
    """Two-pixel-pattern classes a linear model can separate."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 10
    images = rng.integers(0, 60, size=(n, 28, 28), dtype=np.uint8)
    for i, label in enumerate(labels):
        images[i, label * 2 : label * 2 + 3, :] = 250
    return images, labels.astype(np.int64)


def test_same_seed_gives_same_initial_weights_in_both():
    W, b = initial_weights(torch.Generator().manual_seed(3))
    models = [build(impl, W, b, TrainConfig()) for impl in ("scratch", "concise")]
    for Wi, bi in (m.weights() for m in models):
        torch.testing.assert_close(Wi, W, rtol=0, atol=0)
        torch.testing.assert_close(bi, b, rtol=0, atol=0)
    # the textbook's init, W ~ N(0, 0.01^2): the sample std of 7,840 draws is within 0.001 of 0.01 (its standard
    # error is 0.01 / sqrt(2 * 7840) = 8e-5, so 0.001 is over ten of them)
    assert abs(W.std().item() - 0.01) < 0.001 and (b == 0).all()


@pytest.mark.parametrize(
    "hp",
    [
        TrainConfig(epochs=3, batch_size=32),
        TrainConfig(epochs=3, batch_size=32, momentum=0.9, weight_decay=1e-3, lr_schedule="cosine"),
    ],
    ids=["sgd", "momentum-wd-cosine"],
)
def test_both_implementations_learn_the_same_weights(hp):
    data, test = toy_data(400, 0), toy_data(100, 1)
    results = {impl: train.fit(impl, hp, data, test, progress=False) for impl in ("scratch", "concise")}
    (m1, h1), (m2, h2) = results.values()
    assert (m1.weights()[0] - m2.weights()[0]).abs().max() < 1e-5
    assert [m.test_acc for m in h1] == pytest.approx([m.test_acc for m in h2])
    assert h1[-1].test_acc > 0.9 and h1[-1].loss < h1[0].loss  # a bound: toy_data's classes are separable by design


def test_history_records_every_epoch_and_serialises():
    hp = TrainConfig(epochs=2, batch_size=50)
    seen = []
    _, history = train.fit("scratch", hp, toy_data(100, 0), toy_data(50, 1), on_epoch=seen.append, progress=False)
    assert [m.epoch for m in history] == [1, 2] and seen == history
    lines = train.history_csv(history).splitlines()
    assert lines[0] == "epoch,loss,train_acc_running,train_acc,test_acc,lr" and len(lines) == 3


def test_cosine_schedule_decays_from_lr():
    hp = TrainConfig(lr=0.2, epochs=4, lr_schedule="cosine")
    lrs = [train.lr_at(hp, e) for e in range(4)]
    assert lrs[0] == pytest.approx(0.2) and lrs == sorted(lrs, reverse=True) and lrs[-1] > 0
    assert train.lr_at(TrainConfig(lr=0.2), 3) == 0.2
