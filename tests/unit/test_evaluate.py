"""Metrics from a confusion matrix, checked by hand on a small example."""

import numpy as np
import pytest

from softmax_mlops.classes import CLASS_NAMES
from softmax_mlops.stages import evaluate


def test_metrics_on_a_hand_checked_example():
    labels = np.array([0, 0, 0, 1, 1, 2])
    predicted = np.array([0, 0, 1, 1, 1, 0])
    cm = evaluate.confusion_matrix(labels, predicted)
    assert cm[0, 0] == 2 and cm[0, 1] == 1 and cm[2, 0] == 1 and cm.sum() == 6
    m = evaluate.metrics_from_confusion(cm)
    assert m["test_accuracy"] == pytest.approx(4 / 6)
    t_shirt = m["per_class"]["t-shirt"]
    assert t_shirt["precision"] == pytest.approx(2 / 3) and t_shirt["recall"] == pytest.approx(2 / 3)
    assert t_shirt["accuracy"] == pytest.approx(4 / 6)  # one-vs-rest: 2 TP + 2 TN out of 6
    assert m["per_class"]["pullover"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "accuracy": pytest.approx(5 / 6)}
    f1s = [m["per_class"][c]["f1"] for c in CLASS_NAMES]
    assert m["macro_f1"] == pytest.approx(np.mean(f1s))


def test_confusion_csv_is_one_row_per_image_with_class_names():
    text = evaluate.confusion_csv(np.array([0, 9]), np.array([6, 9]))
    assert text.splitlines() == ["actual,predicted", "t-shirt,shirt", "ankle boot,ankle boot"]
