"""The training flow runs dvc.yaml's stages one by one as Prefect tasks: its list of them must be dvc.yaml's,
in an order where every stage comes after the stages it depends on, as DVC's own graph of dvc.yaml says."""

from dvc.repo import Repo

from helpers import REPO
from pipelines.flows import stage_names
from softmax_mlops import config


def dvc_graph() -> tuple[set[str], list[tuple[str, str]]]:
    with Repo(str(REPO)) as repo:
        index = repo.index
        names = {stage.addressing for stage in index.stages}
        # an edge goes from a stage to one it depends on
        edges = [(u.addressing, v.addressing) for u, v in index.graph.edges]
    return names, edges


def test_the_flow_runs_every_stage_of_dvc_yaml_after_its_dependencies():
    names, edges = dvc_graph()
    flow = stage_names(list(config.IMPLS))
    assert sorted(flow) == sorted(names) and len(flow) == len(set(flow))
    position = {stage: i for i, stage in enumerate(flow)}
    assert edges, "dvc.yaml's stages depend on each other"
    late = [(stage, needs) for stage, needs in edges if position[needs] > position[stage]]
    assert late == [], f"run before what they depend on: {late}"


def test_one_implementation_runs_its_chain_without_compare():
    names, _ = dvc_graph()
    assert stage_names(["scratch"]) == [
        "ingest",
        "train@scratch",
        "evaluate@scratch",
        "calibrate@scratch",
        "export@scratch",
    ]
    assert set(stage_names(["scratch"])) < names
