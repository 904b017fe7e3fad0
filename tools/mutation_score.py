"""The mutation score per module, from what `mutmut run` left in mutants/ (`make mutation`).

mutmut records one exit code per mutant in mutants/<source>.meta. A mutant is caught when a test failed on it
(killed) or it ran past mutmut's time limit (timeout: an infinite loop the tests would also have hit). Every
other result counts against the module: survived, no test reached it, suspicious, segfault. The survivors that
no test could tell apart from the original are listed, each with its reason, in tests/mutation/equivalent.txt;
they leave the denominator.

    score = caught / (mutants - equivalent)

With module names as arguments (``python tools/mutation_score.py registry protocols``), only those are
scored: the scoped run in CI. The scores go to mutants/score.json and to stdout as a table. The run fails
(exit 1) when a module falls below its floor in tests/mutation/floor.json, when a mutant listed as
equivalent no longer exists or is now caught (the list is stale), or when mutants were left unchecked (an
interrupted run).
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MUTANTS = ROOT / "mutants"
EQUIVALENT = ROOT / "tests" / "mutation" / "equivalent.txt"
FLOOR = ROOT / "tests" / "mutation" / "floor.json"
CAUGHT = {1: "killed", 3: "killed", 36: "timeout", 24: "timeout", -24: "timeout", 152: "timeout", 255: "timeout"}
NAMED = {0: "survived", 5: "no tests", 33: "no tests", 34: "skipped", 37: "caught by type check", None: "not checked"}


def status(exit_code: int | None) -> str:
    return CAUGHT.get(exit_code) or NAMED.get(exit_code) or "suspicious"  # type: ignore[arg-type]


def equivalents(path: Path = EQUIVALENT) -> dict[str, str]:
    """mutant name -> why no test can tell it from the original ("name  # reason" per line)."""
    found = {}
    for line in path.read_text().splitlines() if path.exists() else []:
        if line.strip() and not line.startswith("#"):
            name, _, reason = line.partition("#")
            if not reason.strip():
                raise SystemExit(f"{path}: {name.strip()} has no reason: write '  # why no test can tell'")
            found[name.strip()] = reason.strip()
    return found


def results(mutants: Path = MUTANTS) -> dict[str, dict[str, str]]:
    """module (as a path under src/) -> mutant name -> status."""
    found = {}
    for meta in sorted(mutants.glob("src/**/*.py.meta")):
        codes = json.loads(meta.read_text())["exit_code_by_key"]
        module = meta.relative_to(mutants / "src").as_posix().removesuffix(".meta")
        found[module] = {name: status(code) for name, code in codes.items()}
    return found


def scores(found: dict[str, dict[str, str]], equivalent: dict[str, str]) -> dict[str, dict]:
    table = {}
    for module, statuses in found.items():
        counts = Counter(statuses.values())
        judged = [name for name in statuses if name in equivalent]
        caught = sum(s in ("killed", "timeout") for name, s in statuses.items() if name not in equivalent)
        denominator = len(statuses) - len(judged)
        table[module] = {
            "mutants": len(statuses),
            "killed": counts["killed"],
            "timeout": counts["timeout"],
            "equivalent": len(judged),
            "survived": sorted(
                n for n, s in statuses.items() if s not in ("killed", "timeout") and n not in equivalent
            ),
            "score": round(100.0 * caught / denominator, 1) if denominator else 100.0,
            "score_before_equivalents": (
                round(100.0 * (counts["killed"] + counts["timeout"]) / len(statuses), 1) if statuses else 100.0
            ),
        }
    return table


def problems(found: dict[str, dict[str, str]], equivalent: dict[str, str], table: dict, floor: dict) -> list[str]:
    every = {name: s for statuses in found.values() for name, s in statuses.items()}
    lines = [
        f"{EQUIVALENT.name}: {name} is not a mutant any more: remove it" for name in equivalent if name not in every
    ]
    lines += [
        f"{EQUIVALENT.name}: {name} is {every[name]} now, so it was not equivalent: remove it"
        for name in equivalent
        if every.get(name) in ("killed", "timeout")
    ]
    lines += [
        f"{name}: not checked (an interrupted run? run make mutation again)"
        for name, s in every.items()
        if s == "not checked"
    ]
    lines += [
        f"{module}: mutation score {table[module]['score']} is below its floor {minimum} ({FLOOR.name})"
        for module, minimum in floor.items()
        if module in table and table[module]["score"] < minimum
    ]
    lines += [f"{module}: has a floor but no mutmut results" for module in floor if module not in table]
    return lines


def dotted(path: str) -> str:
    """softmax_mlops/serving/inputs.py -> softmax_mlops.serving.inputs, the prefix of its mutants' names; a
    package's own module, softmax_mlops/serving/protocols/__init__.py, names its mutants after the package."""
    return path.removesuffix(".py").removesuffix("/__init__").replace("/", ".")


def main(modules: list[str]) -> int:
    """Score every module mutmut has results for, or only ``modules`` (short names: registry, protocols, ...)."""
    found = results(MUTANTS)
    if modules:  # short names (inputs) or dotted ones under the package (serving.inputs)
        found = {
            path: statuses
            for path, statuses in found.items()
            if Path(path).stem in modules or dotted(path).removeprefix("softmax_mlops.") in modules
        }
    if not found:
        print(f"mutation_score: no mutmut results under {MUTANTS}: run `make mutation`", file=sys.stderr)
        return 1
    scored = {dotted(path) for path in found}  # mutant names read <dotted module>.<function>__mutmut_N
    equivalent = {name: why for name, why in equivalents(EQUIVALENT).items() if name.rsplit(".", 1)[0] in scored}
    table = scores(found, equivalent)
    floor = {m: f for m, f in json.loads(FLOOR.read_text()).items() if m in found} if FLOOR.exists() else {}
    (MUTANTS / "score.json").write_text(json.dumps(table, indent=2) + "\n")
    print(f"{'module':<28} {'mutants':>7} {'killed':>6} {'timeout':>7} {'equiv.':>6} {'left':>5} {'score':>6}")
    for module, row in table.items():
        print(
            f"{module:<28} {row['mutants']:>7} {row['killed']:>6} {row['timeout']:>7} {row['equivalent']:>6} "
            f"{len(row['survived']):>5} {row['score']:>5.1f}%"
        )
        for name in row["survived"]:
            print(f"    {found[module][name]:<10} {name}")
    errors = problems(found, equivalent, table, floor)
    for line in errors:
        print(f"mutation_score: {line}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
