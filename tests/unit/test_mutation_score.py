"""tools/mutation_score.py, on mutmut result files written here: the score per module, equivalents set aside,
and a run that fails when a module falls below its floor or the list of equivalents is stale."""

import json
import sys

import pytest

from helpers import REPO

sys.path.insert(0, str(REPO / "tools"))
import mutation_score


@pytest.fixture
def mutants(tmp_path):
    meta = tmp_path / "src" / "softmax_mlops" / "tracking" / "registry.py.meta"
    meta.parent.mkdir(parents=True)
    codes = {
        "r.x_decide__mutmut_1": 1,
        "r.x_decide__mutmut_2": 0,
        "r.x_decide__mutmut_3": 36,
        "r.x_decide__mutmut_4": 33,
    }
    meta.write_text(json.dumps({"exit_code_by_key": codes}))
    return tmp_path


def test_score_counts_kills_and_timeouts_and_sets_equivalents_aside(mutants):
    found = mutation_score.results(mutants)
    assert found == {
        "softmax_mlops/tracking/registry.py": {
            "r.x_decide__mutmut_1": "killed",
            "r.x_decide__mutmut_2": "survived",
            "r.x_decide__mutmut_3": "timeout",
            "r.x_decide__mutmut_4": "no tests",
        }
    }
    plain = mutation_score.scores(found, {})["softmax_mlops/tracking/registry.py"]
    assert (plain["score"], plain["survived"]) == (50.0, ["r.x_decide__mutmut_2", "r.x_decide__mutmut_4"])
    judged = mutation_score.scores(found, {"r.x_decide__mutmut_2": "why"})["softmax_mlops/tracking/registry.py"]
    assert (judged["score"], judged["equivalent"], judged["score_before_equivalents"]) == (66.7, 1, 50.0)


def test_problems_name_a_fallen_floor_and_a_stale_equivalent(mutants):
    found = mutation_score.results(mutants)
    equivalent = {"r.x_decide__mutmut_1": "claimed", "r.gone__mutmut_9": "claimed"}
    table = mutation_score.scores(found, equivalent)
    problems = mutation_score.problems(found, equivalent, table, {"softmax_mlops/tracking/registry.py": 70.0})
    assert any("r.gone__mutmut_9 is not a mutant any more" in p for p in problems)
    assert any("r.x_decide__mutmut_1 is killed now" in p for p in problems)
    assert any("registry.py: mutation score 33.3 is below its floor 70.0" in p for p in problems)
    assert (
        mutation_score.problems(
            found, {}, mutation_score.scores(found, {}), {"softmax_mlops/tracking/registry.py": 50.0}
        )
        == []
    )


def test_an_equivalent_needs_its_reason(tmp_path):
    listed = tmp_path / "equivalent.txt"
    listed.write_text("# comment\nr.a__mutmut_1  # a reason\n")
    assert mutation_score.equivalents(listed) == {"r.a__mutmut_1": "a reason"}
    listed.write_text("r.a__mutmut_1\n")
    with pytest.raises(SystemExit, match="has no reason"):
        mutation_score.equivalents(listed)


def test_a_packages_own_module_keeps_its_equivalents(tmp_path, monkeypatch, capsys):
    """mutmut names the mutants of softmax_mlops/serving/protocols/__init__.py after the package
    (softmax_mlops.serving.protocols.x_check_pixels__mutmut_27): its equivalents are set aside like any
    module's, and it is selected by the package's dotted name."""
    meta = tmp_path / "mutants" / "src" / "softmax_mlops" / "serving" / "protocols" / "__init__.py.meta"
    meta.parent.mkdir(parents=True)
    name = "softmax_mlops.serving.protocols.x_check_pixels__mutmut_27"
    meta.write_text(json.dumps({"exit_code_by_key": {name: 0, "softmax_mlops.serving.protocols.x_f__mutmut_1": 1}}))
    equivalent = tmp_path / "equivalent.txt"
    equivalent.write_text(f"{name}  # reshape(-2, ...) is reshape(-1, ...)\n")
    monkeypatch.setattr(mutation_score, "MUTANTS", tmp_path / "mutants")
    monkeypatch.setattr(mutation_score, "EQUIVALENT", equivalent)
    monkeypatch.setattr(mutation_score, "FLOOR", tmp_path / "floor.json")
    assert mutation_score.main(["serving.protocols"]) == 0
    score = json.loads((tmp_path / "mutants" / "score.json").read_text())["softmax_mlops/serving/protocols/__init__.py"]
    assert (score["equivalent"], score["score"]) == (1, 100.0)
    assert "100.0%" in capsys.readouterr().out
