"""The one exception type for failures a user can fix.

The CLI prints these as a single line and exits non-zero; anything else is a bug and keeps its traceback.
"""


class PipelineError(Exception):
    """An expected failure: bad input, missing data, a corrupted download, a wrong setting."""


# Where a failing command also writes its one-line reason, so an orchestrator running it as a child process
# (pipelines.dvc_stages) can report that line rather than a traceback.
ERROR_FILE_ENV = "SOFTMAX_MLOPS_ERROR_FILE"


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, or its type's name when it has none: what a one-line error
    quotes of a library's failure (onnxruntime, numpy and MLflow messages run over many lines)."""
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
