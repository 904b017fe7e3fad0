"""The one exception type for failures a user can fix.

The CLI prints these as a single line and exits non-zero; anything else is a bug and keeps its traceback.
"""


class PipelineError(Exception):
    """An expected failure: bad input, missing data, a corrupted download, a wrong setting."""
