"""Per-epoch training time of both implementations, against two references, measured side by side in one run.

- textbook: d2l's train_ch3 epoch: torchvision's FashionMNIST with ToTensor and a DataLoader (batch 256, 4
  workers, as d2l does), training the same scratch model with running loss/accuracy, then the test accuracy
  through the test DataLoader; the data is decoded and collated image by image every epoch;
- matmul bound: the three dense GEMMs of one full-data epoch (forward X@W, backward X.T@G and G@W.T over
  60000x784x10), with no batching, Python or autograd overhead.

Our epochs do all of that plus a full end-of-epoch train-accuracy pass, so the ratio is, if anything, unkind to us.
Usage: FASHION_MNIST_MIRROR=../shared/fashion-mnist python benchmarks/train_speed.py [--epochs 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import record
import torch

from softmax_mlops.config import MIRROR_ENV, TrainConfig
from softmax_mlops.stages import data, train
from softmax_mlops.stages.models import build, features, initial_weights


def textbook_epoch(mirror: str, root: str) -> float:
    from torch.utils.data import DataLoader
    from torchvision import transforms

    def loader(train: bool) -> DataLoader:
        dataset = data.torchvision_dataset(mirror, root, train=train, transform=transforms.ToTensor())
        return DataLoader(dataset, batch_size=256, shuffle=train, num_workers=4)

    train_iter, test_iter = loader(True), loader(False)
    model = build("scratch", *initial_weights(torch.Generator().manual_seed(0)), TrainConfig())
    start = time.perf_counter()
    loss_sum = correct = seen = 0.0
    for X, y in train_iter:  # d2l train_epoch_ch3
        loss, Z = model.train_step(X.reshape(-1, 784), y, 0.1)
        loss_sum, correct, seen = loss_sum + loss * len(y), correct + (Z.argmax(1) == y).sum().item(), seen + len(y)
    test_correct = sum(
        (model.logits(X.reshape(-1, 784)).argmax(1) == y).sum().item()  # d2l evaluate_accuracy
        for X, y in test_iter
    )
    assert seen == 60000 and test_correct > 0
    return time.perf_counter() - start


def matmul_bound(X: torch.Tensor, repeats: int = 7) -> float:
    W, G = torch.randn(784, 10), torch.randn(len(X), 10)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        X @ W
        X.T @ G
        G @ W.T
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> tuple[dict, dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3, help="epochs per implementation (median is reported)")
    args = parser.parse_args()
    mirror = os.environ.get(MIRROR_ENV, "")
    splits = data.fetch(mirror)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    ours = {}
    for impl in ("scratch", "concise"):
        _, history = train.fit(impl, TrainConfig(epochs=args.epochs), splits["train"], splits["test"], progress=False)
        ours[impl] = statistics.median(m.seconds for m in history)
    bound = matmul_bound(features(torch.from_numpy(splits["train"][0])))
    with tempfile.TemporaryDirectory() as root:
        textbook = textbook_epoch(mirror, root)

    print(f"{'':28}{'s/epoch':>10}{'textbook / this':>18}{'this / matmul bound':>22}")
    print(f"{'textbook (DataLoader)':28}{textbook:10.3f}{1.0:18.1f}{textbook / bound:22.1f}")
    for impl, seconds in ours.items():
        print(f"{impl:28}{seconds:10.3f}{textbook / seconds:18.1f}{seconds / bound:22.2f}")
    print(f"{'matmul bound (3 GEMMs)':28}{bound:10.3f}{textbook / bound:18.1f}{1.0:22.2f}")
    print("goals: textbook / this >= 20, this / matmul bound <= 3")
    figures = {
        "seconds_per_epoch": {"textbook": textbook, **ours, "matmul_bound": bound},
        "epochs": args.epochs,
        "torch_threads": torch.get_num_threads(),
    }
    ratios = {
        **{f"textbook / {impl}": textbook / seconds for impl, seconds in ours.items()},
        **{f"{impl} / matmul_bound": seconds / bound for impl, seconds in ours.items()},
        "textbook / matmul_bound": textbook / bound,
    }
    return figures, ratios


if __name__ == "__main__":
    with record.Run(__file__, env=(MIRROR_ENV,), packages=("torch", "torchvision")) as run:
        run.figures, run.ratios = main()
