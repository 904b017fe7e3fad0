"""Markers say what a test needs, and `-m "not realdata"` (make test-fast) relies on them: a test that reaches the
genuine data through the real_splits fixture is marked realdata by tests/conftest.py even when its module does not
say so. Before that, the sharded Dask tests started a Prefect server and a Dask cluster in test-fast only to skip."""

import subprocess
import sys

from helpers import REPO


def test_a_test_that_reaches_the_genuine_data_is_marked_realdata_though_its_module_is_not():
    module = "tests/integration/test_sharded.py"
    assert "realdata" not in (REPO / module).read_text()  # the marker comes from the fixture, not the module
    cmd = [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:randomly", "-m", "not realdata", module]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    # 5: nothing selected (a collection error would be 2); all three of the module's tests were deselected
    assert result.returncode == 5, result.stdout[-2000:] + result.stderr[-2000:]
    assert [line for line in result.stdout.splitlines() if "::" in line] == []
    assert "no tests collected (3 deselected)" in result.stdout
