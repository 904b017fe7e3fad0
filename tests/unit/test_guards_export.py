"""The export stage's ONNX parity gate, on a project copy trained on small generated data.

The mismatch is genuine, not simulated: the dynamo exporter bakes the temperature into the graph rounded to
float32, while torch divides by the float64 value calibrate@ fitted. With the trained weights the difference is
~1e-7, inside the 1e-5 limit; with weights a million times larger (as from a training run that diverged), the
logits are too, and so is the difference. The stage must then fail in one line and leave no model.onnx, no
model card, no drift reference and no registered version.
"""

import json
import math
import re
import sqlite3
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import calibrated_project, cli
from softmax_mlops import config
from softmax_mlops.errors import PipelineError

pytestmark = pytest.mark.heavy  # its fixture ingests, trains, evaluates and calibrates a project

IMPL = "scratch"
SCALE = 1e6
OUTPUTS = ("model.onnx", "model.json", "parity.json", "drift_reference.npz")  # what export@ writes in models/{impl}


@pytest.fixture(scope="module")
def project(tmp_path_factory, new_mlflow_store) -> Path:
    """A project copy through ingest (80 generated images), train (three epochs), evaluate and calibrate."""
    cfg = calibrated_project(tmp_path_factory.mktemp("export-guard"), IMPL, epochs=3, new_store=new_mlflow_store)
    models = cfg.paths.models / IMPL
    (models / "trained.npz").write_bytes(cfg.paths.weights(IMPL).read_bytes())
    return cfg.paths.root


def weights(root: Path, scale: float = 1.0, nan: bool = False) -> None:
    """Put the trained weights back, scaled (and with a NaN), and clear what an export wrote: a stage starts
    without its outputs, as under `dvc repro`."""
    from softmax_mlops.stages.models import save_weights

    models = root / "models" / IMPL
    with np.load(models / "trained.npz") as npz:
        W, b = npz["W"] * scale, npz["b"]
    if nan:
        W[0, 0] = np.nan
    save_weights(models / "weights.npz", torch.from_numpy(W), torch.from_numpy(b))
    for name in OUTPUTS:
        (models / name).unlink(missing_ok=True)


def left_behind(root: Path) -> list[str]:
    """Export outputs, or temporary files of any writer, in models/{impl}."""
    return sorted(p.name for p in (root / "models" / IMPL).iterdir() if p.name in OUTPUTS or ".tmp" in p.name)


def registered_versions(root: Path) -> int:
    with sqlite3.connect(root / "mlflow.db") as db:
        return db.execute("select count(*) from model_versions").fetchone()[0]


def temperature(root: Path) -> float:
    return json.loads((root / "metrics" / IMPL / "calibration.json").read_text())["temperature"]


def test_the_mismatch_has_a_real_cause(project):
    """The model learnt its classes and calibrate fitted a moderate temperature, which is not a float32 number:
    the graph's (rounded) constant differs from it."""
    assert json.loads((project / "metrics" / IMPL / "eval.json").read_text())["test_accuracy"] == 1.0
    t = temperature(project)
    assert 0.01 < t < 100 and float(np.float32(t)) != t


def test_the_export_stage_refuses_a_model_that_fails_parity(project):
    weights(project, scale=SCALE)
    versions = registered_versions(project)
    result = cli("export", IMPL, cwd=project)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("softmax-mlops: error:")]
    assert len(errors) == 1 and result.stderr.strip().splitlines()[-1] == errors[0], result.stderr
    onnx_path = project / "models" / IMPL / "model.onnx"
    found = re.fullmatch(
        rf"softmax-mlops: error: ONNX parity failed for {IMPL}: max abs diff (\S+) \(limit 1e-05\), "
        rf"argmax match (\S+)%; {re.escape(str(onnx_path))} not written",
        errors[0],
    )
    assert found, errors[0]
    assert float(found[1]) > 1e-5
    assert left_behind(project) == []
    assert registered_versions(project) == versions
    run_id = json.loads((project / "models" / IMPL / "mlflow_run.json").read_text())["run_id"]
    with sqlite3.connect(project / "mlflow.db") as db:
        assert db.execute("select status from runs where run_uuid = ?", (run_id,)).fetchone() == ("FAILED",)


def test_a_failed_parity_check_never_puts_model_onnx_in_place(project):
    """In process, without the CLI's all_or_nothing (a library caller, a flow task): model.onnx must not
    appear, not even to be taken back afterwards, since `serve` or `predict` could load it meanwhile."""
    from softmax_mlops.stages import export

    weights(project, scale=SCALE)
    versions = registered_versions(project)
    with pytest.raises(PipelineError, match=rf"ONNX parity failed for {IMPL}: max abs diff"):
        export.run(config.load(project), IMPL)
    assert [name for name in left_behind(project) if name != "parity.json"] == []
    assert registered_versions(project) == versions


def test_a_model_whose_outputs_are_nan_fails_parity(project):
    """NaN in both outputs gives a NaN difference, which `diff > limit` would let through."""
    from softmax_mlops.stages import export

    weights(project, nan=True)
    versions = registered_versions(project)
    with pytest.raises(PipelineError, match=r"max abs diff nan"):
        export.run(config.load(project), IMPL)
    assert [name for name in left_behind(project) if name != "parity.json"] == []
    assert registered_versions(project) == versions


def test_the_trained_weights_pass_and_are_registered(project):
    """The control: the same project and stage with the weights as trained export, register and alias."""
    from softmax_mlops.stages import export

    weights(project)
    versions = registered_versions(project)
    result = export.run(config.load(project), IMPL)
    assert result.max_abs_diff <= 1e-5 and not math.isnan(result.max_abs_diff)
    assert left_behind(project) == sorted(OUTPUTS)
    assert registered_versions(project) == versions + 1
