"""Shared test set-up: tiny tensors run faster on one intra-op thread, and are then immune to
whatever else the machine is doing."""

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import TINY_LMS, save_tiny_lm


@pytest.fixture(autouse=True, scope="session")
def _single_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# Tiny random language models of seven families, each saved with `save_pretrained` and a
# word-level tokenizer, so tests load them through the same path a hub name takes.
@pytest.fixture(scope="session", params=sorted(TINY_LMS))
def lm_folder(request, tmp_path_factory):
    return save_tiny_lm(request.param, tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="session")
def gpt2_folder(tmp_path_factory):
    return save_tiny_lm("gpt2", tmp_path_factory.mktemp("gpt2"))


def pickle_only_copy(folder: Path, to: Path) -> Path:
    """A copy of the `save_pretrained` folder `folder` at `to` whose weights are only
    pytorch_model.bin (torch.save), as older hub models have: transformers 5 writes
    safetensors even when asked `safe_serialization=False`."""
    shutil.copytree(folder, to)
    torch.save(load_file(to / "model.safetensors"), to / "pytorch_model.bin")
    (to / "model.safetensors").unlink()
    return to


@pytest.fixture
def pickle_only(tmp_path):
    """`pickle_only(folder)`: `pickle_only_copy` of `folder` in the test's tmp_path."""
    return lambda folder: pickle_only_copy(Path(folder), tmp_path / f"pickled-{Path(folder).name}")


@pytest.fixture(scope="session")
def pickled_gpt2_folder(gpt2_folder, tmp_path_factory):
    return pickle_only_copy(gpt2_folder, tmp_path_factory.mktemp("pickled") / "gpt2")
