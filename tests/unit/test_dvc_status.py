"""dvc.yaml's code dependencies are exactly the files a stage runs, seen through DVC itself: in a copy of the
project, an edit to `serve`'s help leaves every stage up to date, and an edit to the training loop makes only
the two train stages out of date. Only code dependencies are compared: the copy has no data or outputs, which
`dvc status` would list as deleted."""

import json
from pathlib import Path

import pytest

from helpers import copy_project, run_tool

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    return copy_project(tmp_path_factory.mktemp("status") / "project")


def stages_with_changed_code(project: Path) -> list[str]:
    """The stages whose command or src/ or pipelines/ dependencies differ from dvc.lock."""
    result = run_tool("dvc", "status", "--json", cwd=project)
    assert result.returncode == 0, result.stderr
    changed = []
    for stage, entries in json.loads(result.stdout or "{}").items():
        for entry in entries:
            if not isinstance(entry, dict):
                continue
            deps = entry.get("changed deps", {})
            if "changed command" in entry or any(path.startswith(("src/", "pipelines/")) for path in deps):
                changed.append(stage.split(":")[-1])
    return sorted(set(changed))


def edit(path: Path, old: str, new: str) -> str:
    text = path.read_text()
    assert old in text, (path, old)
    path.write_text(text.replace(old, new, 1))
    return text


def test_the_copy_is_up_to_date(project):
    assert stages_with_changed_code(project) == []


def test_editing_serves_help_reproduces_nothing(project):
    path = project / "src" / "softmax_mlops" / "serving" / "commands.py"
    before = edit(path, "HTTP inference:", "HTTP inference (edited help):")
    try:
        assert stages_with_changed_code(project) == []
    finally:
        path.write_text(before)


def test_editing_the_console_script_reproduces_nothing(project):
    path = project / "pipelines" / "cli.py"
    before = edit(
        path, "Run the training pipeline as a Prefect flow", "Run the whole training pipeline as a Prefect flow"
    )
    try:
        assert stages_with_changed_code(project) == []
    finally:
        path.write_text(before)


def test_editing_the_training_loop_reproduces_the_train_stages(project):
    path = project / "src" / "softmax_mlops" / "stages" / "train.py"
    before = edit(path, '"""One training loop', '"""One (edited) training loop')
    try:
        assert stages_with_changed_code(project) == ["train@concise", "train@scratch"]
    finally:
        path.write_text(before)


def test_python_bytecode_in_a_dependency_folder_reproduces_nothing(project):
    """Python writes __pycache__ beside the modules it imports (unless PYTHONDONTWRITEBYTECODE is set, as on the
    machine these tests were first run on); .dvcignore keeps it out of src/softmax_mlops/stages/models, a folder
    the train, evaluate, calibrate and export stages depend on."""
    cache = project / "src" / "softmax_mlops" / "stages" / "models" / "__pycache__"
    cache.mkdir()
    try:
        (cache / "scratch.cpython-311.pyc").write_bytes(b"\xa7\r\r\n bytecode")
        assert stages_with_changed_code(project) == []
    finally:
        (cache / "scratch.cpython-311.pyc").unlink()
        cache.rmdir()
