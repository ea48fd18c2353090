"""Estimator tests run tiny models: one intra-op thread avoids thread hand-off costs that
dominate at this size (measured 50x slower backward passes with two threads on a busy machine)."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
