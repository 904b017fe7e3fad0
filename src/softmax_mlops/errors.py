"""The one exception type for failures a user can fix.

The CLI prints these as a single line and exits non-zero; anything else is a bug and keeps its traceback.
"""


class PipelineError(Exception):
    """An expected failure: bad input, missing data, a corrupted download, a wrong setting."""


# Where a failing command also writes its one-line reason, so an orchestrator running it as a child process
# (pipelines.dvc_stages) can report that line rather than a traceback.
ERROR_FILE_ENV = "SOFTMAX_MLOPS_ERROR_FILE"
