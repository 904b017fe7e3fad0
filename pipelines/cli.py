"""The whole `softmax-mlops` command line: the stage commands (softmax_mlops.stages.commands) and the serving
commands (softmax_mlops.serving.commands) on one app, plus `pipeline`, which runs the stages as a Prefect flow.

It lives here, in the orchestration layer, so that imports run one way: pipelines depends on softmax_mlops,
never the reverse (tests/unit/test_layers.py). Prefect is imported only when `pipeline` runs, so the serving
image, which has no Prefect, runs every other command through this same entry point. dvc.yaml does not come
through here: it runs `python -m softmax_mlops.stages`, which loads the stage commands alone.
"""

from __future__ import annotations

from typing import Annotated

import typer

from softmax_mlops.cli import Impl, make_app, project_dir
from softmax_mlops.cli import main as run_app
from softmax_mlops.errors import PipelineError
from softmax_mlops.serving import commands as serving_commands
from softmax_mlops.stages import commands as stage_commands

app = make_app(
    "Softmax regression on Fashion-MNIST: the pipeline stages (normally run by `dvc repro`) and tools.",
    (*stage_commands.COMMANDS, *serving_commands.COMMANDS),
)


@app.command()
def pipeline(
    impl: Annotated[
        list[Impl] | None,
        typer.Option(help="Implementation(s) to run; repeat for both. Default: impls in params.yaml."),
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            "-S",
            help="Override a param, DVC style (train.lr=0.05); "
            "repeatable. Runs as a DVC experiment; params.yaml is untouched.",
        ),
    ] = None,
    name: Annotated[str | None, typer.Option(help="Name of the DVC experiment (with --set).")] = None,
) -> None:
    """Run the training pipeline as a Prefect flow, one task per DVC stage. Without a Prefect server configured
    (PREFECT_API_URL) it uses Prefect's ephemeral mode; nothing to start first."""
    from .dvc_stages import StageFailed
    from .flows import training_pipeline

    try:
        result = training_pipeline(
            impls=[i.value for i in impl or []] or None,
            overrides=set_ or [],
            experiment_name=name,
            project_dir=str(project_dir()),
        )
    except StageFailed as exc:
        raise PipelineError(f"pipeline stage {exc}") from None
    for impl_name, metrics in result["impls"].items():
        typer.echo(f"{impl_name}: test accuracy {metrics['test_accuracy']:.4f}  {metrics['mlflow_run_url']}")
    if result["experiment"]:
        typer.echo(f"DVC experiment: {result['experiment']} (dvc exp show)")


def main() -> None:
    run_app(app)


if __name__ == "__main__":
    main()
