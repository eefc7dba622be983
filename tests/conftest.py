"""Fixtures shared by the model and optimizer tests."""

import pytest
import torch

import train_gpt as tg


@pytest.fixture(scope="session")
def default_model():
    """The default 27M-parameter model (SEED 1337), built once per test session: its
    orthogonal initialisation alone takes seconds."""
    h = tg.Hyperparameters.from_env({})
    return h, tg.build_model(h, torch.device("cpu"), seed=h.seed)
