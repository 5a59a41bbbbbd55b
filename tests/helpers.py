"""What several test modules share (no test module imports another): tiny models and pipelines,
and what a test needs beyond vtfuse's own dependencies: a program (Chromium, Java) or an
optional package (schemathesis, FastAPI, transformers, PyAV, ...).

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
import torch

from vtfuse.config import ModelConfig, TextConfig, VisionConfig
from vtfuse.data.tokenizer import Tokenizer
from vtfuse.models.base import create_model
from vtfuse.pipeline import Pipeline

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


# -- tiny models ---------------------------------------------------------------------------------
TINY_VISION = VisionConfig(image_size=24, channels=(8, 8, 16), dim=32, depth=0, heads=2)
RETRIEVAL_CONFIG = ModelConfig(
    task="retrieval",
    vision=TINY_VISION,
    text=TextConfig(vocab_size=20, dim=32, depth=2, heads=2, max_length=16),
)
WORDS = ["a", "red", "blue", "circle", "square", "what", "colour", "is", "the", "."]


def tiny_pipeline(task: str) -> Pipeline:
    """A random tiny model of `task` (answers red, blue, green) behind a CPU pipeline."""
    torch.manual_seed(0)
    tokenizer = Tokenizer.build([" ".join(WORDS)], answers=["red", "blue", "green"])
    text = TextConfig(vocab_size=len(tokenizer), dim=32, depth=2, heads=2, max_length=16)
    model = create_model(ModelConfig(task=task, vision=TINY_VISION, text=text, num_answers=3))
    return Pipeline(model, tokenizer, torch.device("cpu"))
