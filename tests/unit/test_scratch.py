"""The hand-written pieces of the scratch implementation against torch's own, including the numerics."""

import ast
from pathlib import Path

import pytest
import torch

from softmax_mlops.stages.models import scratch


def naive_softmax(Z):
    """The textbook's first version: exp, then normalise."""
    Z_exp = torch.exp(Z)
    return Z_exp / Z_exp.sum(dim=1, keepdim=True)


EXTREME = torch.tensor([[1e4, -1e4, 0.0], [-1e4, -1e4, 1e4], [5.0, 5.0, 5.0]])


def test_stable_softmax_is_finite_and_normalised_for_huge_logits():
    P = scratch.softmax(EXTREME)
    assert torch.isfinite(P).all()
    torch.testing.assert_close(P.sum(dim=1), torch.ones(3))
    torch.testing.assert_close(P, torch.softmax(EXTREME, dim=1))


def test_naive_softmax_gives_nan_for_the_same_logits():
    assert torch.isnan(naive_softmax(EXTREME)).any()


def test_cross_entropy_matches_torch_and_stays_finite_for_confident_mistakes():
    y = torch.tensor([1, 0, 2])  # the first two are confidently wrong
    loss = scratch.cross_entropy(EXTREME, y)
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(EXTREME, y))


@pytest.mark.parametrize("momentum, weight_decay", [(0.0, 0.0), (0.9, 0.0), (0.9, 1e-3)])
def test_manual_sgd_follows_torch_optim_sgd(momentum, weight_decay):
    torch.manual_seed(0)
    ours = [torch.randn(5, 3, requires_grad=True), torch.randn(3, requires_grad=True)]
    theirs = [p.detach().clone().requires_grad_(True) for p in ours]
    velocities = [torch.zeros_like(p) for p in ours]
    optimizer = torch.optim.SGD(theirs, lr=0.1, momentum=momentum, weight_decay=weight_decay)
    for _ in range(4):
        X, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
        scratch.cross_entropy(X @ ours[0] + ours[1], y).backward()
        scratch.sgd(ours, velocities, 0.1, momentum, weight_decay)
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(X @ theirs[0] + theirs[1], y).backward()
        optimizer.step()
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b)


def test_scratch_uses_no_torch_nn_or_optim():
    """Checked on the code itself (imports and attribute access), not on the prose in docstrings."""
    tree = ast.parse(Path(scratch.__file__).read_text())
    imported = {
        alias.name for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom)) for alias in node.names
    } | {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    used = {ast.unparse(node) for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
    forbidden = ("torch.nn", "torch.optim", "nn", "optim", "F")
    assert not {n for n in imported | used if n and any(n == f or n.startswith(f + ".") for f in forbidden)}
