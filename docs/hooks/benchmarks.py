"""mkdocs hook: each `<!-- benchmark: NAME -->` in a page becomes benchmarks/results/NAME.json, shown.

The block shows the command that measured the figures, the date, commit and wall time, the machine, and the table
the script printed. A placeholder whose file is missing, or whose file lacks a field, fails the build with the
file's name. benchmarks/record.py writes these files; docs/benchmarks.md says what the figures mean.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from mkdocs.exceptions import PluginError

PLACEHOLDER = re.compile(r"<!--\s*benchmark:\s*([\w-]+)\s*-->")
# the fields benchmarks/record.py writes (tests/unit/test_benchmark_records.py checks that the two lists agree)
REQUIRED = ("benchmark", "command", "date", "wall_seconds", "git", "machine", "table", "figures", "ratios")
RESULTS = Path("benchmarks") / "results"


def load(name: str, results: Path) -> dict:
    """The record benchmarks/results/<name>.json, checked to have every field."""
    path = results / f"{name}.json"
    shown = f"{RESULTS.as_posix()}/{path.name}"
    if not path.is_file():
        raise PluginError(
            f"benchmark '{name}': {shown} is missing (run python benchmarks/{name}.py to measure it, "
            f"or remove the placeholder)"
        )
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise PluginError(f"benchmark '{name}': {shown} is not readable JSON: {error}") from error
    missing = [field for field in REQUIRED if field not in record] if isinstance(record, dict) else list(REQUIRED)
    if missing:
        raise PluginError(f"benchmark '{name}': {shown} lacks {', '.join(missing)}")
    return record


def machine_line(machine: dict[str, Any]) -> str:
    """'AMD EPYC, 2 logical cores, 23.5 GiB RAM; Debian ...; Python 3.11.7; torch 2.14.1' from what is known."""
    hardware = [
        machine.get("cpu"),
        f"{machine['logical_cores']} logical cores" if machine.get("logical_cores") else None,
        f"{machine['ram_gib']} GiB RAM" if machine.get("ram_gib") else None,
    ]
    software = [
        machine.get("os"),
        f"Python {machine['python']}" if machine.get("python") else None,
        *(f"{name} {version}" for name, version in (machine.get("packages") or {}).items()),
    ]
    parts = [", ".join(filter(None, hardware)), "; ".join(filter(None, software)), machine.get("description")]
    return "; ".join(filter(None, parts)) or "not recorded"


def when_line(record: dict[str, Any]) -> str:
    """'2026-12-04 16:22 UTC, commit 31905a8 with uncommitted changes, 10.6 s (load average 1.1 → 0.9)'."""
    git = record["git"] or {}
    commit = (git.get("commit") or "")[:7]
    date = record["date"].replace("T", " ").removesuffix("Z")[:16] + " UTC" if record["date"] else None
    parts = [
        date,
        f"commit `{commit}`" + (" with uncommitted changes" if git.get("dirty") else "") if commit else None,
        f"{record['wall_seconds']:g} s" if record["wall_seconds"] is not None else None,
    ]
    if load := record.get("load_average"):
        parts.append(f"1-minute load average {load[0]:g} at the start, {load[-1]:g} at the end")
    return ", ".join(filter(None, parts))


def block(name: str, record: dict[str, Any]) -> str:
    """The Markdown that replaces the placeholder of ``name``."""
    table = record["table"].strip("\n")
    fence = "```"
    while fence in table:
        fence += "`"
    lines = [f"{fence}text", f"$ {record['command']}", table, fence, ""]
    if note := record.get("transcribed"):
        lines += ['!!! note "Transcribed, not measured in this format"', f"    {note}", ""]
    else:
        lines += [f"**Measured:** {when_line(record)}.  "]
    lines += [
        f"**Machine:** {machine_line(record['machine'])}.  ",
        f"**Record:** `{RESULTS.as_posix()}/{name}.json`",
        "",
    ]
    return "\n".join(lines)


def render(markdown: str, results: Path) -> str:
    """``markdown`` with each placeholder replaced by its record's block."""
    return PLACEHOLDER.sub(lambda match: block(match.group(1), load(match.group(1), results)), markdown)


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    """mkdocs' hook: the results are read from benchmarks/results/ beside mkdocs.yml."""
    if not PLACEHOLDER.search(markdown):
        return markdown
    return render(markdown, Path(config["config_file_path"]).parent / RESULTS)
