"""Each benchmark's result as a file, benchmarks/results/<script>.json: the source of the Benchmarks page.

A script's entry point is

    with record.Run(__file__, env=("FASHION_MNIST_MIRROR",), packages=("torch",)) as run:
        run.figures, run.ratios = main()

Everything main() prints is still printed, and is kept verbatim as the record's table; main() returns the key
figures and the ratios as numbers (or one level of named numbers). When the block ends without an error, the record
is written atomically (a temporary file, then os.replace) with the command as typed from the repository's root
(with the environment variables named in ``env`` that are set; URLs without credentials), the machine, the UTC date,
the git commit and whether the tree had changes, the wall time from the block's start and the 1-minute load
average at its start and end. A run that fails writes nothing.

BENCHMARK_RESULTS_DIR writes the records elsewhere (default: benchmarks/results/). docs/hooks/benchmarks.py shows
them on docs/benchmarks.md.
"""

from __future__ import annotations

import contextlib
import datetime
import io
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
RESULTS_ENV = "BENCHMARK_RESULTS_DIR"
# every field a record has; docs/hooks/benchmarks.py renders them (and checks the same list)
REQUIRED = ("benchmark", "command", "date", "wall_seconds", "git", "machine", "table", "figures", "ratios")
# these change how fast anything runs: a record names each one that is set, whatever the script
ALWAYS_SHOWN_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "ATEN_CPU_CAPABILITY", "MKL_CBWR")

Figures = dict[str, float | int | dict[str, float | int]]


def shown_value(value: str) -> str:
    """An environment value as a record may show it: a URL loses its user, password, query and fragment (where
    credentials and signed tokens live); anything else is shown as set."""
    if "://" not in value:
        return value
    parts = urlsplit(value)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def command_line(argv: list[str], env: tuple[str, ...]) -> str:
    """The command as typed from the repository's root: the environment variables that matter (those set), then
    `python benchmarks/<script>.py` and the arguments."""
    script = Path(argv[0]).resolve()
    with contextlib.suppress(ValueError):
        argv = [script.relative_to(REPO).as_posix(), *argv[1:]]
    names = [*env, *(name for name in ALWAYS_SHOWN_ENV if name not in env)]
    assignments = [f"{name}={shlex.quote(shown_value(os.environ[name]))}" for name in names if os.environ.get(name)]
    return " ".join([*assignments, "python", *map(shlex.quote, argv)])


def _cpu_model() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _ram_gib() -> float | None:
    with contextlib.suppress(OSError), open("/proc/meminfo", encoding="utf-8") as meminfo:
        for line in meminfo:
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    return None


def _os_name() -> str:
    with contextlib.suppress(OSError):
        return f"{platform.freedesktop_os_release()['PRETTY_NAME']}, {platform.system()} {platform.release()}"
    return platform.platform()


def machine(packages: tuple[str, ...]) -> dict:
    """The CPU, its logical cores, the RAM, the OS, Python and the versions of ``packages`` that are installed."""
    versions = {}
    for name in packages:
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[name] = metadata.version(name)
    return {
        "cpu": _cpu_model(),
        "logical_cores": os.cpu_count(),
        "ram_gib": _ram_gib(),
        "os": _os_name(),
        "python": platform.python_version(),
        "packages": versions,
    }


def git_state() -> dict:
    """HEAD's commit, and whether the work tree differs from it (the result files themselves aside)."""

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        changes = git("status", "--porcelain", "--", ".", f":!{RESULTS.relative_to(REPO).as_posix()}")
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit, "dirty": bool(changes)}


def _numbers(name: str, values: dict) -> dict:
    """``values`` with floats rounded for reading, checked to be numbers (or one level of named numbers)."""
    checked: dict = {}
    for key, value in values.items():
        if isinstance(value, dict):
            checked[key] = _numbers(f"{name}[{key!r}]", value)
        elif isinstance(value, int | float) and not isinstance(value, bool):
            checked[key] = round(value, 4) if isinstance(value, float) else value
        else:
            raise TypeError(f"{name}[{key!r}] is {value!r}, not a number")
    return checked


def write(record: dict, directory: Path | None = None) -> Path:
    """Write ``record`` to <directory>/<record['benchmark']>.json atomically, its figures and ratios checked to
    be numbers and rounded; return the path."""
    missing = [field for field in REQUIRED if field not in record]
    if missing:
        raise ValueError(f"the record of {record.get('benchmark')!r} lacks {missing}")
    record = {
        **record,
        "figures": _numbers("figures", record["figures"]),
        "ratios": _numbers("ratios", record["ratios"]),
    }
    directory = Path(directory or os.environ.get(RESULTS_ENV) or RESULTS)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{record['benchmark']}.json"
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(record, fh, indent=2, ensure_ascii=False)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


class _Tee(io.TextIOBase):
    """Writes go to the terminal as before, and into a buffer."""

    def __init__(self, stream: io.TextIOBase) -> None:
        self.stream, self.buffer_ = stream, io.StringIO()

    def write(self, text: str) -> int:
        self.buffer_.write(text)
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:
        return self.stream.isatty()


class Run:
    """One run of a benchmark script; see the module's docstring."""

    def __init__(self, script: str, env: tuple[str, ...] = (), packages: tuple[str, ...] = ()) -> None:
        self.name = Path(script).stem
        self.command = command_line([script, *sys.argv[1:]], env)  # before the script changes its environment
        self.packages = packages
        self.figures: Figures = {}
        self.ratios: Figures = {}
        self.path: Path | None = None

    def __enter__(self) -> Run:
        self._date = datetime.datetime.now(datetime.UTC)
        self._load = os.getloadavg()[0]
        self._start = time.perf_counter()
        self._tee = _Tee(sys.stdout)
        self._redirect = contextlib.redirect_stdout(self._tee)
        self._redirect.__enter__()
        return self

    def __exit__(self, kind: type[BaseException] | None, *rest: object) -> None:
        self._redirect.__exit__(kind, *rest)  # type: ignore[arg-type]
        if kind is not None:
            return
        if not self.figures:
            raise ValueError(f"{self.name} set no figures")
        self.path = write(
            {
                "benchmark": self.name,
                "command": self.command,
                "date": self._date.strftime("%Y-%m-%dT%H:%M:%SZ"),
                "wall_seconds": round(time.perf_counter() - self._start, 1),
                # the 1-minute load average as the run began and ended: what else was running on the machine
                "load_average": [round(self._load, 2), round(os.getloadavg()[0], 2)],
                "git": git_state(),
                "machine": machine(self.packages),
                "table": self._tee.buffer_.getvalue(),
                "figures": self.figures,
                "ratios": self.ratios,
            }
        )
        print(f"wrote {_shown(self.path)}", file=sys.stderr)


def _shown(path: Path) -> str:
    with contextlib.suppress(ValueError):
        return path.resolve().relative_to(Path.cwd()).as_posix()
    return str(path)
