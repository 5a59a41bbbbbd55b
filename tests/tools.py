"""What a test needs beyond vtfuse's own dependencies: a program (Chromium, Java) or an optional
package (schemathesis, FastAPI, transformers, PyAV, ...).

Missing, the test skips with the reason where a developer runs it, but fails where
`VTFUSE_CI=1` (set by `.ci/run`): CI installs every tool, so a missing one means the CI machine
tests less than it says, which must turn it red, not leave it green with a skip. A module that
cannot even be imported without the tool fails at collection there, which stops the run."""

from __future__ import annotations

import importlib
import os
import shutil
from types import ModuleType
from typing import NoReturn

import pytest

CI_VARIABLE = "VTFUSE_CI"


def in_ci() -> bool:
    """Read each time, not at import: a test may set it for a run it starts."""
    return os.environ.get(CI_VARIABLE) == "1"


def missing(what: str) -> NoReturn:
    """Skip the test (or the module, at its top) for want of `what`; fail it in CI."""
    if in_ci():
        pytest.fail(f"{what} ({CI_VARIABLE}=1: CI runs every test, install it)", pytrace=False)
    pytest.skip(what, allow_module_level=True)


def require_module(name: str) -> ModuleType:
    """`pytest.importorskip(name)` that fails in CI."""
    try:
        return importlib.import_module(name)
    except ImportError as error:
        missing(f"needs the Python package {name.split('.')[0]} ({error})")


def require_tool(*commands: str) -> None:
    """Programs the test runs, looked up on PATH."""
    absent = [command for command in commands if shutil.which(command) is None]
    if absent:
        missing(f"needs {' and '.join(absent)} on PATH")


def has_tool(command: str) -> bool:
    """For a test that checks more when `command` is there: in CI it must be."""
    if shutil.which(command) is None and in_ci():
        missing(f"needs {command} on PATH")
    return shutil.which(command) is not None
