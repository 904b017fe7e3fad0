"""config.load at its edges, in the test process: every section read from its own key and named in its own
errors, the exact one-line messages (the CLI tests see them only through a subprocess), the built-in defaults,
the MLflow settings and the environment variables load() exports."""

import os
from pathlib import Path

import pytest
import yaml

from helpers import ascii_locale
from softmax_mlops import config
from softmax_mlops.errors import PipelineError

PATHS = {"prepared": "data/prepared", "models": "models", "metrics": "metrics", "reports": "reports"}
HTTP_ENV = ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR")


@pytest.fixture(autouse=True)
def _no_environment_overrides(monkeypatch):
    """Only params.yaml speaks here: no mirror or UI address exported by the developer or by another test."""
    monkeypatch.delenv(config.MIRROR_ENV, raising=False)
    monkeypatch.delenv(config.UI_URL_ENV, raising=False)


def write_params(folder: Path, **sections) -> Path:
    """A params.yaml in ``folder`` holding the four paths plus ``sections``; returns the folder, resolved."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "params.yaml").write_text(yaml.safe_dump({"paths": PATHS, **sections}, sort_keys=False), encoding="utf-8")
    return folder.resolve()


def refusal(root, **kwargs) -> str:
    with pytest.raises(PipelineError) as caught:
        config.load(root, **kwargs)
    return str(caught.value)


# --- each section comes from its own key, and its errors name it ------------------------------------------------

SECTIONS = [  # section, a valid value that is not the default, a bad value, the exact message
    ("evaluate", {"grid_images": 7}, {"grid_images": 0}, "evaluate.grid_images must be >= 1, got 0"),
    ("export", {"opset": 17}, {"opset": 6}, "export.opset must be >= 7, got 6"),
    ("predict", {"top_k": 5}, {"top_k": 11}, "predict.top_k must be <= 10, got 11"),
    ("drift", {"alpha": 0.01}, {"alpha": 1}, "drift.alpha must be < 1, got 1"),
    ("batch_inference", {"input": "in/x.npy"}, {"input": 3}, "batch_inference.input must be str, got 3"),
    ("mlflow", {"experiment": "mine"}, {"http_retries": -1}, "mlflow.http_retries must be >= 0, got -1"),
    ("cpu_kernels", {"threads": 3}, {"threads": 0}, "cpu_kernels.threads must be >= 1, got 0"),
]


def test_cpu_kernels_become_the_environment_torch_and_mkl_read_at_start(tmp_path):
    """What each torch stage's process sets before torch loads (docs/pipeline.md, "Reproducible across machines"):
    MKL's results hold for one branch and a fixed thread count, so its dynamic threading is off as well."""
    cfg = config.load(write_params(tmp_path, cpu_kernels={"aten": "avx512", "mkl": "AVX2", "threads": 3}))
    assert cfg.cpu_kernels.environment() == {
        "ATEN_CPU_CAPABILITY": "avx512",
        "MKL_CBWR": "AVX2",
        "MKL_NUM_THREADS": "3",
        "OMP_NUM_THREADS": "3",
        "MKL_DYNAMIC": "FALSE",
    }


@pytest.mark.parametrize("section, good, bad, message", SECTIONS, ids=[s[0] for s in SECTIONS])
def test_a_section_is_read_from_its_own_key(tmp_path, section, good, bad, message):
    cfg = config.load(write_params(tmp_path, **{section: good}))
    (key, value), *_ = good.items()
    assert getattr(getattr(cfg, section), key) == value


@pytest.mark.parametrize("section, good, bad, message", SECTIONS, ids=[s[0] for s in SECTIONS])
def test_a_bad_value_is_one_line_naming_its_section(tmp_path, section, good, bad, message):
    assert refusal(write_params(tmp_path, **{section: bad})) == f"params.yaml: {message}"


# --- the messages of _section / _problems, exactly ---------------------------------------------------------------


def test_several_problems_are_joined_by_semicolons_without_an_unknown_key_clause(tmp_path):
    root = write_params(tmp_path, train={"lr": -1, "epochs": 0})
    assert refusal(root) == "params.yaml: train.lr must be > 0, got -1; train.epochs must be >= 1, got 0"


def test_unknown_keys_are_listed_once_with_commas_before_the_other_problems(tmp_path):
    root = write_params(tmp_path, train={"speed": 3, "lr": -1, "colour": "red"})
    assert refusal(root) == ("params.yaml: unknown key(s) in 'train': speed, colour; train.lr must be > 0, got -1")


def test_a_lone_unknown_key_is_the_whole_message(tmp_path):
    root = write_params(tmp_path, evaluate={"grid": 3})
    assert refusal(root) == "params.yaml: unknown key(s) in 'evaluate': grid"


def test_a_model_validator_message_is_quoted_without_pydantic_prefix(tmp_path):
    root = write_params(tmp_path, drift={"min_images": 50, "max_images": 10})
    assert refusal(root) == "params.yaml: drift.max_images (10) must be >= drift.min_images (50)"


def test_overridden_options_are_checked_like_params(tmp_path):
    cfg = config.load(write_params(tmp_path))
    assert config.overridden(cfg.predict, "predict", top_k=4, batch_size=None) == config.PredictConfig(top_k=4)
    with pytest.raises(PipelineError) as caught:
        config.overridden(cfg.predict, "predict", top_k=0)
    assert str(caught.value) == "params.yaml: predict.top_k must be >= 1, got 0"


# --- load(): files, paths and impls ------------------------------------------------------------------------------


def test_invalid_yaml_is_one_line_naming_the_file(tmp_path):
    text = "train:\n  lr: [0.1\n  epochs: 2\n"
    (tmp_path / "params.yaml").write_text(text, encoding="utf-8")
    with pytest.raises(yaml.YAMLError) as parse:
        yaml.safe_load(text)
    assert "\n" in str(parse.value)  # yaml's own message runs over several lines
    expected = f"{tmp_path.resolve() / 'params.yaml'} is not valid YAML: {str(parse.value).replace(chr(10), ' ')}"
    assert refusal(tmp_path) == expected


def test_a_missing_path_is_named(tmp_path):
    paths = {k: v for k, v in PATHS.items() if k != "metrics"}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"paths": paths}), encoding="utf-8")
    assert refusal(tmp_path) == "params.yaml: paths.metrics is missing"


def test_without_params_and_missing_ok_the_built_in_defaults_apply(tmp_path):
    cfg = config.load(tmp_path, missing_ok=True)
    root = tmp_path.resolve()
    assert cfg.root == root and cfg.paths.root == root
    assert (cfg.paths.prepared, cfg.paths.models, cfg.paths.metrics, cfg.paths.reports) == (
        root / "data/prepared",
        root / "models",
        root / "metrics",
        root / "reports",
    )
    assert cfg.impls == ("scratch", "concise")
    assert (cfg.evaluate, cfg.predict, cfg.batch_inference) == (
        config.EvaluateConfig(),
        config.PredictConfig(),
        config.BatchInferenceConfig(),
    )
    assert cfg.mlflow.tracking_uri == f"sqlite:///{root}/mlflow.db"
    assert (cfg.mlflow.experiment, cfg.mlflow.ui_url, cfg.mirror) == ("softmax-mlops", "http://127.0.0.1:5000", "")


def test_paths_and_root_are_those_of_the_folder(tmp_path):
    root = write_params(tmp_path / "project")
    cfg = config.load(root)
    assert cfg.root == root and cfg.paths.root == root
    assert cfg.paths.weights("scratch") == root / "models/scratch/weights.npz"


def test_impls_are_read_from_params(tmp_path):
    assert config.load(write_params(tmp_path, impls=["concise"])).impls == ("concise",)


def test_an_unknown_impl_is_named_with_the_choices(tmp_path):
    root = write_params(tmp_path, impls=["scratch", "torch"])
    assert refusal(root) == "params.yaml: unknown impl(s) ['torch']; choose from scratch, concise"


def test_the_mirror_comes_from_params_without_the_environment(tmp_path):
    assert config.load(write_params(tmp_path / "a", ingest={"mirror": "/srv/mirror"})).mirror == "/srv/mirror"
    assert config.load(write_params(tmp_path / "b", ingest={"validation_size": 20})).mirror == ""


def test_params_are_read_as_utf8_whatever_the_locale(tmp_path):
    """A non-UTF-8 locale (LC_CTYPE=C here: ASCII) must not change how params.yaml is read."""
    root = write_params(tmp_path)
    with open(root / "params.yaml", "a", encoding="utf-8") as fh:
        fh.write("mlflow:\n  experiment: modèle-été\n")  # as typed, not escaped
    with ascii_locale():
        cfg = config.load(root)
    assert cfg.mlflow.experiment == "modèle-été"


# --- the MLflow section: tracking URI, experiment, UI address ------------------------------------------------------


def test_a_configured_tracking_uri_experiment_and_ui_url_are_used(tmp_path):
    root = write_params(
        tmp_path,
        mlflow={"tracking_uri": "sqlite:///store/m.db", "experiment": "exp", "ui_url": "http://ui.example:8080"},
    )
    cfg = config.load(root)
    assert cfg.mlflow.tracking_uri == f"sqlite:///{root}/store/m.db"
    assert (cfg.mlflow.experiment, cfg.mlflow.ui_url) == ("exp", "http://ui.example:8080")
    assert cfg.mlflow.registered_model("scratch") == "exp-scratch"
    assert cfg.mlflow.run_url("1", "abc") == "http://ui.example:8080/#/experiments/1/runs/abc"


@pytest.mark.parametrize(
    "ui_url", ["http://ui.example:8080/", "http://ui.example:8080//", "https://proxy.example/MLFLOW-BOX/"]
)
def test_a_ui_url_with_trailing_slashes_gives_one_slash_in_run_links(tmp_path, ui_url):
    """Only slashes are trimmed from the end (a path that ends in an X keeps it)."""
    cfg = config.load(
        write_params(tmp_path, mlflow={"tracking_uri": "sqlite:///m.db", "experiment": "e", "ui_url": ui_url})
    )
    assert cfg.mlflow.run_url("1", "abc") == f"{ui_url.rstrip('/')}/#/experiments/1/runs/abc"
    assert "//#" not in cfg.mlflow.run_url("1", "abc")


@pytest.mark.parametrize("server", ["http://mlflow:5000", "https://mlflow.example.org"])
def test_a_tracking_server_is_its_own_ui(tmp_path, server):
    """The configured ui_url is for a store a browser cannot open; a tracking server can be opened itself."""
    root = write_params(tmp_path, mlflow={"tracking_uri": server, "ui_url": "http://elsewhere:1"})
    cfg = config.load(root)
    assert (cfg.mlflow.tracking_uri, cfg.mlflow.ui_url) == (server, server)


def test_the_ui_url_environment_override_wins(tmp_path, monkeypatch):
    monkeypatch.setenv(config.UI_URL_ENV, "http://published:5000")
    root = write_params(tmp_path, mlflow={"tracking_uri": "http://mlflow:5000", "ui_url": "http://elsewhere:1"})
    assert config.load(root).mlflow.ui_url == "http://published:5000"


# --- project_root and resolve_tracking_uri -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "folder, project",
    [
        ("/p/.dvc/tmp/exps", "/p"),  # the copies' folder itself: the pattern ends the path
        ("/p/.dvc/tmp/exps/tmp123", "/p"),
        ("/a/b/c/.dvc/tmp/exps/run/x", "/a/b/c"),
        ("/.dvc/tmp/exps/run", "/"),
        ("/home/me/project", "/home/me/project"),  # no experiment copy: the folder is the project
        ("/p/.dvc/tmp", "/p/.dvc/tmp"),
        ("/p/.dvc/tmp/other/exps", "/p/.dvc/tmp/other/exps"),
    ],
)
def test_project_root_of_an_experiment_copy(folder, project):
    assert config.project_root(Path(folder)) == Path(project)


def test_a_relative_sqlite_path_of_an_experiment_copy_lands_in_the_project(tmp_path):
    copy = tmp_path / "proj" / ".dvc" / "tmp" / "exps" / "tmpabc"
    assert config.resolve_tracking_uri("sqlite:///mlflow.db", copy) == f"sqlite:///{tmp_path / 'proj'}/mlflow.db"


def test_absolute_and_in_memory_sqlite_uris_are_left_alone(tmp_path):
    # an absolute path is taken as written, not resolved (its '..' stays)
    assert config.resolve_tracking_uri("sqlite:////srv/a/../m.db", tmp_path) == "sqlite:////srv/a/../m.db"
    assert config.resolve_tracking_uri("sqlite:///:memory:", tmp_path) == "sqlite:///:memory:"


# --- MLflow's HTTP settings: from params, unless already set; set by the command's process, not by load() -------


@pytest.fixture
def http_env_unset(monkeypatch):
    """The three variables unset for the test, and as they were afterwards (an earlier command set them)."""
    for name in HTTP_ENV:
        monkeypatch.setenv(name, "placeholder")  # recorded first, so that teardown restores the original state
        monkeypatch.delenv(name)


def test_the_http_budget_comes_from_params(tmp_path, http_env_unset):
    cfg = config.load(write_params(tmp_path, mlflow={"http_retries": 5, "http_timeout_s": 7}))
    assert cfg.mlflow.http_environment() == dict(zip(HTTP_ENV, ("5", "7", "1"), strict=True))


def test_an_http_setting_already_in_the_environment_wins(tmp_path, http_env_unset, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "99")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "3")
    cfg = config.load(write_params(tmp_path, mlflow={"http_retries": 0}))
    assert cfg.mlflow.http_environment() == dict(zip(HTTP_ENV, ("0", "99", "3"), strict=True))


def test_load_writes_nothing_to_the_environment(tmp_path, http_env_unset, monkeypatch):
    monkeypatch.setenv(config.MIRROR_ENV, str(tmp_path))
    before = dict(os.environ)
    config.load(write_params(tmp_path, mlflow={"http_retries": 5, "http_timeout_s": 7}))
    assert dict(os.environ) == before


def test_a_command_sets_the_budget_for_its_own_process(tmp_path, http_env_unset, monkeypatch):
    """Every command loads params.yaml through cli.project_config, which sets what MLflow reads."""
    from softmax_mlops import cli

    monkeypatch.chdir(write_params(tmp_path, mlflow={"http_retries": 2, "http_timeout_s": 4}))
    cli.project_config()
    assert {name: os.environ.get(name) for name in HTTP_ENV} == dict(zip(HTTP_ENV, ("2", "4", "1"), strict=True))
