"""The export stage: ONNX model, parity against torch, model card, and the MLflow registry.

The graph divides the logits by the temperature calibrate@{impl} fitted, so its probabilities are calibrated.

The graph takes raw uint8 pixels and does the cast, /255 and flatten itself (it wraps the same
SoftmaxRegression module that MLflow's torch model is), so no client has to re-implement preprocessing.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from ..atomic import atomic_path, write_json
from ..classes import CLASS_NAMES
from ..config import Config
from ..errors import PipelineError
from ..serving.inference import INPUT_NAME, OUTPUT_NAMES
from .data import load_split
from .models import SoftmaxRegression, load_weights

if TYPE_CHECKING:
    from ..tracking import Registered

INPUT, OUTPUTS = INPUT_NAME, OUTPUT_NAMES
PARITY_BATCH_SIZES = (1, 7, 10000)
PARITY_MAX_ABS_DIFF = 1e-5
STACK_TRACE_KEY = "pkg.torch.onnx.stack_trace"


LOGITS_MEANING = "after temperature: logits = (x W + b) / T, probabilities = softmax(logits); x W + b = logits * T"


class ExportedSoftmaxRegression(nn.Module):
    """uint8 image [N, 28, 28] -> (logits, probabilities), both float32 [N, 10], temperature-scaled.

    Both outputs are after T, so that softmax(logits) is the served probability whoever computes it (a v2 or
    MLflow client that asks for logits only, say). Dividing by T never changes an argmax."""

    def __init__(self, W: torch.Tensor, b: torch.Tensor, temperature: float = 1.0) -> None:
        super().__init__()
        self.model = SoftmaxRegression(W, b)
        self.temperature = temperature

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model.logits64(image) / self.temperature
        return logits.to(torch.float32), torch.softmax(logits, dim=1).to(torch.float32)


def export_onnx(module: nn.Module, path, opset: int) -> None:  # noqa: ANN001
    """torch's dynamo exporter, with the batch axis declared dynamic and checked afterwards: an example batch
    the exporter specialises on would silently give a fixed-size model."""
    with atomic_path(path) as tmp:
        _write_onnx(module, tmp, opset, path)


def _write_onnx(module: nn.Module, tmp: Path, opset: int, path) -> None:  # noqa: ANN001
    """export_onnx into ``tmp``, a temporary file that becomes ``path`` (named in errors) once accepted."""
    import onnx

    example = torch.zeros((3, 28, 28), dtype=torch.uint8)
    torch.onnx.export(
        module.eval(),
        (example,),
        str(tmp),
        dynamo=True,
        opset_version=opset,
        input_names=[INPUT],
        output_names=list(OUTPUTS),
        external_data=False,
        dynamic_shapes={"image": {0: torch.export.Dim("batch")}},
        verbose=False,
    )
    model = onnx.load(str(tmp))
    batch_dims = [v.type.tensor_type.shape.dim[0] for v in (*model.graph.input, *model.graph.output)]
    if any(d.dim_value or not d.dim_param for d in batch_dims):
        raise PipelineError(f"ONNX export of {path} lost the dynamic batch axis")
    _drop_source_paths(model)
    onnx.save(model, str(tmp))


def _drop_source_paths(model) -> None:  # noqa: ANN001 - onnx.ModelProto
    """The exporter records each node's Python stack trace, with the absolute paths of our sources and of
    torch's: the same code checked out elsewhere would give another model.onnx (and another dvc.lock)."""
    for node in model.graph.node:
        kept = [p for p in node.metadata_props if p.key != STACK_TRACE_KEY]
        del node.metadata_props[:]
        node.metadata_props.extend(kept)


def check_parity(module: nn.Module, onnx_path, images: np.ndarray) -> dict:  # noqa: ANN001
    """onnxruntime against torch over ``images`` at several batch sizes: max abs difference and argmax match."""
    from ..serving.inference import Predictor

    with torch.no_grad():
        torch_logits, torch_probs = (t.numpy() for t in module(torch.from_numpy(images)))
    predictor = Predictor(onnx_path)
    report: dict[str, Any] = {}
    for batch_size in PARITY_BATCH_SIZES:
        chunks = [predictor.run(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
        logits = np.concatenate([c[0] for c in chunks])
        probs = np.concatenate([c[1] for c in chunks])
        report[f"batch_{batch_size}"] = {
            "max_abs_diff_logits": float(np.abs(logits - torch_logits).max()),
            "max_abs_diff_probabilities": float(np.abs(probs - torch_probs).max()),
            "argmax_match": float((logits.argmax(1) == torch_logits.argmax(1)).mean()),
        }
    report["images"] = len(images)
    report["max_abs_diff"] = max(
        max(r["max_abs_diff_logits"], r["max_abs_diff_probabilities"])
        for k, r in report.items()
        if k.startswith("batch_")
    )
    report["argmax_match"] = min(r["argmax_match"] for k, r in report.items() if k.startswith("batch_"))
    return report


@dataclass(frozen=True)
class Exported:
    """What export@{impl} checked and registered."""

    max_abs_diff: float  # ONNX against torch on the test set, logits and probabilities (models/{impl}/parity.json)
    argmax_match: float
    test_accuracy: float
    registered: Registered


def run(cfg: Config, impl: str) -> Exported:
    """The export@{impl} stage: the calibrated model as ONNX, checked against torch, with its model card and
    drift reference, then registered in MLflow behind the champion gate."""
    from .. import tracking
    from ..serving import drift
    from ..serving.inference import Predictor
    from ..tracking.registry import score_of
    from .calibrate import read_temperature

    paths = cfg.paths
    with tracking.resume_run(cfg, impl, f"export@{impl}") as run:
        W, b = load_weights(paths.weights(impl))
        images, labels = load_split(paths.test_data)
        evaluation = json.loads(paths.eval_metrics(impl).read_text())
        test_accuracy = evaluation["test_accuracy"]
        temperature = read_temperature(cfg, impl)
        module = ExportedSoftmaxRegression(W, b, temperature).eval()
        # model.onnx appears only once it has passed the parity check: a model that fails it is never where
        # `serve`, `predict` or DVC would take it for the export's result, even for a moment
        with atomic_path(paths.onnx(impl)) as onnx_tmp:
            _write_onnx(module, onnx_tmp, cfg.export.opset, paths.onnx(impl))
            parity = check_parity(module, onnx_tmp, images)
            write_json(paths.parity(impl), parity)
            # written so that a NaN difference (a model whose outputs are NaN) fails too: NaN > limit is False
            if not parity["max_abs_diff"] <= PARITY_MAX_ABS_DIFF or not parity["argmax_match"] >= 1.0:
                raise PipelineError(
                    f"ONNX parity failed for {impl}: max abs diff {parity['max_abs_diff']:.2e} "
                    f"(limit {PARITY_MAX_ABS_DIFF}), argmax match {parity['argmax_match']:.4%}; "
                    f"{paths.onnx(impl)} not written"
                )
        card = {
            "impl": impl,
            "class_names": list(CLASS_NAMES),
            "opset": cfg.export.opset,
            "input": {"name": INPUT, "dtype": "uint8", "shape": ["N", 28, 28]},
            "outputs": [{"name": name, "dtype": "float32", "shape": ["N", 10]} for name in OUTPUTS],
            "temperature": temperature,
            "logits": LOGITS_MEANING,
            "test_accuracy": test_accuracy,
            "data_md5": tracking.data_md5(cfg),
            "registered_model": cfg.mlflow.registered_model(impl),
        }
        # The DVC-tracked card is a function of code, data and params; the copy registered with the model in
        # MLflow also names the run that produced it (a run id is new on every run).
        write_json(paths.model_card(impl), card)
        # what `dvc metrics show` shows, one row per implementation: the shipped model's figures
        calibrated = json.loads(paths.calibration(impl).read_text())["test"]["after"]
        headline = {"accuracy": test_accuracy, "macro_f1": evaluation["macro_f1"], "ece": calibrated["ece"]}
        write_json(paths.headline(impl), headline | {"temperature": temperature})
        # one onnxruntime pass over the test set serves the drift reference and the champion/challenger score
        probabilities = Predictor(paths.onnx(impl)).run(images)[1]
        drift.save_reference(paths.drift_reference(impl), probabilities, images)

        import mlflow

        mlflow.log_metrics({"onnx_max_abs_diff": parity["max_abs_diff"], "onnx_argmax_match": parity["argmax_match"]})
        mlflow.log_artifact(str(paths.parity(impl)))
        with tempfile.TemporaryDirectory() as tmp:
            registered_card = Path(tmp) / "model.json"
            registered_card.write_text(json.dumps(card | {"mlflow_run_id": run.info.run_id}, indent=2) + "\n")
            registered = tracking.log_and_register_onnx(
                cfg,
                impl,
                paths.onnx(impl),
                [registered_card, paths.drift_reference(impl)],
                module,
                images,
                labels,
                score_of(probabilities, labels),
            )
    return Exported(
        max_abs_diff=parity["max_abs_diff"],
        argmax_match=parity["argmax_match"],
        test_accuracy=test_accuracy,
        registered=registered,
    )
