"""Shared test set-up: tiny tensors run faster on one intra-op thread, and are then immune to
whatever else the machine is doing."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _single_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
