"""Model behaviour on the genuine Fashion-MNIST data: parity of the two implementations and accuracy."""

import pytest
import yaml

from helpers import REPO
from softmax_mlops.config import TrainConfig
from softmax_mlops.stages import train

pytestmark = pytest.mark.realdata


def test_real_data_is_the_genuine_dataset(real_splits):
    (train_images, train_labels), (test_images, test_labels) = real_splits["train"], real_splits["test"]
    assert train_images.shape == (60000, 28, 28) and test_images.shape == (10000, 28, 28)
    assert sorted(set(train_labels.tolist())) == list(range(10))
    assert (train_labels == 0).sum() == 6000 and (test_labels == 9).sum() == 1000


def test_one_epoch_leaves_both_implementations_with_the_same_weights(real_splits):
    hp = TrainConfig(epochs=1)
    (m1, _), (m2, _) = (
        train.fit(impl, hp, real_splits["train"], real_splits["test"], progress=False)
        for impl in ("scratch", "concise")
    )
    assert (m1.weights()[0] - m2.weights()[0]).abs().max().item() <= 1e-4
    assert (m1.weights()[1] - m2.weights()[1]).abs().max().item() <= 1e-4


def tuned_settings() -> dict:
    """The tuned preset, read from the README's `dvc exp run -S ...` line so the two cannot drift apart."""
    line = next(
        row for row in (REPO / "README.md").read_text().splitlines() if row.startswith("dvc exp run --name tuned")
    )
    return {
        arg.split("=")[0].removeprefix("train."): yaml.safe_load(arg.split("=")[1])
        for arg in line.split()
        if arg.startswith("train.")
    }


@pytest.mark.parametrize("impl", ["scratch", "concise"])
def test_documented_tuned_setting_reaches_0_845(training_splits, impl):
    """On what the pipeline trains on: the training images minus the validation split."""
    settings = tuned_settings()
    assert settings, "README lost its tuned `dvc exp run -S` line"
    _, history = train.fit(
        impl, TrainConfig(**settings), training_splits["train"], training_splits["test"], progress=False
    )
    # a bound: scikit-learn's LogisticRegression (lbfgs, the optimum of this linear model) reaches about 0.843 on
    # this data; the tuned SGD run measured 0.8466, so 0.845 says "at the optimum", with a little room
    assert history[-1].test_acc >= 0.845
