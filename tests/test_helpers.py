"""The switch `.ci/run` sets: with VTFUSE_CI=1 a test whose tool is missing fails instead of
skipping (tests/helpers.py). Shown on tiny test files run by pytest in a subprocess, needing a
program and a package that exist nowhere."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
ABSENT = "vtfuse-no-such-tool"
IN_TESTS = f"""
from tests.helpers import has_tool, require_module, require_tool


def test_a_program():
    require_tool({ABSENT!r})


def test_a_package():
    require_module("vtfuse_no_such_package")


def test_more_when_there():
    assert not has_tool({ABSENT!r})
"""
AT_THE_TOP = f"""
from tests.helpers import require_tool

require_tool({ABSENT!r})


def test_never_collected():
    pass
"""


def run_pytest(folder: Path, source: str, ci: bool) -> subprocess.CompletedProcess[str]:
    """pytest on a test file of `source`, with or without VTFUSE_CI=1."""
    test_file = folder / "test_tiny.py"
    test_file.write_text(source)
    env = {name: value for name, value in os.environ.items() if name != "VTFUSE_CI"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    if ci:
        env["VTFUSE_CI"] = "1"
    command = [sys.executable, "-m", "pytest", str(test_file), "-q", "-rs"]
    command += ["-p", "no:cacheprovider", "--rootdir", str(folder)]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


def test_locally_a_missing_tool_skips_with_the_reason(tmp_path):
    result = run_pytest(tmp_path, IN_TESTS, ci=False)
    assert result.returncode == pytest.ExitCode.OK, result.stdout + result.stderr
    assert "1 passed, 2 skipped" in result.stdout
    assert f"needs {ABSENT} on PATH" in result.stdout
    assert "needs the Python package vtfuse_no_such_package" in result.stdout


def test_in_ci_a_missing_tool_fails(tmp_path):
    result = run_pytest(tmp_path, IN_TESTS, ci=True)
    assert result.returncode == pytest.ExitCode.TESTS_FAILED, result.stdout + result.stderr
    assert "3 failed" in result.stdout and "skipped" not in result.stdout
    assert f"needs {ABSENT} on PATH (VTFUSE_CI=1: CI runs every test" in result.stdout


@pytest.mark.parametrize("ci", [False, True], ids=["locally", "in CI"])
def test_a_module_needing_a_missing_tool_is_skipped_locally_and_fails_in_ci(tmp_path, ci):
    """In CI the module's import fails, which stops the run (a collection error)."""
    result = run_pytest(tmp_path, AT_THE_TOP, ci=ci)
    if ci:
        assert result.returncode == pytest.ExitCode.INTERRUPTED, result.stdout
        assert "1 error" in result.stdout and "VTFUSE_CI=1" in result.stdout
    else:  # nothing else to run: nothing collected, which pytest does not count as failing
        assert result.returncode == pytest.ExitCode.NO_TESTS_COLLECTED, result.stdout
        assert "1 skipped" in result.stdout and f"needs {ABSENT} on PATH" in result.stdout
