"""Shared fixtures. Tests run on the CPU; GPU tests skip themselves with a reason."""
from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def torch_mod():
    torch = pytest.importorskip("torch")
    torch.set_num_threads(2)
    return torch


@pytest.fixture()
def rng():
    return np.random.default_rng(0)
