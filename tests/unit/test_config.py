"""params.yaml is the one source of configuration; environment overrides are resolved in config.py only."""

import pytest
import yaml

from helpers import REPO
from softmax_mlops import config
from softmax_mlops.errors import PipelineError


def write_params(tmp_path, **overrides):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for dotted, value in overrides.items():
        section, key = dotted.split(".")
        params[section][key] = value
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    return tmp_path


def test_repo_params_load_with_textbook_defaults(monkeypatch):
    monkeypatch.delenv(config.MIRROR_ENV, raising=False)
    monkeypatch.delenv(config.TRACKING_URI_ENV, raising=False)
    cfg = config.load(REPO)
    assert (cfg.train.batch_size, cfg.train.lr, cfg.train.epochs) == (256, 0.1, 5)
    assert cfg.impls == ("scratch", "concise")
    assert cfg.paths.train_data == REPO / "data/prepared/train.npz"
    assert cfg.paths.weights("scratch") == REPO / "models/scratch/weights.npz"
    assert cfg.mlflow.tracking_uri == f"sqlite:///{REPO}/mlflow.db"


def test_environment_overrides_mirror_and_tracking_uri(monkeypatch):
    monkeypatch.setenv(config.MIRROR_ENV, "/srv/mirror")
    monkeypatch.setenv(config.TRACKING_URI_ENV, "http://127.0.0.1:5000")
    cfg = config.load(REPO)
    assert cfg.mirror == "/srv/mirror"
    assert cfg.mlflow.tracking_uri == "http://127.0.0.1:5000"


def test_environment_overrides_the_batch_inbox_and_output_only(monkeypatch):
    """The stack's flow-run containers have no volume: their inbox and output are s3:// prefixes."""
    monkeypatch.delenv(config.BATCH_INPUT_ENV, raising=False)
    monkeypatch.delenv(config.BATCH_OUTPUT_ENV, raising=False)
    assert (config.load(REPO).batch_inference.input, config.load(REPO).batch_inference.output_dir) == (
        "data/incoming",
        "predictions",
    )
    monkeypatch.setenv(config.BATCH_INPUT_ENV, "s3://batch/incoming/")
    assert config.load(REPO).batch_inference.output_dir == "predictions"
    monkeypatch.setenv(config.BATCH_OUTPUT_ENV, "s3://batch/predictions")
    batch = config.load(REPO).batch_inference
    assert (batch.input, batch.output_dir) == ("s3://batch/incoming/", "s3://batch/predictions")
    assert batch.model == "models:/softmax-mlops-scratch@champion"


def test_environment_sets_the_dask_scheduler_of_sharded_batch_inference(monkeypatch):
    monkeypatch.delenv(config.DASK_ADDRESS_ENV, raising=False)
    batch = config.load(REPO).batch_inference
    assert (batch.dask_address, batch.workers) == (None, 0)
    monkeypatch.setenv(config.DASK_ADDRESS_ENV, "tcp://scheduler:8786")
    batch = config.load(REPO).batch_inference
    assert (batch.dask_address, batch.workers, batch.input) == ("tcp://scheduler:8786", 0, "data/incoming")


def test_a_batch_section_that_is_not_a_mapping_is_refused_even_with_overrides(tmp_path, monkeypatch):
    monkeypatch.setenv(config.BATCH_INPUT_ENV, "s3://batch/incoming/")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["batch_inference"] = ["data/incoming"]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(PipelineError, match="^params.yaml: batch_inference must be a mapping of keys, got list$"):
        config.load(tmp_path)


def test_relative_sqlite_uri_is_anchored_at_project_root(tmp_path):
    assert config.resolve_tracking_uri("sqlite:///x/m.db", tmp_path) == f"sqlite:///{tmp_path}/x/m.db"
    assert config.resolve_tracking_uri("sqlite:////abs/m.db", tmp_path) == "sqlite:////abs/m.db"
    assert config.resolve_tracking_uri("http://host:5000", tmp_path) == "http://host:5000"


def test_int_given_for_float_is_accepted(tmp_path):
    assert config.load(write_params(tmp_path, **{"train.lr": 1})).train.lr == 1.0


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("train.lr", "fast", "train.lr must be float"),
        ("train.epochs", 0, "must be >= 1"),
        ("train.lr_schedule", "step", "lr_schedule must be one of constant, cosine"),
        ("train.momentum", 1.5, "train.momentum must be < 1, got 1.5"),
        ("train.learning_rate", 0.1, "unknown key(s) in 'train': learning_rate"),
        ("train.lr", "0.1", "train.lr must be float, got '0.1'"),  # strict: YAML that quoted a number
        ("train.epochs", True, "train.epochs must be int, got True"),
        ("train.epochs", 2.5, "train.epochs must be int, got 2.5"),
        ("drift.max_images", 100, "drift.max_images (100) must be >= drift.min_images (200)"),
        ("calibrate.initial_temperature", 0, "calibrate.initial_temperature must be > 0"),
        ("serve.port", 70000, "serve.port must be <= 65535, got 70000"),
        ("ingest.validation_size", 5, "ingest.validation_size must be >= 10, got 5"),
        ("sweep.concurrency", -1, "sweep.concurrency must be >= 0, got -1"),
        ("sweep.timeout_s", 0, "sweep.timeout_s must be > 0, got 0"),
    ],
)
def test_bad_params_are_named(tmp_path, key, value, message):
    with pytest.raises(PipelineError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        config.load(write_params(tmp_path, **{key: value}))


def test_missing_params_file_is_a_clear_error(tmp_path):
    with pytest.raises(PipelineError, match="no params.yaml"):
        config.load(tmp_path)


def test_every_problem_of_a_section_is_in_the_one_line(tmp_path):
    params = write_params(tmp_path, **{"train.lr": -1, "train.epochs": "five", "train.speed": 3})
    with pytest.raises(PipelineError) as err:
        config.load(params)
    message = str(err.value)
    assert "\n" not in message and message.startswith("params.yaml: unknown key(s) in 'train': speed")
    assert "train.lr must be > 0, got -1" in message and "train.epochs must be int, got 'five'" in message


def test_the_implementation_names_have_one_home():
    """config.IMPLS is where the names live: the CLI's choices and the model factory's refusal agree with it."""
    import pytest
    import torch

    from softmax_mlops import cli, config
    from softmax_mlops.errors import PipelineError
    from softmax_mlops.stages import models

    assert tuple(impl.value for impl in cli.Impl) == config.IMPLS
    W, b = torch.zeros(784, 10), torch.zeros(10)
    assert [type(models.build(impl, W, b, config.TrainConfig())).__module__ for impl in config.IMPLS] == [
        f"softmax_mlops.stages.models.{impl}" for impl in config.IMPLS
    ]
    with pytest.raises(PipelineError) as refused:
        models.build("other", W, b, config.TrainConfig())
    assert str(refused.value) == f"unknown implementation 'other': choose {' or '.join(config.IMPLS)}"
