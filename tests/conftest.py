"""Fixtures shared by the test modules."""

import pytest
import torch

import train_gpt as tg


@pytest.fixture(scope="session")
def default_model():
    """The default 27M-parameter model (SEED 1337), built once per test session: its
    orthogonal initialisation alone takes seconds."""
    h = tg.Hyperparameters.from_env({})
    return h, tg.build_model(h, torch.device("cpu"), seed=h.seed)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one thread is faster, and immune to other processes on the cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
