"""The PNGs people would rather look at than read: curves, confusion matrix and a labelled image grid."""

from __future__ import annotations

import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import MaxNLocator

from ..atomic import atomic_path
from ..classes import CLASS_NAMES


def _save(fig: plt.Figure, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)


def _read_history(path: Path) -> dict[str, list[float]]:
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    return {key: [float(r[key]) for r in rows] for key in rows[0]}


def training_curves(histories: dict[str, Path], path: Path) -> None:
    """Loss on the left; on the right the three accuracies, where train (running) starting below test is
    the textbook's observation: the running figure averages over weights that were still improving."""
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    # one or two implementations, two colours: zip stops at the shorter on purpose
    for (name, history_path), color in zip(histories.items(), ("tab:blue", "tab:orange"), strict=False):
        h = _read_history(history_path)
        label = f"{name} " if len(histories) > 1 else ""
        ax_loss.plot(h["epoch"], h["loss"], color=color, marker="o", label=f"{label}train loss")
        ax_acc.plot(
            h["epoch"],
            h["train_acc_running"],
            color=color,
            linestyle=":",
            marker=".",
            label=f"{label}train acc (running)",
        )
        ax_acc.plot(h["epoch"], h["train_acc"], color=color, linestyle="--", label=f"{label}train acc (end of epoch)")
        ax_acc.plot(h["epoch"], h["test_acc"], color=color, marker="o", label=f"{label}test acc")
    for ax, title in ((ax_loss, "Loss"), (ax_acc, "Accuracy")):
        ax.set(xlabel="epoch", title=title)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    _save(fig, path)


def confusion_matrix(cm: np.ndarray, title: str, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7.5, 6.5))
    image = ax.imshow(cm, cmap="Blues")
    fig.colorbar(image, ax=ax, fraction=0.046)
    ticks = np.arange(len(CLASS_NAMES))
    ax.set_xticks(ticks, CLASS_NAMES, rotation=45, ha="right")
    ax.set_yticks(ticks, CLASS_NAMES)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    threshold = cm.max() / 2
    for (i, j), count in np.ndenumerate(cm):
        ax.text(j, i, str(count), ha="center", va="center", fontsize=7, color="white" if count > threshold else "black")
    _save(fig, path)


def prediction_grid(
    images: np.ndarray, labels: np.ndarray, predicted: np.ndarray, title: str, path: Path, columns: int = 6
) -> None:
    """Like the textbook's show_fashion_mnist: each image titled true / predicted, mistakes in red."""
    rows = max(1, -(-len(images) // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(1.6 * columns, 1.9 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    # the grid may have more cells than images (the last row): the extra cells stay blank
    for ax, image, true, pred in zip(axes.flat, images, labels, predicted, strict=False):
        ax.imshow(image, cmap="gray")
        ax.set_title(f"{CLASS_NAMES[true]}\n{CLASS_NAMES[pred]}", fontsize=8, color="black" if true == pred else "red")
    fig.suptitle(title)
    _save(fig, path)


def reliability_diagrams(panels: dict[str, tuple[list[dict], float]], title: str, path: Path) -> None:
    """One reliability diagram per panel (Guo et al. 2017, figure 1): each bin's accuracy as a bar, the gap to
    its mean confidence shaded, the diagonal where a calibrated model's bars would end; the bin counts below."""
    fig, axes = plt.subplots(
        2,
        len(panels),
        figsize=(5 * len(panels), 6.2),
        squeeze=False,
        gridspec_kw={"height_ratios": [3, 1]},
        sharex=True,
    )
    for (name, (table, ece)), ax, ax_count in zip(panels.items(), axes[0], axes[1], strict=True):
        lower = np.array([row["lower"] for row in table])
        width = lower[1] - lower[0] if len(lower) > 1 else 1.0
        filled = [row for row in table if row["count"]]
        left = np.array([row["lower"] for row in filled])
        accuracy = np.array([row["accuracy"] for row in filled])
        confidence = np.array([row["confidence"] for row in filled])
        ax.bar(left, accuracy, width=width, align="edge", color="tab:blue", edgecolor="black", label="accuracy")
        ax.bar(
            left,
            confidence - accuracy,
            bottom=accuracy,
            width=width,
            align="edge",
            color="tab:red",
            alpha=0.3,
            edgecolor="tab:red",
            hatch="//",
            label="gap to mean confidence",
        )
        ax.plot([0, 1], [0, 1], color="gray", linestyle="--", label="perfect calibration")
        ax.set(xlim=(0, 1), ylim=(0, 1), ylabel="accuracy", title=f"{name}: ECE {ece:.4f}")
        ax.legend(loc="upper left", fontsize=8)
        ax_count.bar(lower, [row["count"] for row in table], width=width, align="edge", color="gray", edgecolor="black")
        ax_count.set(xlabel="top-label confidence", ylabel="images", yscale="log")
    fig.suptitle(title)
    _save(fig, path)
