"""Every file a stage reads or writes through config.Paths is the file dvc.yaml declares for it, as DVC itself
resolves dvc.yaml and params.yaml (foreach over impls, ${paths.*} interpolated). A helper that named another
file would leave DVC tracking one that nothing writes, and the stage's real output untracked."""

import shutil

import pytest

from helpers import REPO
from softmax_mlops import config

NOT_DECLARED = ("report_dir", "run_info")  # a folder, and the MLflow run record (tested below)
# mutmut puts each mutant of a method beside it in the class, as xǁPathsǁname__mutmut_N: not helpers.
HELPERS = {name: member for name, member in vars(config.Paths).items() if name.isascii() and not name.startswith("_")}
SHARED = sorted(name for name, member in HELPERS.items() if isinstance(member, property))
PER_IMPL = sorted(name for name, member in HELPERS.items() if callable(member) and name not in NOT_DECLARED)


@pytest.fixture(scope="module")
def declared(tmp_path_factory) -> tuple[config.Config, set[str]]:
    from dvc.repo import Repo

    root = tmp_path_factory.mktemp("dvc-paths")
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(REPO / name, root / name)
    with Repo(str(root), uninitialized=True) as repo:
        paths = {item.def_path for stage in repo.index.stages for item in (*stage.outs, *stage.deps)}
    return config.load(root), paths


def test_every_path_helper_names_a_file_dvc_yaml_declares(declared):
    cfg, paths = declared
    assert len(cfg.impls) == 2 and {"weights", "onnx", "headline"} <= set(PER_IMPL)
    assert {"test_data", "compare_json"} <= set(SHARED)
    named = [getattr(cfg.paths, name) for name in SHARED]
    named += [getattr(cfg.paths, name)(impl) for name in PER_IMPL for impl in cfg.impls]
    relative = {path.relative_to(cfg.paths.root).as_posix() for path in named}
    assert len(relative) == len(named)  # no two helpers name the same file
    assert sorted(relative - paths) == []


def test_the_folders_and_the_run_record_sit_where_the_stages_expect(declared):
    """report_dir holds each implementation's pictures; the MLflow run record sits beside the weights but is
    deliberately not a DVC output (a run id is new on every run)."""
    cfg, paths = declared
    for impl in cfg.impls:
        assert cfg.paths.report_dir(impl) == cfg.paths.reliability(impl).parent
        assert cfg.paths.run_info(impl) == cfg.paths.weights(impl).with_name("mlflow_run.json")
        assert cfg.paths.run_info(impl).relative_to(cfg.paths.root).as_posix() not in paths
