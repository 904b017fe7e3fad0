"""Champion / challenger: the registry never goes backwards.

A new version takes `@champion` only when it passes the absolute gate in params.yaml
(`export.champion_min_accuracy`) and is at least as good as the current champion, both scored by onnxruntime
on the same test data, now: accuracy first, then the mean negative log-likelihood to break a tie. Scoring the
champion again, rather than trusting the number recorded when it was promoted, keeps the comparison fair when
the test data or the scoring code has changed since. The decision and its reason are written on the version.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ..errors import PipelineError, first_line
from ..serving.inference import Predictor, resolve_model

if TYPE_CHECKING:
    from mlflow import MlflowClient

CHAMPION, CANDIDATE = "champion", "candidate"


@dataclass(frozen=True)
class Score:
    """What a model does on the test set: accuracy, and the mean NLL of the true class (ties)."""

    accuracy: float
    nll: float

    def beats_or_ties(self, other: Score) -> bool:
        return self.accuracy > other.accuracy or (self.accuracy == other.accuracy and self.nll <= other.nll)


@dataclass(frozen=True)
class Decision:
    promoted: bool
    reason: str
    champion_before: str | None  # the version that held @champion when the decision was made


def score(predictor: Predictor, images: np.ndarray, labels: np.ndarray) -> Score:
    return score_of(predictor.run(images)[1], labels)


def score_of(probabilities: np.ndarray, labels: np.ndarray) -> Score:
    true_class = probabilities.astype(np.float64)[np.arange(len(labels)), labels]
    nll = float(-np.log(np.clip(true_class, np.finfo(np.float64).tiny, 1.0)).mean())
    return Score(accuracy=float((probabilities.argmax(axis=1) == labels).mean()), nll=nll)


def decide(new: Score, gate: float, champion: tuple[str, Score] | None) -> Decision:
    """The rule, on its own so that every branch can be tested with plain numbers."""
    before = champion[0] if champion else None
    if new.accuracy < gate:
        held = f"kept v{before}" if before else "no champion"
        return Decision(False, f"{held}: {new.accuracy:.4f} < gate {gate:.4f}", before)
    if champion is None:
        return Decision(True, f"promoted: {new.accuracy:.4f} ≥ gate {gate:.4f}, no champion before", None)
    version, old = champion
    tie = new.accuracy == old.accuracy
    if new.beats_or_ties(old):
        detail = f" (tie; NLL {new.nll:.4f} ≤ {old.nll:.4f})" if tie else ""
        return Decision(True, f"promoted: {new.accuracy:.4f} ≥ champion v{version} {old.accuracy:.4f}{detail}", version)
    detail = f"= {old.accuracy:.4f} (tie; NLL {new.nll:.4f} > {old.nll:.4f})" if tie else f"< {old.accuracy:.4f}"
    return Decision(False, f"kept v{version}: {new.accuracy:.4f} {detail}", version)


def current_champion(
    client: MlflowClient,
    name: str,
    tracking_uri: str,
    images: np.ndarray,
    labels: np.ndarray,
) -> tuple[str, Score] | None:
    """The version holding @champion and its score on these images, or None for an empty registry."""
    import mlflow

    try:
        version = str(client.get_model_version_by_alias(name, CHAMPION).version)
    except mlflow.exceptions.MlflowException:
        return None  # no such model or no such alias yet: the first version that passes the gate wins
    try:  # an artifact that is gone or unreadable is an error that names the champion, not a traceback
        return version, score(Predictor(resolve_model(f"models:/{name}/{version}", tracking_uri)), images, labels)
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types for a model it cannot run
        reason = first_line(exc)
        raise PipelineError(f"cannot score the current champion models:/{name}/{version}: {reason}") from None


def promote_if_not_worse(
    client: MlflowClient,
    name: str,
    version: str,
    new: Score,
    gate: float,
    tracking_uri: str,
    images: np.ndarray,
    labels: np.ndarray,
    lock: AbstractContextManager | None = None,
) -> Decision:
    """Point @candidate at ``version``; move @champion to it only if :func:`decide` says so; record why.
    Reading the champion and moving the alias happen inside ``lock`` (champion_lock.py), so that two
    challengers deciding at once cannot both read the same champion and leave the alias on the worse."""
    with lock or nullcontext():
        decision = decide(new, gate, current_champion(client, name, tracking_uri, images, labels))
        client.set_registered_model_alias(name, CANDIDATE, version)
        if decision.promoted:
            client.set_registered_model_alias(name, CHAMPION, version)
    client.set_model_version_tag(name, version, "champion_decision", "promoted" if decision.promoted else "kept")
    client.set_model_version_tag(name, version, "champion_reason", decision.reason)
    client.set_model_version_tag(name, version, "test_nll", f"{new.nll:.6f}")
    return decision
