"""The Benchmarks page is built from the benchmarks' own result files: every script in benchmarks/ has a committed
record with every field, naming the script that wrote it; every placeholder on docs/benchmarks.md has a record;
the mkdocs hook renders them and fails the build on a missing one; benchmarks/record.py writes what the hook reads."""

import importlib.util
import json
import re
import subprocess
import sys

import pytest
from mkdocs.exceptions import PluginError

from helpers import REPO

BENCHMARKS = REPO / "benchmarks"
RESULTS = BENCHMARKS / "results"
SHARED = {"record"}  # modules of benchmarks/ that are not benchmarks
NOT_SCRIPTS = {"stack_test": "make stack-test"}  # records of measurements no benchmarks/ script makes
SCRIPTS = sorted(path.stem for path in BENCHMARKS.glob("*.py") if path.stem not in SHARED)


def load_module(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def hook():
    return load_module("benchmarks_hook", REPO / "docs" / "hooks" / "benchmarks.py")


@pytest.fixture(scope="module")
def record():
    return load_module("benchmarks_record", BENCHMARKS / "record.py")


def records():
    return {path.stem: json.loads(path.read_text(encoding="utf-8")) for path in sorted(RESULTS.glob("*.json"))}


def numbers(values):
    """Every leaf of figures/ratios: a number (not a bool), at most one level of names deep."""
    for value in values.values():
        if isinstance(value, dict):
            assert all(type(v) in (int, float) for v in value.values()), value
        else:
            assert type(value) in (int, float), value
    return True


def test_the_benchmark_scripts_are_found():
    assert {"train_speed", "pipeline_time", "inference_speed", "vs_mlflow"} <= set(SCRIPTS), SCRIPTS


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_has_a_complete_record(script, record):
    path = RESULTS / f"{script}.json"
    assert path.is_file(), f"{path.relative_to(REPO)} is missing: run python benchmarks/{script}.py"
    data = json.loads(path.read_text(encoding="utf-8"))
    missing = [field for field in record.REQUIRED if field not in data]
    assert not missing, f"{path.relative_to(REPO)} lacks {missing}"
    assert data["benchmark"] == script
    assert re.search(rf"(?<![\w/])python benchmarks/{script}\.py(?!\S)", data["command"]), data["command"]
    assert data["table"].strip() and data["figures"] and numbers(data["figures"]) and numbers(data["ratios"])
    assert data["machine"].get("logical_cores"), data["machine"]
    if "transcribed" not in data:  # measured by the script in this format: all of it recorded
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", data["date"]), data["date"]
        assert re.fullmatch(r"[0-9a-f]{40}", data["git"]["commit"]) and isinstance(data["git"]["dirty"], bool)
        assert data["wall_seconds"] > 0
        assert {"cpu", "ram_gib", "os", "python", "packages"} <= set(data["machine"]), data["machine"]


def test_every_record_is_of_a_script_or_says_it_was_transcribed():
    for name, data in records().items():
        assert data["benchmark"] == name
        if name not in SCRIPTS:
            assert name in NOT_SCRIPTS, f"benchmarks/results/{name}.json: no benchmarks/{name}.py wrote it"
            assert NOT_SCRIPTS[name] in data["command"] and data.get("transcribed"), data["command"]


def test_a_transcribed_record_says_so_on_the_page(hook):
    transcribed = {name: data for name, data in records().items() if data.get("transcribed")}
    assert "sweep_concurrency" in transcribed  # 13 minutes of both cores: not re-run when the records began
    for name, data in transcribed.items():
        shown = hook.block(name, data)
        assert "Transcribed" in shown and data["transcribed"] in shown


def test_the_page_has_a_placeholder_for_every_record(hook):
    page = (REPO / "docs" / "benchmarks.md").read_text(encoding="utf-8")
    named = hook.PLACEHOLDER.findall(page)
    assert sorted(named) == sorted(records()), named
    assert len(named) == len(set(named)), named


def test_the_hook_renders_every_placeholder(hook):
    page = (REPO / "docs" / "benchmarks.md").read_text(encoding="utf-8")
    rendered = hook.render(page, RESULTS)
    assert not hook.PLACEHOLDER.search(rendered)
    for name, data in records().items():
        assert f"$ {data['command']}" in rendered
        assert data["table"].strip() in rendered  # verbatim
        assert f"benchmarks/results/{name}.json" in rendered


def test_the_hook_shows_command_machine_date_and_commit(hook, record, tmp_path):
    data = {
        "benchmark": "demo",
        "command": "FASHION_MNIST_MIRROR=../m python benchmarks/demo.py --epochs 3",
        "date": "2026-12-04T16:22:51Z",
        "wall_seconds": 10.6,
        "load_average": [1.5, 0.75],
        "git": {"commit": "31905a88871b639c04ead7916472df311ea90ff8", "dirty": True},
        "machine": {"cpu": "AMD EPYC", "logical_cores": 2, "ram_gib": 23.5, "python": "3.11.7", "packages": {}},
        "table": "\n  s/epoch\n```\n0.25\n",
        "figures": {"seconds": 0.25},
        "ratios": {},
    }
    record.write(data, tmp_path)
    shown = hook.render("before\n\n<!-- benchmark: demo -->\n\nafter\n", tmp_path)
    assert shown.startswith("before\n\n````text\n$ FASHION_MNIST_MIRROR=../m python benchmarks/demo.py --epochs 3\n")
    assert "  s/epoch\n```\n0.25\n````" in shown  # a fence the table cannot close
    assert "2026-12-04 16:22 UTC, commit `31905a8` with uncommitted changes, 10.6 s" in shown
    assert "AMD EPYC, 2 logical cores, 23.5 GiB RAM; Python 3.11.7" in shown
    assert shown.endswith("\nafter\n")


def test_a_missing_record_fails_the_build_naming_the_file(hook, tmp_path):
    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    page = "# Benchmarks\n\n<!-- benchmark: train_speed -->\n"
    with pytest.raises(PluginError, match=r"benchmarks/results/train_speed\.json is missing"):
        hook.on_page_markdown(page, page=None, config={"config_file_path": str(tmp_path / "mkdocs.yml")}, files=None)
    # a page without placeholders is left alone, results or not
    assert hook.on_page_markdown("# Other\n", page=None, config={"config_file_path": "/nowhere"}, files=None) == (
        "# Other\n"
    )


def test_an_incomplete_record_fails_the_build(hook, tmp_path):
    (tmp_path / "demo.json").write_text(json.dumps({"benchmark": "demo", "command": "python benchmarks/demo.py"}))
    with pytest.raises(PluginError, match=r"demo\.json lacks date, wall_seconds, git"):
        hook.render("<!-- benchmark: demo -->", tmp_path)
    (tmp_path / "demo.json").write_text("{")
    with pytest.raises(PluginError, match=r"demo\.json is not readable JSON"):
        hook.render("<!-- benchmark: demo -->", tmp_path)


def test_hook_and_writer_agree_on_the_fields(hook, record):
    assert hook.REQUIRED == record.REQUIRED


def test_the_writer_refuses_what_is_not_a_figure(record, tmp_path):
    base = {field: None for field in record.REQUIRED} | {"benchmark": "demo", "ratios": {}}
    with pytest.raises(TypeError, match="figures"):
        record.write(base | {"figures": {"ok": 1.0, "csv_identical": True}}, tmp_path)
    with pytest.raises(ValueError, match="lacks"):
        record.write({"benchmark": "demo"}, tmp_path)
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_the_command_is_as_typed_without_secrets(record, monkeypatch):
    monkeypatch.setenv("FASHION_MNIST_MIRROR", "https://user:s3cret@mirror.example:8443/fmnist?token=abc")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    command = record.command_line(
        [str(BENCHMARKS / "train_speed.py"), "--epochs", "3"], ("FASHION_MNIST_MIRROR", "MLFLOW_TRACKING_URI_UNSET")
    )
    assert command == (
        "FASHION_MNIST_MIRROR=https://mirror.example:8443/fmnist OMP_NUM_THREADS=1 "
        "python benchmarks/train_speed.py --epochs 3"
    )
    assert "s3cret" not in command and "token" not in command


def test_a_run_writes_its_printed_table_and_a_failed_run_writes_nothing(tmp_path):
    script = BENCHMARKS / "record.py"
    code = (
        "import sys; sys.path.insert(0, {dir!r}); import record\n"
        "with record.Run({script!r}) as run:\n"
        "    print('a table')\n"
        "    run.figures = {{'seconds': 1.23456}}\n"
        "    {fail}\n"
    )
    env = {"BENCHMARK_RESULTS_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"}
    fake = str(BENCHMARKS / "demo_bench.py")  # the record is named after the script
    ok = subprocess.run(
        [sys.executable, "-c", code.format(dir=str(BENCHMARKS), script=fake, fail="pass")],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
    )
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout == "a table\n"  # still printed
    data = json.loads((tmp_path / "demo_bench.json").read_text())
    assert data["table"] == "a table\n" and data["figures"] == {"seconds": 1.2346}
    assert data["command"].startswith("python benchmarks/demo_bench.py")
    assert len(data["load_average"]) == 2 and data["git"]["commit"]
    failed = subprocess.run(
        [sys.executable, "-c", code.format(dir=str(BENCHMARKS), script=str(script.with_name("x.py")), fail="1 / 0")],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
    )
    assert failed.returncode != 0 and "ZeroDivisionError" in failed.stderr
    assert not (tmp_path / "x.json").exists()
